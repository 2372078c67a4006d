"""Paged attention kernels: speed against the reference and against SDPA on contiguous K/V.

CPU (always): the torch backend and the compiled cpu backend (when a compiler is present)
against the reference backend and against F.scaled_dot_product_attention on contiguous
(padded) K/V, for decode and prefill at a few shapes including SmolLM2-135M's (9 q heads,
3 kv heads, head_dim 64) at 64 sequences.
GPU (when CUDA is present): device copy bandwidth; paged decode achieved bandwidth at
Llama-3-8B shapes (32 q heads, 8 kv heads, d 128, block 16) for each GPU backend, batch
1/16/64/256 x context 512/2k/8k, against SDPA on contiguous K/V; prefill TFLOP/s.

    python bench/kernels.py [--json] [--append-results bench/RESULTS.md] [--quick] [--gpu-only]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kvpage_kernels import paged_attention, select_backend


@dataclass
class Shape:
    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 16


SMOLLM2 = Shape("SmolLM2-135M", 9, 3, 64)
LLAMA3_8B = Shape("Llama-3-8B", 32, 8, 128)


@dataclass
class Batch:
    """A paged batch plus the same K/V laid out contiguously ([seqs, kv_heads, ctx, d],
    padded to the longest context) for the SDPA baseline."""
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_seq_len: int
    max_query_len: int
    keys: torch.Tensor
    values: torch.Tensor

    def paged(self, backend: str) -> torch.Tensor:
        return paged_attention(self.q, self.k_cache, self.v_cache, self.block_tables,
                               self.seq_lens, self.query_start_loc, self.q.shape[-1] ** -0.5,
                               max_seq_len=self.max_seq_len, max_query_len=self.max_query_len,
                               backend=backend)


def make_batch(shape: Shape, seq_lens: list[int], q_lens: list[int], dtype, device) -> Batch:
    bs, hkv, d = shape.block_size, shape.num_kv_heads, shape.head_dim
    blocks_per_seq = [(n + bs - 1) // bs for n in seq_lens]
    num_blocks = sum(blocks_per_seq)
    perm = torch.randperm(num_blocks, device=device).to(torch.int32)
    max_blocks = max(blocks_per_seq)
    tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32, device=device)
    k_cache = torch.randn(num_blocks, bs, hkv, d, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    max_len = max(seq_lens)
    keys = torch.zeros(len(seq_lens), hkv, max_len, d, dtype=dtype, device=device)
    values = torch.zeros_like(keys)
    used = 0
    for i, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq, strict=True)):
        ids = perm[used:used + nb]
        used += nb
        tables[i, :nb] = ids
        keys[i, :, :n] = k_cache[ids.long()].flatten(0, 1)[:n].transpose(0, 1)
        values[i, :, :n] = v_cache[ids.long()].flatten(0, 1)[:n].transpose(0, 1)
    q = torch.randn(sum(q_lens), shape.num_heads, d, dtype=dtype, device=device)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32,
                          device=device)
    return Batch(q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32,
                 device=device), starts, max_len, max(q_lens), keys, values)


def sdpa_decode(batch: Batch) -> Callable[[], torch.Tensor]:
    """Baseline: one SDPA call over contiguous padded K/V with a length mask."""
    seqs, hkv, ctx, d = batch.keys.shape
    group = batch.q.shape[1] // hkv
    q = batch.q.view(seqs, hkv, group, d)
    mask = (torch.arange(ctx, device=q.device) < batch.seq_lens[:, None]).view(seqs, 1, 1, ctx)
    return lambda: F.scaled_dot_product_attention(q, batch.keys, batch.values, attn_mask=mask)


def sdpa_prefill(batch: Batch) -> Callable[[], torch.Tensor]:
    """Baseline: causal SDPA per sequence over contiguous K/V (a chunk after a cached context
    with its causal mask aligned to the end of the context)."""
    starts = batch.query_start_loc.tolist()
    lens = batch.seq_lens.tolist()
    masks = {}
    for i, n in enumerate(lens):
        q_len = starts[i + 1] - starts[i]
        if q_len < n:
            positions = torch.arange(n)
            masks[i] = positions <= positions[n - q_len:].unsqueeze(1)

    def run():
        for i, n in enumerate(lens):
            q = batch.q[starts[i]:starts[i + 1]].transpose(0, 1).unsqueeze(0)
            F.scaled_dot_product_attention(q, batch.keys[i:i + 1, :, :n],
                                           batch.values[i:i + 1, :, :n], attn_mask=masks.get(i),
                                           is_causal=i not in masks, enable_gqa=True)
    return run


def time_cpu(fns: dict[str, Callable[[], object]], min_reps: int = 3,
             budget_s: float = 2.0) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin so that a
    change of load on a shared machine hits every contender alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    deadline = time.perf_counter() + budget_s
    while min(map(len, times.values())) < min_reps or (
            time.perf_counter() < deadline and len(times[next(iter(fns))]) < 50):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def time_cuda(fn: Callable[[], object], reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def cpu_cases(quick: bool) -> list[tuple[str, Shape, list[int], list[int], torch.dtype]]:
    rng = random.Random(0)
    smol_ctx = [rng.randint(100, 300) for _ in range(64)]
    cases = [
        ("decode 64 seqs ctx 100-300", SMOLLM2, smol_ctx, [1] * 64, torch.float32),
        ("decode 64 seqs ctx 100-300", SMOLLM2, smol_ctx, [1] * 64, torch.bfloat16),
        ("prefill 1 x 512", SMOLLM2, [512], [512], torch.float32),
        ("prefill 4 x 256", SMOLLM2, [256] * 4, [256] * 4, torch.float32),
        ("prefill 16 x 40", SMOLLM2, [40] * 16, [40] * 16, torch.float32),
    ]
    if not quick:
        cases += [
            ("prefill 1 x 2048", SMOLLM2, [2048], [2048], torch.float32),
            ("chunk of 256 after 1792 cached", SMOLLM2, [2048], [256], torch.float32),
            ("chunk of 1024 after 3072 cached", SMOLLM2, [4096], [1024], torch.float32),
            ("decode 16 seqs ctx 1024", LLAMA3_8B, [1024] * 16, [1] * 16, torch.float32),
            ("prefill 1 x 1024", LLAMA3_8B, [1024], [1024], torch.bfloat16),
        ]
    return cases


def cpu_backend_available() -> bool:
    try:
        return select_backend("cpu", "cpu") == "cpu"
    except Exception:  # no compiler: the compiled backend is simply not measured
        return False


def run_cpu(quick: bool) -> list[dict]:
    rows = []
    compiled = cpu_backend_available()
    for label, shape, seq_lens, q_lens, dtype in cpu_cases(quick):
        batch = make_batch(shape, seq_lens, q_lens, dtype, "cpu")
        decode = max(q_lens) == 1
        contenders = {"torch": lambda b=batch: b.paged("torch"),
                      "sdpa": sdpa_decode(batch) if decode else sdpa_prefill(batch)}
        if compiled:
            contenders["cpu"] = lambda b=batch: b.paged("cpu")
        fast = time_cpu(contenders)
        t_torch, t_sdpa = fast["torch"], fast["sdpa"]
        t_ref = time_cpu({"ref": lambda b=batch: b.paged("reference")}, 1, 0)["ref"]
        row = {"case": label, "model_shape": shape.name, "dtype": str(dtype)[6:],
               "torch_ms": t_torch * 1e3, "sdpa_contiguous_ms": t_sdpa * 1e3,
               "reference_ms": t_ref * 1e3, "torch_vs_sdpa": t_torch / t_sdpa,
               "reference_vs_torch": t_ref / t_torch}
        if compiled:
            row.update(cpu_ms=fast["cpu"] * 1e3, cpu_vs_sdpa=fast["cpu"] / t_sdpa)
        rows.append(row)
    return rows


def timer(device: str) -> Callable[[Callable[[], object]], float]:
    if device == "cuda":
        return time_cuda
    return lambda fn: time_cpu({"fn": fn}, 1, 0.2)["fn"]


def copy_bandwidth(device: str, numel: int = 2**30) -> float:
    """GB/s of a device-to-device copy (bytes read + written)."""
    src = torch.empty(numel, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / timer(device)(lambda: dst.copy_(src)) / 1e9


def gpu_backends(device: str) -> list[str]:
    names = []
    for name in ("triton", "cupy", "torch"):
        try:
            select_backend(device, name)
            names.append(name)
        except Exception:  # an unavailable backend is simply not measured
            continue
    return names


def run_gpu(batches: list[int], contexts: list[int], prefills: list[tuple[int, int]],
            device: str = "cuda", shape: Shape = LLAMA3_8B) -> dict:
    """Decode bandwidth and prefill TFLOP/s of each available backend and of SDPA on
    contiguous K/V (bf16). The sizes are arguments so that a CPU run can smoke-test it."""
    measure = timer(device)
    backends = gpu_backends(device)
    copy_gbs = copy_bandwidth(device, 2**30 if device == "cuda" else 2**24)
    decode = []
    for num_seqs in batches:
        for ctx in contexts:
            batch = make_batch(shape, [ctx] * num_seqs, [1] * num_seqs, torch.bfloat16, device)
            kv_bytes = 2 * batch.keys.numel() * batch.keys.element_size()
            row = {"batch": num_seqs, "ctx": ctx,
                   "sdpa_contiguous_gbs": kv_bytes / measure(sdpa_decode(batch)) / 1e9}
            for name in backends:
                gbs = kv_bytes / measure(lambda b=batch, n=name: b.paged(n)) / 1e9
                row[f"{name}_gbs"] = gbs
                row[f"{name}_of_copy"] = gbs / copy_gbs
            decode.append(row)
            del batch
    prefill = []
    for num_seqs, length in prefills:
        batch = make_batch(shape, [length] * num_seqs, [length] * num_seqs, torch.bfloat16,
                           device)
        flops = 4 * num_seqs * shape.num_heads * shape.head_dim * length * length / 2
        row = {"seqs": num_seqs, "len": length,
               "sdpa_contiguous_tflops": flops / measure(sdpa_prefill(batch)) / 1e12}
        for name in backends:
            row[f"{name}_tflops"] = flops / measure(lambda b=batch, n=name: b.paged(n)) / 1e12
        prefill.append(row)
        del batch
    name = torch.cuda.get_device_name() if device == "cuda" else device
    return {"device": name, "copy_gbs": copy_gbs, "decode": decode, "prefill": prefill}


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{row.get(k, ''):.3g}" if isinstance(row.get(k), float)
                         else str(row.get(k, "")) for k in keys))


def markdown_section(result: dict, command: str) -> str:
    lines = [f"\n## kvpage-kernels: paged attention ({result['date']})\n",
             f"- Machine: {result['machine']}", f"- Command: `{command}`",
             f"- torch {result['torch']}, {result['threads']} thread(s); median times, the "
             "backends and SDPA interleaved call by call (cpu: the compiled backend)\n",
             "| case | shape | dtype | torch backend ms | cpu backend ms | SDPA contiguous ms "
             "| reference ms | torch / SDPA | cpu / SDPA | reference / torch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    if not result["cpu"]:
        del lines[-2:]
    for r in result["cpu"]:
        cpu_ms, cpu_ratio = r.get("cpu_ms"), r.get("cpu_vs_sdpa")
        lines.append(f"| {r['case']} | {r['model_shape']} | {r['dtype']} | {r['torch_ms']:.2f} "
                     f"| {'-' if cpu_ms is None else f'{cpu_ms:.2f}'} "
                     f"| {r['sdpa_contiguous_ms']:.2f} | {r['reference_ms']:.1f} "
                     f"| {r['torch_vs_sdpa']:.2f} "
                     f"| {'-' if cpu_ratio is None else f'{cpu_ratio:.2f}'} "
                     f"| {r['reference_vs_torch']:.1f} |")
    if "gpu" in result:
        lines += gpu_markdown(result["gpu"])
    return "\n".join(lines) + "\n"


def gpu_markdown(gpu: dict) -> list[str]:
    """The GPU tables: decode GB/s of K/V read per second (and its fraction of the device's
    copy bandwidth), prefill TFLOP/s, each backend beside SDPA on contiguous K/V."""
    backends = [k[:-4] for k in gpu["decode"][0] if k.endswith("_gbs") and k != "copy_gbs"
                and not k.startswith("sdpa")] if gpu["decode"] else []
    lines = ["", f"GPU: {gpu['device']}, device copy {gpu['copy_gbs']:.0f} GB/s; Llama-3-8B "
             "shapes (32 q heads, 8 kv heads, d 128, block 16), bf16.", "",
             "| decode batch | context | " + " | ".join(f"{b} GB/s (of copy)" for b in backends)
             + " | SDPA contiguous GB/s |",
             "|---|---|" + "---|" * (len(backends) + 1)]
    for r in gpu["decode"]:
        cells = [f"{r[f'{b}_gbs']:.0f} ({r[f'{b}_of_copy']:.2f})" for b in backends]
        lines.append(f"| {r['batch']} | {r['ctx']} | " + " | ".join(cells)
                     + f" | {r['sdpa_contiguous_gbs']:.0f} |")
    lines += ["", "| prefill seqs x len | " + " | ".join(f"{b} TFLOP/s" for b in backends)
              + " | SDPA contiguous TFLOP/s |", "|---|" + "---|" * (len(backends) + 1)]
    for r in gpu["prefill"]:
        cells = [f"{r[f'{b}_tflops']:.0f}" for b in backends]
        lines.append(f"| {r['seqs']} x {r['len']} | " + " | ".join(cells)
                     + f" | {r['sdpa_contiguous_tflops']:.0f} |")
    return lines


RESULTS_HEADER = ("# Benchmark results\n\nEach benchmark in bench/ appends a section: date, "
                  "machine, command, versions and its figures.\n")


def append_results(path: str, section: str) -> None:
    """Appends `section`, creating the file with a short header if it does not exist."""
    try:
        with open(path, "x") as f:
            f.write(RESULTS_HEADER)
    except FileExistsError:
        pass
    with open(path, "a") as f:
        f.write(section)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--machine", default=platform.processor() or platform.machine(),
                        help="machine description recorded with the results")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU figures")
    parser.add_argument("--append-results", metavar="PATH",
                        help="append the CPU figures as a markdown section to PATH")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {"date": datetime.date.today().isoformat(), "machine": args.machine,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": [] if args.gpu_only else run_cpu(args.quick)}
    print_table(result["cpu"])
    if torch.cuda.is_available():
        batches = [1, 16, 64] if args.quick else [1, 16, 64, 256]
        result["gpu"] = run_gpu(batches, [512, 2048, 8192], [(1, 4096), (8, 1024)])
        print(f"\n{result['gpu']['device']}: copy {result['gpu']['copy_gbs']:.0f} GB/s")
        print_table(result["gpu"]["decode"])
        print_table(result["gpu"]["prefill"])
    if args.append_results:
        command = shlex.join(["python", "bench/kernels.py",
                              *(argv if argv is not None else sys.argv[1:])])
        append_results(args.append_results, markdown_section(result, command))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
