"""kvpage-kernels' packed GEMM per decode step: fp32 panels against 4- and 8-bit weights.

SmolLM2-135M's linear layers (in -> out: 576 -> 960 qkv, 576 -> 576 o, 576 -> 3072 gate_up,
1536 -> 576 down, 30 layers each, and the 576 -> 49152 output layer), every layer a weight
of its own so that each step streams them from memory as a decode step does. The weights
are random, packed once with ``pack_weight``: fp32 panels, and ``QuantizedWeight`` codes of
4 bits in groups of 32 (GGUF Q4_0/Q4_1's layout) and 8 bits in groups of 32 (Q8_0's), and
on the CPU the 4-bit ones with int8 activations (``with_int8_activations``).
``packed_linear`` on the cpu backend at 1, 16 and 64 rows: the median over the repetitions
of the time of one step through every layer, in ms, and the bytes each format streams per
step. Run once per CPU tier (``KVPAGE_CPU_ISA=avx2`` for the AVX2 paths; add the switches of
bench/machine.py to hold torch's libraries back too).

``--device cuda`` measures the triton backend's low-bit GEMM on the GPU, bf16 activations,
against dense weights in bf16 (``F.linear``, cuBLAS), on Llama-3-8B's layers (4096 -> 6144 qkv, 4096 -> 4096
o, 4096 -> 28672 gate_up, 14336 -> 4096 down, 32 layers, and a 4096 -> 128256 output layer),
each figure the median replay of a CUDA graph of those calls: the kernels' own time, without
the cost of launching them from Python.

    python bench/gemm.py [--rows 1 16 64] [--reps 9] [--json] [--results bench/RESULTS.md]
                         [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import kvpage_kernels
import machine
import torch
import torch.nn.functional as F
from kvpage_kernels import QuantizedWeight, pack_weight, packed_linear
from kvpage_kernels.cpu_isa import cpu_isa

GROUP = 32
SHAPE_NAMES = ("qkv", "o", "gate_up", "down")


@dataclass
class Model:
    """The linear layers of one decode step: (in, out) of each shape, layers, output layer."""

    name: str
    shapes: tuple[tuple[int, int], ...]
    layers: int
    output: tuple[int, int]


SMOLLM2 = Model("SmolLM2-135M", ((576, 960), (576, 576), (576, 3072), (1536, 576)), 30,
                (576, 49152))
LLAMA3_8B = Model("Llama-3-8B", ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)),
                  32, (4096, 128256))


def quantized(out_features: int, in_features: int, bits: int, device: str):
    groups = in_features // GROUP
    return QuantizedWeight(
        codes=torch.randint(0, 2**bits, (out_features, in_features), dtype=torch.uint8,
                            device=device),
        scales=torch.rand(out_features, groups, device=device) * 0.01,
        offsets=torch.randn(out_features, groups, device=device) * 0.01,
        bits=bits, group_size=GROUP)


class Dense:
    """A bf16 weight multiplied with F.linear: the GPU's dense baseline."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.in_features = weight.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def weights(fmt: str, model: Model, device: str) -> list[tuple[str, object, int]]:
    """(shape name, weight, bytes streamed) for every layer of a step, in order."""
    torch.manual_seed(0)
    shapes = [(name, shape) for _ in range(model.layers)
              for name, shape in zip(SHAPE_NAMES, model.shapes, strict=True)]
    packed = []
    for name, (in_features, out_features) in [*shapes, ("output", model.output)]:
        if fmt in ("fp32", "bf16"):
            dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
            w = torch.randn(out_features, in_features, dtype=dtype, device=device)
            w = pack_weight(w) if fmt == "fp32" else Dense(w)
            size = w.nbytes if fmt == "fp32" else 2 * in_features * out_features
        else:
            bits = int(fmt.split("-")[0])
            w = pack_weight(quantized(out_features, in_features, bits, device))
            if fmt.endswith("int8 activations"):
                w = w.with_int8_activations()
            size = in_features * out_features * bits // 8 + 8 * out_features * (
                in_features // GROUP)
        packed.append((name, w, size))
    return packed


