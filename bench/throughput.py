"""Offline throughput: kvpage LLM.generate against Hugging Face transformers, side by side.

Workload: bench/workload_chat64.json (64 chat prompts, 128 new tokens each, ignore_eos), greedy,
on the default model (SmolLM2-135M-Instruct) with dense weights in fp32 and bf16 (kvpage with
``quantization="none"``, the GGUF dequantized as transformers loads it; bench/quant.py
measures the low-bit default against these). Contenders, in one process:
transformers sequential generate (a subset), static batches of 16 and one batch of 64 (left
padding), and kvpage; kvpage and the batch of 64 run twice, interleaved, and the better of
each counts (the machine's speed drifts over a run). Also reported: kvpage's fraction of the
machine's compute ceiling (measured matmul rate / model FLOPs per token), load time, peak RSS
and the step-loop split. ``--model`` runs another Hugging Face folder (config, safetensors,
tokenizer) instead, and ``--device cuda`` runs both contenders on the GPU.

    python bench/throughput.py [--quick] [--json] [--results bench/RESULTS.md]
                               [--model FOLDER] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import kvpage_runtime
import machine
import torch
import transformers
from kvpage_runtime import LLM, SamplingParams
from kvpage_runtime.loaders.default_model import default_model_path

WORKLOAD = Path(__file__).with_name("workload_chat64.json")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Slice:
    """How much of the workload one run uses."""

    num_prompts: int
    max_tokens: int
    num_sequential: int


FULL = Slice(num_prompts=64, max_tokens=128, num_sequential=8)
QUICK = Slice(num_prompts=16, max_tokens=32, num_sequential=2)


@dataclass
class Target:
    """What runs: the model (None: the default GGUF) and the device of both contenders."""

    model: str | None
    device: str

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def matmul_rate(dtype: torch.dtype, target: Target, size: int = 3072, reps: int = 3) -> float:
    """Median FLOP/s of a large torch.mm in ``dtype``."""
    if target.device == "cuda":
        size = 8192
    a = torch.randn(size, size, dtype=dtype, device=target.device)
    b = torch.randn(size, size, dtype=dtype, device=target.device)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        target.sync()
        start = time.perf_counter()
        torch.mm(a, b)
        target.sync()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / sorted(times)[len(times) // 2]


def flops_per_token(llm: LLM) -> float:
    """2 x the matmul parameters: every weight but the embedding table, plus the LM head."""
    cfg = llm.engine.model_config
    params = sum(p.numel() for p in llm.engine.runner.model.parameters())
    embed = cfg.vocab_size * cfg.hidden_size
    lm_head_extra = embed if cfg.tie_word_embeddings else 0
    return 2.0 * (params - embed + lm_head_extra)


def fused_decode_used(llm: LLM) -> bool:
    """Whether the decode steps ran through the fused decoder stack."""
    runner = llm.engine.runner
    fused_decoder = getattr(getattr(runner.model, "model", None), "fused_decoder", None)
    return fused_decoder is not None and fused_decoder(runner.kv_caches) is not None


def hf_model(dtype: torch.dtype, target: Target) -> transformers.PreTrainedModel:
    """The model in transformers: a folder as it is, the default GGUF dequantized (no
    accelerate needed this way)."""
    if target.model is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(target.model, dtype=dtype)
        return model.to(target.device).eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = str(default_model_path())
    config = transformers.AutoConfig.for_model(**load_gguf_checkpoint(path)["config"])
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    return model.to(dtype).to(target.device).eval()


@torch.inference_mode()
def hf_generate(model, batches: list[list[list[int]]], max_tokens: int, pad_id: int,
                target: Target) -> float:
    """Output tokens/s of transformers greedy generate over left-padded static batches."""
    target.sync()
    start, produced = time.perf_counter(), 0
    for batch in batches:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=target.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch],
                            device=target.device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad_id)
        produced += (out.shape[1] - width) * len(batch)
    target.sync()
    return produced / (time.perf_counter() - start)


def run_kvpage(dtype_name: str, prompts: list[list[int]], max_tokens: int,
               target: Target) -> dict:
    started = time.perf_counter()
    # the default GGUF dense: transformers' weights
    source = {"quantization": "none"} if target.model is None else {"model": target.model}
    llm = LLM(dtype=dtype_name, device=target.device, **source)
    load_s = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    engine = llm.engine
    engine.timings.__init__()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    timings = engine.timings
    result = {
        "kvpage_tok_s": produced / elapsed,
        "load_s": load_s,
        "flops_per_token": flops_per_token(llm),
        "steps": timings.steps,
        "step_ms": 1e3 * timings.total / max(timings.steps, 1),
        "split": {k: round(v, 4) for k, v in timings.split().items()},
        "fused_decode": fused_decode_used(llm),
        "num_preemptions": engine.num_preemptions,
        "kv_blocks": engine.cache.num_blocks,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    del llm, engine
    gc.collect()
    if target.device == "cuda":
        torch.cuda.empty_cache()
    return result


def run_dtype(name: str, prompts: list[list[int]], s: Slice, pad_id: int,
              target: Target) -> dict:
    """Two interleaved rounds of kvpage and transformers' batch of 64 (the shared machine's
    speed drifts over the minutes a run takes; each contender's better round counts), with
    transformers sequential and static-16 once in between."""
    dtype = DTYPES[name]
    kv_dtype = "float32" if name == "fp32" else "bfloat16"
    kv_runs = [run_kvpage(kv_dtype, prompts, s.max_tokens, target)]
    model = hf_model(dtype, target)
    hf_generate(model, [prompts[:2]], 4, pad_id, target)  # warm-up
    sequential = hf_generate(model, [[p] for p in prompts[: s.num_sequential]], s.max_tokens,
                             pad_id, target)
    static16 = hf_generate(model, [prompts[i : i + 16] for i in range(0, len(prompts), 16)],
                           s.max_tokens, pad_id, target)
    batch_runs = [hf_generate(model, [prompts], s.max_tokens, pad_id, target)]
    kv_runs.append(run_kvpage(kv_dtype, prompts, s.max_tokens, target))
    batch_runs.append(hf_generate(model, [prompts], s.max_tokens, pad_id, target))
    del model
    gc.collect()
    kv = max(kv_runs, key=lambda r: r["kvpage_tok_s"])
    best_static = max(static16, *batch_runs)
    rate = matmul_rate(dtype, target)
    ceiling = rate / kv["flops_per_token"]
    return {
        "hf_sequential_tok_s": round(sequential, 1),
        "hf_static16_tok_s": round(static16, 1),
        "hf_batch64_tok_s": round(max(batch_runs), 1),
        "kvpage_tok_s": round(kv["kvpage_tok_s"], 1),
        "kvpage_rounds_tok_s": [round(r["kvpage_tok_s"], 1) for r in kv_runs],
        "hf_batch64_rounds_tok_s": [round(r, 1) for r in batch_runs],
        "ratio_vs_hf_sequential": round(kv["kvpage_tok_s"] / sequential, 2),
        "ratio_vs_hf_best_static": round(kv["kvpage_tok_s"] / best_static, 2),
        "matmul_gflops": round(rate / 1e9, 1),
        "ceiling_tok_s": round(ceiling, 1),
        "fraction_of_ceiling": round(kv["kvpage_tok_s"] / ceiling, 3),
        "load_s": round(kv_runs[0]["load_s"], 2),
        "peak_rss_mb_after_first_round": round(kv_runs[0]["peak_rss_mb"], 1),
        "step_ms": round(kv["step_ms"], 1),
        "steps": kv["steps"],
        "overhead_split": kv["split"],
        "num_preemptions": kv["num_preemptions"],
        "fused_decode": kv["fused_decode"],
    }


def markdown(report: dict, command: str) -> str:
    lines = [
        f"\n## throughput.py — {report['date']}\n",
        f"- machine: {report['machine']}",
        f"- command: `{command}`",
        f"- versions: {report['versions']}",
        f"- workload: {report['workload']}",
        f"- load_s (kvpage, fp32): {report['load_s']}; peak RSS of kvpage (its first round, "
        f"before transformers loads): {report['peak_rss_mb']} MB",
        "",
        "| dtype | HF sequential | HF static-16 | HF batch-64 | kvpage | x HF seq | x HF best static "
        "| matmul GFLOP/s | ceiling tok/s | fraction of ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in [n for n in DTYPES if n in report]:
        r = report[name]
        lines.append(
            f"| {name} | {r['hf_sequential_tok_s']} | {r['hf_static16_tok_s']} | "
            f"{r['hf_batch64_tok_s']} | {r['kvpage_tok_s']} | {r['ratio_vs_hf_sequential']} | "
            f"{r['ratio_vs_hf_best_static']} | {r['matmul_gflops']} | {r['ceiling_tok_s']} | "
            f"{r['fraction_of_ceiling']} |")
    lines.append("")
    for name in [n for n in DTYPES if n in report]:
        r = report[name]
        split = ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["overhead_split"].items())
        lines.append(f"- kvpage {name} step loop ({r['steps']} steps, {r['step_ms']} ms/step): {split}")
        lines.append(f"- {name} rounds (the better counts): kvpage {r['kvpage_rounds_tok_s']}, "
                     f"HF batch-64 {r['hf_batch64_rounds_tok_s']}")
    lines.append("- output tokens/s; the machine is shared, so absolute figures are noisy; ratios are side by side.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 prompts x 32 tokens")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--results", type=Path, help="append a markdown section to this file")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--model", help="a Hugging Face folder (default: the default model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    s = QUICK if args.quick else FULL
    target = Target(args.model, args.device)
    workload = json.loads(WORKLOAD.read_text())
    if args.model is None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            default_model_path().parent, gguf_file=default_model_path().name)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    prompts = [list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
               for c in workload["conversations"][: s.num_prompts]]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": (f"{torch.cuda.get_device_name()} with " if args.device == "cuda" else "")
                   + f"{machine.describe()}, {torch.get_num_threads()} torch threads, "
                   f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}",
        "versions": f"kvpage-runtime {kvpage_runtime.__version__}, torch {torch.__version__}, "
                    f"transformers {transformers.__version__}, python {platform.python_version()}",
        "workload": f"{args.model or 'the default model'}: {len(prompts)} prompts x {s.max_tokens} tokens, greedy, ignore_eos; HF "
                    f"sequential over the first {s.num_sequential}",
    }
    for name in args.dtypes.split(","):
        report[name] = run_dtype(name, prompts, s, pad_id, target)
    first = args.dtypes.split(",")[0]
    report["load_s"] = report[first]["load_s"]
    # The process's peak once kvpage has loaded and run in the first dtype (before transformers
    # loads anything): kvpage's own footprint.
    report["peak_rss_mb"] = report[first]["peak_rss_mb_after_first_round"]
    command = shlex.join(["python", "bench/throughput.py", *sys.argv[1:]])
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(markdown(report, command))
    if args.results:
        with args.results.open("a") as f:
            f.write(markdown(report, command))


if __name__ == "__main__":
    main()
