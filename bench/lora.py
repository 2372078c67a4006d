"""Multi-LoRA serving: the chat workload spread over several adapters, against the base model.

The 64-prompt chat workload (bench/workload_chat64.json, 128 tokens each, greedy, ignore_eos)
on the default model (SmolLM2-135M-Instruct, its low-bit GGUF as ``LLM()`` serves it), one
``LLM.generate`` per setup, in one run:

- the base model (LoRA off), first and last (the machine's speed drifts over a run: the
  better of the two counts);
- requests spread round-robin over 1, 4 and 8 PEFT adapters of rank 8 and of rank 16 (random
  weights on every projection, made here with peft on the model transformers loads from the
  same GGUF), ``max_loras`` 4 for 1 and 4 adapters and 8 for 8, so every adapter of a step
  has a slot: output tokens/s and the ratio to the base model;
- transformers + peft serving the 8-adapter rank-16 mix as a user without a LoRA server
  would: one static batch per adapter (``set_adapter``), left-padded.

    python bench/lora.py [--quick] [--json] [--results bench/RESULTS.md]
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path

import peft
import report as report_tools
import torch
import transformers
from kvpage_runtime import LLM, LoRARequest, SamplingParams
from throughput import FULL, QUICK, Target, hf_generate, hf_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIXES = [(1, 8), (4, 8), (8, 8), (1, 16), (4, 16), (8, 16)]  # (adapters, rank)


def make_adapters(model: transformers.PreTrainedModel, folder: Path, count: int,
                  rank: int) -> list[Path]:
    """``count`` random PEFT adapters of ``rank`` on every projection, saved under ``folder``."""
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        wrapped = peft.get_peft_model(model, peft.LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False))
        path = folder / f"r{rank}-{i}"
        wrapped.save_pretrained(path)
        wrapped.unload()
        paths.append(path)
    return paths


def run_kvpage(prompts: list[list[int]], max_tokens: int, adapters: list[Path],
               max_loras: int) -> dict:
    """Output tok/s of one generate over the workload, requests round-robin over adapters."""
    lora = dict(enable_lora=True, max_loras=max_loras, max_lora_rank=16) if adapters else {}
    llm = LLM(**lora)
    requests = [LoRARequest(p.name, i + 1, str(p)) for i, p in enumerate(adapters)]
    per_prompt = [requests[i % len(requests)] for i in range(len(prompts))] if requests else None
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False,
                 lora_request=per_prompt[:4] if per_prompt else None)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=per_prompt)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    steps = llm.engine.timings.steps
    del llm
    gc.collect()
    return {"tok_s": produced / elapsed, "steps": steps}


def run_peft(model: transformers.PreTrainedModel, prompts: list[list[int]], max_tokens: int,
             adapters: list[Path], pad_id: int) -> float:
    """transformers + peft: each adapter's prompts as one static batch, adapters in turn."""
    wrapped = peft.PeftModel.from_pretrained(model, adapters[0], adapter_name="0")
    for i, path in enumerate(adapters[1:], start=1):
        wrapped.load_adapter(path, adapter_name=str(i))
    target = Target(None, "cpu")
    hf_generate(wrapped, [prompts[:2]], 4, pad_id, target)  # warm-up
    start, produced = time.perf_counter(), 0
    for i in range(len(adapters)):
        wrapped.set_adapter(str(i))
        batch = prompts[i :: len(adapters)]
        hf_generate(wrapped, [batch], max_tokens, pad_id, target)  # min_new_tokens = max
        produced += len(batch) * max_tokens
    return produced / (time.perf_counter() - start)


def markdown(report: dict, command: str) -> str:
    base = report["base_tok_s"]
    lines = [*report_tools.heading("lora.py", report, command),
             "| setup | max_loras | output tok/s | x base |", "|---|---|---|---|",
             f"| base model (rounds {report['base_rounds_tok_s']}) | - | {base:.1f} | 1.00 |"]
    for r in report["mixes"]:
        lines.append(f"| {r['adapters']} adapter(s) of rank {r['rank']} | {r['max_loras']} | "
                     f"{r['tok_s']:.1f} | **{r['tok_s'] / base:.2f}** |")
    peft_rate = report["peft_tok_s"]
    lines.append(f"| transformers + peft, 8 adapters of rank 16, a batch per adapter | - | "
                 f"{peft_rate:.1f} | {peft_rate / base:.2f} |")
    best = next(r for r in report["mixes"] if (r["adapters"], r["rank"]) == (8, 16))
    lines += ["", f"- kvpage with 8 adapters of rank 16 against transformers + peft on the same "
              f"requests: **{best['tok_s'] / peft_rate:.2f}x**",
              "- decode steps with adapters run in the fused CPU decode stack, which adds the "
              "adapters' deltas after each projection; prompts on the layer modules. Output "
              "tokens/s; the machine is shared: compare within this section."]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = report_tools.parser(__doc__).parse_args()
    s = QUICK if args.quick else FULL
    tokenizer = report_tools.default_tokenizer()
    prompts = report_tools.chat_prompts(tokenizer, s.num_prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = hf_model(torch.float32, Target(None, "cpu"))
    report = {
        **report_tools.run_facts(transformers=transformers.__version__, peft=peft.__version__),
        "workload": f"the default model (low-bit GGUF, fp32 activations): {len(prompts)} chat "
                    f"prompts x {s.max_tokens} tokens, greedy, ignore_eos",
        "mixes": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {rank: make_adapters(model, Path(tmp), 8, rank) for rank in (8, 16)}
        base = [run_kvpage(prompts, s.max_tokens, [], 1)["tok_s"]]
        for count, rank in MIXES:
            max_loras = 4 if count <= 4 else 8
            result = run_kvpage(prompts, s.max_tokens, adapters[rank][:count], max_loras)
            report["mixes"].append({"adapters": count, "rank": rank, "max_loras": max_loras,
                                    **result})
        base.append(run_kvpage(prompts, s.max_tokens, [], 1)["tok_s"])
        report["base_rounds_tok_s"] = [round(b, 1) for b in base]
        report["base_tok_s"] = max(base)
        report["peft_tok_s"] = run_peft(model, prompts, s.max_tokens, adapters[16], pad_id)
    command = "python bench/lora.py" + (" --quick" if args.quick else "")
    report_tools.publish(report, markdown(report, command), args)


if __name__ == "__main__":
    main()
