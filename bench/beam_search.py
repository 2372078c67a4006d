"""KV blocks held by a beam search whose beams share blocks, against independent copies.

On the default model (SmolLM2-135M-Instruct), a beam search of width 4 and 8 over a prompt of
about 500 tokens: after every engine step, the KV blocks the search holds (its beams fork
from their parents, sharing every block, the partial last one included, and copying a block
only when a beam writes into a shared one), against what W independent sequences of the same
tokens would hold (each its own copy of the prompt and of its generated tokens). The saving
is 1 - shared / independent, at the peak and on average over the steps (the vLLM paper
reports 37-66% for beam search).

    python bench/beam_search.py [--max-tokens 128] [--json] [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import kvpage_runtime
import machine
import torch
from kvpage_runtime import LLM, BeamSearchParams

WORKLOAD = Path(__file__).with_name("workload_chat64.json")
PROMPT_TOKENS = 500


def long_prompt(llm: LLM, num_tokens: int) -> list[int]:
    """The chat workload's questions, one after another, cut to ``num_tokens`` tokens."""
    conversations = json.loads(WORKLOAD.read_text())["conversations"]
    text = " ".join(c[0]["content"] for c in conversations)
    return llm.get_tokenizer().encode(text)[:num_tokens]


def measure(llm: LLM, prompt: list[int], width: int, max_tokens: int) -> dict:
    engine = llm.engine
    block = engine.config.block_size
    engine.add_request("search", prompt, BeamSearchParams(width, max_tokens))
    shared, independent = [], []
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        beams = [r for r in engine.scheduler.running if r.request_id.startswith("search#")]
        if not beams:
            continue
        held = engine.cache.num_blocks - engine.cache.num_free_blocks
        shared.append(held)
        independent.append(sum(-(-r.num_tokens // block) for r in beams))
    peak_saving = 1 - max(shared) / max(independent)
    mean_saving = 1 - sum(shared) / sum(independent)
    return {"width": width, "steps": steps, "peak_blocks": max(shared),
            "peak_blocks_independent": max(independent), "peak_saving": round(peak_saving, 3),
            "mean_saving": round(mean_saving, 3)}


def markdown(rows: list[dict], prompt_len: int, args: argparse.Namespace) -> str:
    lines = [
        f"\n## beam_search.py — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n",
        f"- machine: {machine.describe()}",
        f"- command: `python bench/beam_search.py --max-tokens {args.max_tokens}`",
        f"- versions: kvpage-runtime {kvpage_runtime.__version__}, torch {torch.__version__}",
        f"- workload: the default model, one {prompt_len}-token prompt, max_tokens "
        f"{args.max_tokens}, block size 16; KV blocks after each step",
        "",
        "| beam width | steps | peak blocks (shared) | peak blocks (independent) | "
        "peak saving | mean saving |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['width']} | {r['steps']} | {r['peak_blocks']} | "
              f"{r['peak_blocks_independent']} | {100 * r['peak_saving']:.0f}% | "
              f"{100 * r['mean_saving']:.0f}% |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--results", type=Path, help="append a markdown section to this file")
    args = parser.parse_args()
    llm = LLM(dtype="float32")
    prompt = long_prompt(llm, PROMPT_TOKENS)
    rows = [measure(llm, prompt, width, args.max_tokens) for width in (4, 8)]
    print(json.dumps(rows) if args.json else markdown(rows, len(prompt), args))
    if args.results:
        with args.results.open("a") as f:
            f.write(markdown(rows, len(prompt), args))


if __name__ == "__main__":
    main()
