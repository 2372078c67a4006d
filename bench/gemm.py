"""kvpage-kernels' packed GEMM per decode step: fp32 panels against 4- and 8-bit weights.

SmolLM2-135M's linear layers (in -> out: 576 -> 960 qkv, 576 -> 576 o, 576 -> 3072 gate_up,
1536 -> 576 down, 30 layers each, and the 576 -> 49152 output layer), every layer a weight
of its own so that each step streams them from memory as a decode step does. The weights
are random, packed once with ``pack_weight``: fp32 panels, and ``QuantizedWeight`` codes of
4 bits in groups of 32 (GGUF Q4_0/Q4_1's layout) and 8 bits in groups of 32 (Q8_0's).
``packed_linear`` on the cpu backend at 1, 16 and 64 rows: the median over the repetitions
of the time of one step through every layer, in ms, and the bytes each format streams per
step. Run once per CPU tier (``KVPAGE_CPU_ISA=avx2`` for the AVX2 paths; add the switches of
bench/machine.py to hold torch's libraries back too).

    python bench/gemm.py [--rows 1 16 64] [--reps 9] [--json] [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import kvpage_kernels
import machine
import torch
from kvpage_kernels import QuantizedWeight, pack_weight, packed_linear
from kvpage_kernels.cpu_isa import cpu_isa

LAYERS = 30
SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)}
OUTPUT = (576, 49152)
GROUP = 32


def quantized(out_features: int, in_features: int, bits: int, gen: torch.Generator):
    groups = in_features // GROUP
    return QuantizedWeight(
        codes=torch.randint(0, 2**bits, (out_features, in_features), generator=gen,
                            dtype=torch.uint8),
        scales=torch.rand(out_features, groups, generator=gen) * 0.01,
        offsets=torch.randn(out_features, groups, generator=gen) * 0.01,
        bits=bits, group_size=GROUP)


def weights(fmt: str) -> list[tuple[str, object, int]]:
    """(shape name, packed weight, bytes streamed) for every layer of a step, in order."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(name, shape) for _ in range(LAYERS) for name, shape in SHAPES.items()]
    packed = []
    for name, (in_features, out_features) in [*shapes, ("output", OUTPUT)]:
        if fmt == "fp32":
            w = pack_weight(torch.randn(out_features, in_features, generator=gen))
            size = 4 * in_features * out_features
        else:
            bits = int(fmt.split("-")[0])
            w = pack_weight(quantized(out_features, in_features, bits, gen))
            size = in_features * out_features * bits // 8 + 8 * out_features * (
                in_features // GROUP)
        packed.append((name, w, size))
    return packed


def time_step(layers: list[tuple[str, object, int]], rows: int, reps: int) -> dict:
    inputs = {n: torch.randn(rows, w.in_features) for n, w, _ in layers[:5] + layers[-1:]}
    per_shape = {name: [] for name in [*SHAPES, "output"]}
    steps = []
    for _ in range(reps + 1):  # the first is a warm-up
        spent = dict.fromkeys(per_shape, 0.0)
        for name, w, _ in layers:
            start = time.perf_counter()
            packed_linear(inputs[name], w)
            spent[name] += time.perf_counter() - start
        for name, seconds in spent.items():
            per_shape[name].append(seconds)
        steps.append(sum(spent.values()))
    return {"step_ms": 1e3 * statistics.median(steps[1:]),
            **{f"{name}_ms": 1e3 * statistics.median(v[1:]) for name, v in per_shape.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--results", type=Path, help="append a markdown section to this file")
    args = parser.parse_args()
    if kvpage_kernels.select_backend("cpu") != "cpu":
        raise SystemExit("the cpu kernel backend is not available (no C++ compiler?)")
    results = []
    for fmt in ("fp32", "4-bit", "8-bit"):
        layers = weights(fmt)
        streamed = sum(size for _, _, size in layers)
        for rows in args.rows:
            results.append({"format": fmt, "rows": rows, "mb_per_step": streamed / 1e6,
                            **time_step(layers, rows, args.reps)})
        del layers
    text = markdown(results, args)
    print(json.dumps(results) if args.json else text)
    if args.results:
        with args.results.open("a") as f:
            f.write(text)


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    fp32 = {r["rows"]: r["step_ms"] for r in results if r["format"] == "fp32"}
    lines = [
        f"\n## gemm.py — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n",
        f"- machine: {machine.describe()}",
        f"- command: `python bench/gemm.py --rows {' '.join(map(str, args.rows))} "
        f"--reps {args.reps}` (CPU tier {cpu_isa()})",
        f"- versions: kvpage-kernels {kvpage_kernels.__version__}, torch {torch.__version__}",
        "- SmolLM2-135M's linear layers (30 x qkv, o, gate_up, down, and the output layer), "
        "random weights streamed from memory; ms per step, medians",
        "",
        "| format | rows | MB streamed | qkv | o | gate_up | down | output | step | vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['format']} | {r['rows']} | {r['mb_per_step']:.0f} | {r['qkv_ms']:.1f} | "
            f"{r['o_ms']:.1f} | {r['gate_up_ms']:.1f} | {r['down_ms']:.1f} | "
            f"{r['output_ms']:.1f} | **{r['step_ms']:.1f}** | "
            f"{r['step_ms'] / fp32[r['rows']]:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
