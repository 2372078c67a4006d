"""Quantized weights on the default model: memory, load time and decode speed, low-bit against
dense.

The default model (SmolLM2-135M-Instruct, Q4_1 GGUF with a Q8_0 embedding table) loaded five
ways: low-bit (the default: weights packed as they are stored) with fp32 activations, with
bf16 ones (AVX512-BF16 dot products from a few rows on, where the CPU has them) and with int8
ones (the opt-in ``int8_activations``: the 4-bit layers' inputs rounded to int8), dense fp32
and dense bf16 (``quantization="none"``: every tensor dequantized at load). Figures, side by
side in one run:

- resident weight bytes (``resident_weight_bytes``: parameters and the packs multiplied by);
- load time, cold (the converted-model cache entry removed first) and warm (read from the
  cache), each ``load_model`` call in a fresh process;
- single-stream decode tok/s: one request at a time over the first prompts of the workload,
  1 / median time per output token after the first (as the serving benchmark's TPOT), and
  the fraction of the memory bound: tok/s x bytes read per token (the weights multiplied by,
  in the form they are stored) / the stream bandwidth measured in this run;
- with ``--llama-server PATH``, single-stream decode against llama.cpp's ``llama-server -np 1``
  on the same GGUF, driven as bench/serving.py drives it (kvpage runs in this process,
  llama-server over HTTP), in ``--rounds`` rounds taking turns (the low-bit setups with fp32
  and int8 activations, then llama-server, each over the same prompts), so that the host's
  slow spells fall on all of them alike: each round's tok/s and ratio, and the medians;
- batch throughput: the 64-prompt chat workload (bench/workload_chat64.json, 128 tokens each,
  greedy, ignore_eos) in one ``LLM.generate``, against the dense bf16 path.

    python bench/quant.py [--quick] [--llama-server PATH] [--rounds N] [--json]
                          [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import kvpage_runtime
import machine
import serving
import torch
from kvpage_runtime import LLM, SamplingParams
from kvpage_runtime.layers.linear import Linear
from kvpage_runtime.loaders import cache
from kvpage_runtime.loaders.default_model import default_model_path

WORKLOAD = Path(__file__).with_name("workload_chat64.json")


@dataclass(frozen=True)
class Setup:
    """One way of loading the default model."""

    name: str
    dtype: str
    quantization: str | None  # None: the checkpoint's low-bit blocks; "none": dense
    int8_activations: bool = False

    @property
    def low_bit(self) -> bool:
        return self.quantization is None


SETUPS = (Setup("low-bit fp32", "float32", None), Setup("low-bit bf16", "bfloat16", None),
          Setup("low-bit int8 activations", "float32", None, int8_activations=True),
          Setup("dense fp32", "float32", "none"), Setup("dense bf16", "bfloat16", "none"))
BASELINE = "dense bf16"  # what batch throughput is compared with


@dataclass(frozen=True)
class Slice:
    """How much of the workload one run uses."""

    batch_prompts: int
    max_tokens: int
    single_prompts: int


FULL = Slice(batch_prompts=64, max_tokens=128, single_prompts=4)
QUICK = Slice(batch_prompts=8, max_tokens=16, single_prompts=2)

# Run in a fresh process: one load_model call, timed, and the weights' resident bytes.
_LOAD_SCRIPT = """
import json, sys, time
from kvpage_runtime.loaders import load_model
from kvpage_runtime.models.weights import resident_weight_bytes
started = time.perf_counter()
loaded = load_model(None, dtype=sys.argv[1], quantization=None if sys.argv[2] == "-" else sys.argv[2],
                    int8_activations=sys.argv[3] == "1")