def step_parts(layers: list[tuple[str, object, int]], rows: int, device: str) -> dict:
    """{"step_ms": a call through every layer, "<shape>_ms": through that shape's layers}."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # w4a16 on the GPU
    inputs = {n: torch.randn(rows, w.in_features, device=device, dtype=dtype)
              for n, w, _ in layers[:5] + layers[-1:]}
    by_shape = {name: [layer for layer in layers if layer[0] == name]
                for name in [*SHAPE_NAMES, "output"]}

    def run(subset: list[tuple[str, object, int]]) -> None:
        for name, w, _ in subset:
            w(inputs[name]) if isinstance(w, Dense) else packed_linear(inputs[name], w)

    return {"step_ms": lambda: run(layers),
            **{f"{name}_ms": lambda s=subset: run(s) for name, subset in by_shape.items()}}


def measure_on_cpu(formats: list[str], model: Model, rows_list: list[int], reps: int) -> list:
    """Every format held at once, the repetitions of every (format, rows, part) interleaved
    (a round through all of them per repetition, the first a warm-up), so that a shared, noisy
    machine's slow spells fall on every format alike; median ms of each."""
    held = {fmt: weights(fmt, model, "cpu") for fmt in formats}
    runs = {(fmt, rows): step_parts(layers, rows, "cpu")
            for fmt, layers in held.items() for rows in rows_list}
    samples: dict = {key: {part: [] for part in parts} for key, parts in runs.items()}
    for rep in range(reps + 1):
        for key, parts in runs.items():
            for part, fn in parts.items():
                start = time.perf_counter()
                fn()
                if rep:
                    samples[key][part].append(1e3 * (time.perf_counter() - start))
    return [{"format": fmt, "rows": rows, "mb_per_step": streamed_mb(held[fmt]),
             **{part: statistics.median(times) for part, times in samples[fmt, rows].items()}}
            for fmt, rows in runs]


def measure_on_gpu(formats: list[str], model: Model, rows_list: list[int], reps: int) -> list:
    """One format at a time in the GPU's memory; each part the median replay of its graph."""
    results = []
    for fmt in formats:
        layers = weights(fmt, model, "cuda")
        for rows in rows_list:
            parts = step_parts(layers, rows, "cuda")
            results.append({"format": fmt, "rows": rows, "mb_per_step": streamed_mb(layers),
                            **{part: 1e3 * time_on_gpu(fn, reps) for part, fn in parts.items()}})
        del layers
        torch.cuda.empty_cache()
    return results


def streamed_mb(layers: list[tuple[str, object, int]]) -> float:
    return sum(size for _, _, size in layers) / 1e6


def time_on_gpu(fn, reps: int) -> float:
    """Median seconds of ``fn`` captured in a CUDA graph and replayed: the kernels' own time,
    without Python's cost of launching each one."""
    fn()  # compiles the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(reps + 1):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--results", type=Path, help="append a markdown section to this file")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    backend = kvpage_kernels.select_backend(args.device)
    if args.device == "cpu" and backend != "cpu":
        raise SystemExit("the cpu kernel backend is not available (no C++ compiler?)")
    model, baseline = (SMOLLM2, "fp32") if args.device == "cpu" else (LLAMA3_8B, "bf16")
    if args.device == "cpu":
        formats = [baseline, "4-bit", "4-bit int8 activations", "8-bit"]
        results = measure_on_cpu(formats, model, args.rows, args.reps)
    else:
        results = measure_on_gpu([baseline, "4-bit", "8-bit"], model, args.rows, args.reps)
    args.model, args.baseline, args.backend = model, baseline, backend
    text = markdown(results, args)
    print(json.dumps(results) if args.json else text)
    if args.results:
        with args.results.open("a") as f:
            f.write(text)


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    base = {r["rows"]: r["step_ms"] for r in results if r["format"] == args.baseline}
    where = (f"{torch.cuda.get_device_name()}, {args.backend} backend" if args.device == "cuda"
             else f"CPU tier {cpu_isa()}")
    lines = [
        f"\n## gemm.py — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n",
        f"- machine: {machine.describe()}" + (f"; GPU {where}" if args.device == "cuda" else ""),
        f"- command: `python bench/gemm.py --rows {' '.join(map(str, args.rows))} "
        f"--reps {args.reps} --device {args.device}` ({where})",
        f"- versions: kvpage-kernels {kvpage_kernels.__version__}, torch {torch.__version__}",
        f"- {args.model.name}'s linear layers ({args.model.layers} x qkv, o, gate_up, down, and "
        "the output layer), random weights streamed from memory; ms per step, medians",
        "",
        f"| format | rows | MB streamed | qkv | o | gate_up | down | output | step | vs "
        f"{args.baseline} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['format']} | {r['rows']} | {r['mb_per_step']:.0f} | {r['qkv_ms']:.1f} | "
            f"{r['o_ms']:.1f} | {r['gate_up_ms']:.1f} | {r['down_ms']:.1f} | "
            f"{r['output_ms']:.1f} | **{r['step_ms']:.1f}** | "
            f"{r['step_ms'] / base[r['rows']]:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
