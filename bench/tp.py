"""Tensor parallelism on one machine: TP=2 against TP=1 on the same cores.

The 64-prompt chat workload (bench/workload_chat64.json, 128 tokens each, greedy, ignore_eos)
on a model of the default model's class whose heads split in two (SmolLM2-135M has 9): a
random-weight Llama of 30 layers, hidden size 512, 8 query and 4 KV heads, intermediate size
1536, the default model's vocabulary and tokenizer (126M parameters, fp32), one
``LLM.generate`` per setup, in one run:

- TP=1 with every torch thread (decode steps in the fused CPU stack, as ``LLM()`` runs);
- TP=1 with the fused stack off (``KVPAGE_FUSED_DECODER=0``): the layer-by-layer path that
  tensor-parallel ranks run, so that the cost of splitting shows by itself;
- TP=2 (``mp`` executor), the threads split between the ranks (one each on two cores).

For TP=2: the share of the forward time the driver spent in collectives (the all-reduces and
the logits' gather, waiting for the slower rank included) and in sending each step's inputs.

    python bench/tp.py [--quick] [--json] [--results bench/RESULTS.md]
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from pathlib import Path

import report as report_tools
import torch
import transformers
from kvpage_runtime import LLM, SamplingParams
from throughput import FULL, QUICK

SETUPS = [("TP=1", 1, True), ("TP=1, fused decode off", 1, False), ("TP=2", 2, True)]
MODEL = dict(vocab_size=49152, hidden_size=512, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=8192,
             tie_word_embeddings=True, rope_theta=100000.0)


def save_model(folder: Path, tokenizer) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**MODEL, initializer_range=0.05)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def run(folder: Path, prompts: list[list[int]], max_tokens: int, tp: int, fused: bool) -> dict:
    os.environ["KVPAGE_FUSED_DECODER"] = "1" if fused else "0"
    llm = LLM(str(folder), dtype="float32", tensor_parallel_size=tp)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
        timings = llm.engine.timings
        forward_before, steps_before = timings.forward, timings.steps
        stats = llm.engine.parallel.tp.stats if llm.engine.parallel else None
        comm_before = ((stats.collective_seconds, stats.message_seconds, stats.collectives)
                       if stats else (0, 0, 0))
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        produced = sum(len(o.outputs[0].token_ids) for o in outputs)
        forward = timings.forward - forward_before
        result = {"tok_s": produced / elapsed, "steps": timings.steps - steps_before,
                  "forward_s": forward}
        if stats is not None:
            result["collective_share"] = (stats.collective_seconds - comm_before[0]) / forward
            result["message_share"] = (stats.message_seconds - comm_before[1]) / forward
            result["collectives_per_step"] = ((stats.collectives - comm_before[2])
                                              / max(1, result["steps"]))
        return result
    finally:
        llm.engine.shutdown()
        del llm
        gc.collect()
        os.environ.pop("KVPAGE_FUSED_DECODER", None)


def markdown(report: dict, command: str) -> str:
    base = report["setups"][0]["tok_s"]
    lines = [*report_tools.heading("tp.py", report, command),
             "| setup | output tok/s | x TP=1 | steps | forward s | collectives | step inputs |",
             "|---|---|---|---|---|---|---|"]
    for r in report["setups"]:
        comm = (f"{100 * r['collective_share']:.0f}% of forward" if "collective_share" in r
                else "-")
        sent = f"{100 * r['message_share']:.1f}%" if "message_share" in r else "-"
        lines.append(f"| {r['setup']} | {r['tok_s']:.1f} | **{r['tok_s'] / base:.2f}** | "
                     f"{r['steps']} | {r['forward_s']:.1f} | {comm} | {sent} |")
    lines += ["", "- collectives: the driver's time in all-reduces and the logits' gather "
              "(waiting for the other rank included); step inputs: sending each step's inputs "
              "to the worker. Output tokens/s; the machine is shared: compare within this "
              "section."]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = report_tools.parser(__doc__).parse_args()
    s = QUICK if args.quick else FULL
    tokenizer = report_tools.default_tokenizer()
    prompts = report_tools.chat_prompts(tokenizer, s.num_prompts)
    report = {
        **report_tools.run_facts("torch threads in all"),
        "workload": f"a 126M-parameter Llama (8 heads, fp32, random weights): {len(prompts)} "
                    f"chat prompts x {s.max_tokens} tokens, greedy, ignore_eos",
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model(Path(tmp), tokenizer)
        report["setups"] = [{"setup": name, **run(folder, prompts, s.max_tokens, tp, fused)}
                            for name, tp, fused in SETUPS]
    command = "python bench/tp.py" + (" --quick" if args.quick else "")
    report_tools.publish(report, markdown(report, command), args)


if __name__ == "__main__":
    main()
