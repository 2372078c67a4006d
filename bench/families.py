"""Offline throughput per model family, each at the default model's size, against transformers.

For each family a random-weight model shaped like SmolLM2-135M (30 layers, hidden size 576, 9
query and 3 KV heads, intermediate size 1536, its vocabulary and tokenizer; Qwen3-MoE with 8
experts of 256 per layer, two per token; Gemma with head_dim 64), saved as safetensors, goes through
bench/throughput.py in fp32 (64 chat prompts x 128 tokens, greedy, ignore_eos; kvpage's
better of two rounds against transformers' best static batch), in a process of its own, one
family after another. Also reported: whether the family's decode steps ran in the fused CPU
decode stack.

    python bench/families.py [--quick] [--json] [--results bench/RESULTS.md] [--families a,b]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import report as report_tools
import torch
import transformers

SHAPE = dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, intermediate_size=1536, max_position_embeddings=8192,
             tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0,
             initializer_range=0.05)
FAMILIES = {
    "llama (SmolLM2)": lambda: transformers.LlamaConfig(**SHAPE),
    "qwen3": lambda: transformers.Qwen3Config(**SHAPE, head_dim=64),
    "qwen3-moe": lambda: transformers.Qwen3MoeConfig(
        **SHAPE, head_dim=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
        norm_topk_prob=True),
    "olmo2": lambda: transformers.Olmo2Config(**SHAPE),
    "granite": lambda: transformers.GraniteConfig(
        **SHAPE, embedding_multiplier=12.0, residual_multiplier=0.22,
        attention_multiplier=0.015625, logits_scaling=8.0),
    "phi3": lambda: transformers.Phi3Config(**{**SHAPE, "pad_token_id": 0}, sliding_window=None),
    # Gemma's own defaults: a 4096-token window on alternating layers (Gemma 2) or five of six
    # (Gemma 3), soft-capping (Gemma 2)
    "gemma2": lambda: transformers.Gemma2Config(**SHAPE, head_dim=64, query_pre_attn_scalar=64),
    "gemma3": lambda: transformers.Gemma3TextConfig(**SHAPE, head_dim=64,
                                                    query_pre_attn_scalar=64),
}


def save_family(name: str, folder: Path, tokenizer) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[name](), dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def run_family(name: str, folder: Path, quick: bool) -> dict:
    command = [sys.executable, str(Path(__file__).with_name("throughput.py")), "--model",
               str(folder), "--dtypes", "fp32", "--json"] + (["--quick"] if quick else [])
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    report = json.loads(done.stdout[done.stdout.index("{"):])
    fp32 = report["fp32"]
    return {"family": name, "kvpage_tok_s": fp32["kvpage_tok_s"],
            "hf_best_static_tok_s": max(fp32["hf_static16_tok_s"], fp32["hf_batch64_tok_s"]),
            "ratio": fp32["ratio_vs_hf_best_static"], "fused_decode": "yes" if fp32["fused_decode"] else "no",
            "versions": report["versions"]}


def markdown(report: dict, command: str) -> str:
    lines = [*report_tools.heading("families.py", report, command),
             "| family | kvpage tok/s | transformers best static batch | x | fused decode stack |",
             "|---|---|---|---|---|"]
    for r in report["families"]:
        lines.append(f"| {r['family']} | {r['kvpage_tok_s']} | {r['hf_best_static_tok_s']} | "
                     f"**{r['ratio']}** | {r['fused_decode']} |")
    lines += ["", "- each family in a process of its own, one after another; output tokens/s; "
              "the machine is shared: compare within a row."]
    return "\n".join(lines) + "\n"


def family_names(text: str) -> list[str]:
    """The comma-separated families of ``--families``, each one of FAMILIES."""
    names = text.split(",")
    if unknown := [name for name in names if name not in FAMILIES]:
        raise argparse.ArgumentTypeError(f"unknown families {unknown}; known: "
                                         f"{', '.join(FAMILIES)}")
    return names


def main() -> None:
    parser = report_tools.parser(__doc__)
    parser.add_argument("--families", type=family_names, default=list(FAMILIES),
                        help=f"comma-separated, of: {', '.join(FAMILIES)}")
    args = parser.parse_args()
    tokenizer = report_tools.default_tokenizer()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.families:
            folder = save_family(name, Path(tmp) / name.split()[0], tokenizer)
            results.append(run_family(name, folder, args.quick))
            print(f"{name}: {results[-1]['ratio']}x", file=sys.stderr, flush=True)
    size = "16 prompts x 32 tokens" if args.quick else "64 prompts x 128 tokens"
    report = {**report_tools.run_facts(),
              "versions": results[0]["versions"],  # those of the processes that measured
              "workload": f"random-weight models of SmolLM2-135M's shape, fp32: {size} of "
                          "bench/workload_chat64.json, greedy, ignore_eos",
              "families": results}
    command = "python bench/families.py" + (" --quick" if args.quick else "") + (
        "" if args.families == list(FAMILIES) else f" --families '{','.join(args.families)}'")
    report_tools.publish(report, markdown(report, command), args)


if __name__ == "__main__":
    main()