seconds = time.perf_counter() - started
print(json.dumps({"load_s": seconds, "weight_bytes": resident_weight_bytes(loaded.model)}))
"""


def load_in_fresh_process(setup: Setup) -> dict:
    out = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, setup.dtype,
                          setup.quantization or "-", str(int(setup.int8_activations))],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_loads(setup: Setup) -> dict:
    """Cold (cache entry removed: the GGUF is converted) and warm (read from the cache) loads."""
    shutil.rmtree(cache.entry_dir(default_model_path(), setup.low_bit), ignore_errors=True)
    cold = load_in_fresh_process(setup)
    warm = load_in_fresh_process(setup)
    return {"weight_bytes": warm["weight_bytes"], "load_cold_s": cold["load_s"],
            "load_warm_s": warm["load_s"]}


def stream_bandwidth(size_bytes: int = 1 << 30, reps: int = 5) -> float:
    """Bytes/s of reading a tensor much larger than the caches (the median of ``reps`` sums)."""
    x = torch.ones(size_bytes // 4)
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - started)
    return size_bytes / statistics.median(times)


def bytes_per_token(llm: LLM) -> int:
    """Weight bytes one decode step reads: every linear layer's weight in the form it is
    multiplied by (its pack where it has one), the embedding table once as the LM head."""
    total = 0
    for module in llm.engine.runner.model.modules():
        if isinstance(module, Linear):
            packed = getattr(module, "packed", None)
            total += packed.nbytes if hasattr(packed, "nbytes") else module.weight.nbytes
    return total


def decode_rate(outputs) -> float:
    """Output tokens/s after the first token, the median over requests."""
    rates = [(len(o.outputs[0].token_ids) - 1) / (o.metrics.last_token_time
                                                   - o.metrics.first_token_time)
             for o in outputs if len(o.outputs[0].token_ids) > 1]
    return statistics.median(rates)


def single_requests(llm: LLM, prompts: list[str], max_tokens: int) -> list:
    """The prompts sent one at a time, each decoding max_tokens (greedy, ignore_eos)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]


def load_llm(setup: Setup) -> LLM:
    llm = LLM(dtype=setup.dtype, quantization=setup.quantization,
              int8_activations=setup.int8_activations)
    warmup = [llm.apply_chat_template([{"role": "user", "content": "Hello"}])] * 2
    llm.generate(warmup, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    return llm


def run_setup(setup: Setup, conversations: list[list[dict]], s: Slice) -> dict:
    """Single-stream decode and batch throughput of one setup, in this process."""
    llm = load_llm(setup)
    prompts = [llm.apply_chat_template(c) for c in conversations[:s.batch_prompts]]
    single = single_requests(llm, prompts[:s.single_prompts], s.max_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=s.max_tokens, ignore_eos=True)
    started = time.perf_counter()
    batch = llm.generate(prompts[:s.batch_prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    result = {"single_tok_s": decode_rate(single), "bytes_per_token": bytes_per_token(llm),
              "batch_tok_s": sum(len(o.outputs[0].token_ids) for o in batch) / elapsed}
    del llm
    gc.collect()
    return result


def gguf_tensor_bytes(path: Path) -> int:
    """The bytes of the GGUF file's tensors (what llama.cpp reads per token, the tied table
    included)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


LLAMA = "llama-server -np 1"
CONTENDERS = ("low-bit fp32", "low-bit int8 activations")  # against llama-server, in turns


def single_stream_in_turns(binary: str, conversations: list[list[dict]], s: Slice,
                           rounds: int) -> dict[str, list[float]]:
    """{contender: its single-stream tok/s in each round}: the CONTENDERS (in this process)
    and llama-server -np 1 on the default GGUF (as bench/serving.py measures it) taking
    turns over the same prompts, round after round."""
    llms = {setup.name: load_llm(setup) for setup in SETUPS if setup.name in CONTENDERS}
    prompts = [next(iter(llms.values())).apply_chat_template(c)
               for c in conversations[:s.single_prompts]]
    (serving.HERE / "out").mkdir(exist_ok=True)
    port = serving.free_port()
    command = serving.llama_command(binary, port, default_model_path(), 1, 1024, ["--no-repack"])
    args = argparse.Namespace(warmup=1, max_tokens=s.max_tokens, concurrency=1,
                              request_rate=float("inf"), api_key=None)
    rates: dict[str, list[float]] = {name: [] for name in [*llms, LLAMA]}
    with serving.launched("llama-server", command, port) as url:
        for round_index in range(rounds):
            for name, llm in llms.items():
                rates[name].append(decode_rate(single_requests(llm, prompts, s.max_tokens)))
            summary = serving.measure("llama-server", url, None,
                                      conversations[:s.single_prompts], args)
            rates[LLAMA].append(1 / summary["tpot_p50_s"])
            args.warmup = 0  # the first round's warm-up request is enough
            print(f"round {round_index + 1}: " + ", ".join(
                f"{name} {r[-1]:.1f}" for name, r in rates.items()), file=sys.stderr)
    return rates


def turns_report(rates: dict[str, list[float]]) -> str:
    """Each contender's tok/s per round and median, and its ratio to llama-server's (per
    round, and of the medians)."""
    llama = rates[LLAMA]
    lines = ["| single stream, rounds taking turns | tok/s per round | median tok/s "
             "| x llama-server per round | x llama-server (medians) |", "|---|---|---|---|---|"]
    for name, r in rates.items():
        per_round = " / ".join(f"{v:.1f}" for v in r)
        ratios = " / ".join(f"{v / w:.2f}" for v, w in zip(r, llama, strict=True))
        ratio = statistics.median(r) / statistics.median(llama)
        lines.append(f"| {name} | {per_round} | {statistics.median(r):.1f} | {ratios} "
                     f"| **{ratio:.2f}** |")
    return "\n".join(lines)


def report(rows: dict[str, dict], bandwidth: float) -> str:
    base = rows[BASELINE]["batch_tok_s"]
    lines = [
        "| setup | weight bytes (MB) | load cold / warm (s) | single-stream tok/s "
        "| bytes per token (MB) | fraction of memory bound | batch tok/s | x dense bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        bound = bandwidth / r["bytes_per_token"]
        loads = (f"{r['load_cold_s']:.2f} / {r['load_warm_s']:.2f}" if "load_cold_s" in r
                 else "-")
        weights = f"{r['weight_bytes'] / 1e6:.1f}" if "weight_bytes" in r else "-"
        batch = (f"{r['batch_tok_s']:.1f} | {r['batch_tok_s'] / base:.2f}" if "batch_tok_s" in r
                 else "- | -")
        lines.append(f"| {name} | {weights} | {loads} | {r['single_tok_s']:.1f} "
                     f"| {r['bytes_per_token'] / 1e6:.1f} | {r['single_tok_s'] / bound:.2f} "
                     f"| {batch} |")
    lines.append(f"\nstream bandwidth measured in this run: {bandwidth / 1e9:.1f} GB/s")
    return "\n".join(lines)


def results_section(table: str, command: str, workload: str) -> str:
    versions = (f"kvpage-runtime {kvpage_runtime.__version__}, torch {torch.__version__}, "
                f"python {platform.python_version()}")
    return "\n".join([
        f"\n## quant.py — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n",
        f"- machine: {machine.describe()}, {torch.get_num_threads()} torch threads",
        f"- command: `{command}`",
        f"- versions: {versions}",
        f"- workload: {workload}",
        "",
        table,
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 prompts x 16 tokens")
    parser.add_argument("--llama-server", help="a llama-server binary to compare single-stream")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of single-stream turns against llama-server (default: 3)")
    parser.add_argument("--json", action="store_true", help="print {setup: figures} as JSON")
    parser.add_argument("--results", type=Path, help="append a markdown section to this file")
    args = parser.parse_args()
    s = QUICK if args.quick else FULL
    conversations = json.loads(WORKLOAD.read_text())["conversations"]
    rows = {setup.name: measure_loads(setup) for setup in SETUPS}
    for setup in SETUPS:
        rows[setup.name].update(run_setup(setup, conversations, s))
    turns = {}
    if args.llama_server:
        turns = single_stream_in_turns(args.llama_server, conversations, s, args.rounds)
        rows[LLAMA] = {"single_tok_s": statistics.median(turns[LLAMA]),
                       "bytes_per_token": gguf_tensor_bytes(default_model_path())}
    bandwidth = stream_bandwidth()
    table = report(rows, bandwidth) + ("\n\n" + turns_report(turns) if turns else "")
    print(json.dumps({"stream_bandwidth": bandwidth, **rows, "single_stream_in_turns": turns},
                     indent=1) if args.json else table)
    if args.results:
        command = "python bench/quant.py" + " --quick" * args.quick + (
            f" --llama-server llama-server --rounds {args.rounds}" if args.llama_server else "")
        workload = (f"{WORKLOAD.name}: batch of {s.batch_prompts} prompts x {s.max_tokens} "
                    f"tokens, single-stream over the first {s.single_prompts}; greedy, ignore_eos")
        with args.results.open("a") as f:
            f.write(results_section(table, command, workload))


if __name__ == "__main__":
    main()
