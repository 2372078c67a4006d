"""KV-cache simulation: kvpage-cache driven by a ShareGPT-like request mix, no model.

Reports:
1. KV memory utilization, tokens held / (blocks allocated x block size), averaged over the
   steps of a continuous-batching run under a fixed token budget, for block sizes 8, 16, 32.
2. Requests served concurrently in that run (block size 16) against contiguous allocation of
   max_model_len slots per request in the same memory.
3. A 512-token system prompt shared by 100 requests: prefix-hit rate and blocks saved.
4. Parallel sampling, n=4 on a 500-token prompt with 200 output tokens each: blocks used with
   fork (copy-on-write) against four independent copies, and the ideal.
5. Sliding window (Mistral's): one request grown to 8192 tokens (a 1024-token prompt in
   512-token chunks, then decode) through kvpage-sched's scheduler with a 4096-token window:
   the blocks it holds at the end and at the peak, against the same request without a window.
6. Speed: block allocate+free operations per second, allocate_slots per decode step,
   lookup_prefix (a new request's, and the same request's again) and commit_full_blocks
   per 1k tokens.

Request mix: prompt and output lengths are log-normal, rounded and clipped to 1..1024
(prompt mu=4.58 sigma=1.0, median 98; output mu=5.32 sigma=1.0, median 204). The unclipped
means, 161 and 338 tokens, are those reported for ShareGPT in the vLLM paper. Seeded.

    python bench/cache_sim.py                          # table
    python bench/cache_sim.py --json                   # table, then one JSON object as the last line
    python bench/cache_sim.py --quick                  # small run (tests)
    python bench/cache_sim.py --record bench/RESULTS.md  # also append a results section
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import time
from collections import deque
from dataclasses import dataclass

from kvpage_cache import BlockPool, KVCacheManager
from kvpage_sched import Request, Scheduler, SchedulerConfig

MAX_MODEL_LEN = 2048


@dataclass(frozen=True)
class LogNormalLength:
    """Token counts drawn log-normally, rounded and clipped to [low, high]."""

    mu: float
    sigma: float
    low: int = 1
    high: int = 1024

    def sample(self, rng: random.Random) -> int:
        return min(self.high, max(self.low, round(rng.lognormvariate(self.mu, self.sigma))))


PROMPT_LEN = LogNormalLength(mu=4.58, sigma=1.0)
OUTPUT_LEN = LogNormalLength(mu=5.32, sigma=1.0)


@dataclass
class SimRequest:
    request_id: str
    num_tokens: int  # tokens it holds slots for when admitted (prompt, or prompt + output so far)
    outputs_left: int


def request_mix(num_requests: int, seed: int) -> list[SimRequest]:
    rng = random.Random(seed)
    return [
        SimRequest(f"r{i}", PROMPT_LEN.sample(rng), OUTPUT_LEN.sample(rng))
        for i in range(num_requests)
    ]


# ---- 1 and 2: utilization and concurrency under a fixed budget ---------------------------


@dataclass
class ServingResult:
    utilization: float  # mean over memory-bound steps of tokens held / slots allocated
    concurrency: float  # mean running requests over those steps
    steps: int
    preemptions: int


def simulate_serving(
    block_size: int, budget_tokens: int, requests: list[SimRequest], max_num_seqs: int
) -> ServingResult:
    """Continuous batching: each step every running request decodes one token (preempting the
    newest running request, to be recomputed, when a block is short), finished requests
    leave, and waiting ones are admitted while their prompt fits. Figures are averaged over
    the steps where requests were still waiting, i.e. where memory was the limit."""
    mgr = KVCacheManager(BlockPool(budget_tokens // block_size, block_size, False))
    waiting = deque(SimRequest(r.request_id, r.num_tokens, r.outputs_left) for r in requests)
    running: list[SimRequest] = []
    utilization, concurrency = [], []
    preemptions = steps = 0
    while waiting or running:
        steps += 1
        preemptions += decode_step(mgr, running, waiting)
        while waiting and len(running) < max_num_seqs:
            if mgr.allocate_slots(waiting[0].request_id, waiting[0].num_tokens) is None:
                break
            running.append(waiting.popleft())
        if waiting:
            held = sum(mgr.num_tokens(r.request_id) for r in running)
            allocated = (mgr.num_blocks - mgr.num_free_blocks) * block_size
            utilization.append(held / allocated)
            concurrency.append(len(running))
    return ServingResult(
        statistics.fmean(utilization), statistics.fmean(concurrency), steps, preemptions
    )


def decode_step(mgr: KVCacheManager, running: list[SimRequest], waiting: deque) -> int:
    """One token for every running request, oldest first; returns the preemptions."""
    preemptions = 0
    index = 0
    while index < len(running):
        request = running[index]
        if mgr.allocate_slots(request.request_id, 1) is None:
            victim = running.pop()  # the newest; when that is `request` itself, it waits
            victim.num_tokens = mgr.num_tokens(victim.request_id)
            mgr.free(victim.request_id)
            waiting.appendleft(victim)
            preemptions += 1
            continue
        request.outputs_left -= 1
        if request.outputs_left == 0:
            mgr.free(request.request_id)
            running.pop(index)
        else:
            index += 1
    return preemptions


# ---- 3: shared system prompt -----------------------------------------------------------


def shared_system_prompt(num_requests: int, system_len: int, seed: int) -> dict:
    """Requests arrive one after another, each prompt being the system prompt plus a
    ShareGPT-like user part; each is looked up, allocated and committed (computed)."""
    rng = random.Random(seed)
    system = [rng.randrange(32000) for _ in range(system_len)]
    prompts = [
        system + [rng.randrange(32000) for _ in range(PROMPT_LEN.sample(rng))]
        for _ in range(num_requests)
    ]
    block_size = 16
    mgr = KVCacheManager(BlockPool(sum(len(p) for p in prompts) // block_size + 2 * num_requests))
    for index, prompt in enumerate(prompts):
        rid = f"s{index}"
        hit = mgr.lookup_prefix(rid, prompt)
        mgr.allocate_slots(rid, len(prompt) - hit.num_tokens, hit.block_ids)
        mgr.commit_full_blocks(rid, prompt)
    blocks_without_sharing = sum(mgr.num_blocks_needed(len(p)) for p in prompts)
    blocks_used = mgr.num_blocks - mgr.num_free_blocks
    stats = mgr.stats
    return {
        "prefix_hit_rate": stats.hit_tokens / (num_requests * system_len),
        "token_hit_rate": stats.hit_rate,
        "request_hit_rate": stats.request_hit_rate,
        "blocks_used": blocks_used,
        "blocks_without_sharing": blocks_without_sharing,
        "blocks_saved": blocks_without_sharing - blocks_used,
    }


# ---- 4: parallel sampling --------------------------------------------------------------


def parallel_sampling(n: int, prompt_len: int, output_len: int, block_size: int = 16) -> dict:
    prompt = list(range(prompt_len))
    with_fork = KVCacheManager(BlockPool(1024, block_size))
    with_fork.allocate_slots("s0", prompt_len)
    with_fork.commit_full_blocks("s0", prompt)
    samples = ["s0"] + [f"s{i}" for i in range(1, n)]
    for child in samples[1:]:
        with_fork.fork("s0", child)
    copies = decode_all(with_fork, samples, output_len)

    independent = KVCacheManager(BlockPool(1024, block_size, enable_prefix_caching=False))
    for sample in samples:
        independent.allocate_slots(sample, prompt_len)
    decode_all(independent, samples, output_len)

    fork_blocks = with_fork.num_blocks - with_fork.num_free_blocks
    independent_blocks = independent.num_blocks - independent.num_free_blocks
    full_prompt_blocks = prompt_len // block_size
    own_blocks = with_fork.num_blocks_needed(prompt_len + output_len) - full_prompt_blocks
    return {
        "fork_blocks": fork_blocks,
        "fork_independent_blocks": independent_blocks,
        "fork_ideal_blocks": full_prompt_blocks + n * own_blocks,
        "fork_copy_on_write_copies": copies,
        f"fork_block_ratio_n{n}": fork_blocks / independent_blocks,
    }


def sliding_window(context: int, window: int | None, prompt_len: int = 1024,
                   chunk: int = 512, block_size: int = 16) -> dict:
    """Blocks held by one request growing to ``context`` tokens under the scheduler, with a
    sliding ``window`` (None: without); at the end and at the peak."""
    cache = KVCacheManager(BlockPool(context // block_size + 8, block_size),
                           sliding_window=window)
    scheduler = Scheduler(cache, SchedulerConfig(max_num_batched_tokens=chunk,
                                                 max_model_len=context))
    scheduler.add_request(Request("long", list(range(prompt_len)), context - prompt_len))
    peak = held = 0
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        new = {s.request_id: [7] for s in out.scheduled if not s.is_prefill_chunk}
        held = cache.num_blocks - cache.num_free_blocks  # in its last step: at the end
        peak = max(peak, held)
        scheduler.update_from_output(out, new, {})
    return {"held_at_end": held, "peak": peak}


def decode_all(mgr: KVCacheManager, request_ids: list[str], num_tokens: int) -> int:
    copies = 0
    for _ in range(num_tokens):
        for rid in request_ids:
            mgr.allocate_slots(rid, 1)
        copies += len(mgr.take_block_copies())
    return copies


# ---- 5: speed --------------------------------------------------------------------------


def best_of(repeats: int, run) -> float:
    """Smallest wall time of `repeats` runs of `run()`, in seconds (the least disturbed)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def speed(iterations: int) -> dict:
    pool = BlockPool(4096, 16)

    def allocate_and_free():
        for _ in range(iterations):
            block_ids = pool.allocate(16)
            pool.free(reversed(block_ids))

    block_ops_per_s = iterations * 32 / best_of(5, allocate_and_free)

    mgr = KVCacheManager(BlockPool(100_000, 16))
    request_ids = [f"d{i}" for i in range(1024)]
    for rid in request_ids:
        mgr.allocate_slots(rid, 100)

    def decode_step():
        for rid in request_ids:
            mgr.allocate_slots(rid, 1)

    decode_us = best_of(5, decode_step) / len(request_ids) * 1e6

    tokens = list(range(1025))  # 1024 tokens in 64 full blocks, and one to compute
    mgr.allocate_slots("p", len(tokens))
    commit_us = best_of(1, lambda: mgr.commit_full_blocks("p", tokens)) * 1e6
    lookups = max(iterations // 10, 10)
    query_ids = [f"q{i}" for i in range(lookups)]  # a new request each time: all hashed
    hit_us = best_of(5, lambda: [mgr.lookup_prefix(rid, tokens) for rid in query_ids])
    # The same request looked up again (a prompt waiting for room): its hashes are reused.
    repeat_us = best_of(5, lambda: [mgr.lookup_prefix("q", tokens) for _ in query_ids])
    miss = [-1] + tokens[1:]
    miss_us = best_of(5, lambda: [mgr.lookup_prefix(rid, miss) for rid in query_ids])
    return {
        "block_ops_per_s": block_ops_per_s,
        "decode_allocate_us": decode_us,
        "lookup_hit_us_per_1k_tokens": hit_us / lookups * 1e6,
        "lookup_repeat_us_per_1k_tokens": repeat_us / lookups * 1e6,
        "lookup_miss_us": miss_us / lookups * 1e6,
        "commit_us_per_1k_tokens": commit_us,
    }


# ---- report ----------------------------------------------------------------------------


def run(quick: bool, seed: int) -> dict:
    num_requests, budget_tokens = (300, 16384) if quick else (2000, 65536)
    requests = request_mix(num_requests, seed)
    serving = {bs: simulate_serving(bs, budget_tokens, requests, 1024) for bs in (8, 16, 32)}
    contiguous = budget_tokens // MAX_MODEL_LEN
    figures = {
        "num_requests": num_requests,
        "budget_tokens": budget_tokens,
        "mean_prompt_tokens": statistics.fmean(r.num_tokens for r in requests),
        "mean_output_tokens": statistics.fmean(r.outputs_left for r in requests),
        **{f"utilization_block{bs}": result.utilization for bs, result in serving.items()},
        "concurrency_paged": serving[16].concurrency,
        "concurrency_contiguous": contiguous,
        "concurrency_ratio_vs_contiguous": serving[16].concurrency / contiguous,
        "preemptions_block16": serving[16].preemptions,
        "steps_block16": serving[16].steps,
    }
    figures |= shared_system_prompt(100, 512, seed)
    figures |= parallel_sampling(4, 500, 200)
    windowed, full = sliding_window(8192, 4096), sliding_window(8192, None)
    figures |= {"window_blocks_end": windowed["held_at_end"], "window_blocks_peak": windowed["peak"],
                "no_window_blocks_end": full["held_at_end"], "no_window_blocks_peak": full["peak"]}
    figures |= speed(500 if quick else 5000)
    return figures


def table(f: dict) -> str:
    rows = [
        ("requests / token budget", f"{f['num_requests']} / {f['budget_tokens']}"),
        (
            "mean prompt / output tokens",
            f"{f['mean_prompt_tokens']:.0f} / {f['mean_output_tokens']:.0f}",
        ),
        ("KV utilization, block 8", f"{f['utilization_block8']:.4f}"),
        ("KV utilization, block 16", f"{f['utilization_block16']:.4f}"),
        ("KV utilization, block 32", f"{f['utilization_block32']:.4f}"),
        ("concurrent requests, paged (block 16)", f"{f['concurrency_paged']:.1f}"),
        (f"concurrent requests, contiguous {MAX_MODEL_LEN}", f"{f['concurrency_contiguous']}"),
        ("concurrency ratio", f"{f['concurrency_ratio_vs_contiguous']:.2f}x"),
        ("preemptions (block 16)", f"{f['preemptions_block16']}"),
        ("shared prompt: prefix hit rate", f"{f['prefix_hit_rate']:.3f}"),
        (
            "shared prompt: token / request hit rate",
            f"{f['token_hit_rate']:.3f} / {f['request_hit_rate']:.2f}",
        ),
        (
            "shared prompt: blocks used / without sharing",
            f"{f['blocks_used']} / {f['blocks_without_sharing']}",
        ),
        ("shared prompt: blocks saved", f"{f['blocks_saved']}"),
        (
            "n=4 fork: blocks fork / independent / ideal",
            f"{f['fork_blocks']} / {f['fork_independent_blocks']} / {f['fork_ideal_blocks']}",
        ),
        (
            "n=4 fork: ratio (copy-on-write copies)",
            f"{f['fork_block_ratio_n4']:.4f} ({f['fork_copy_on_write_copies']})",
        ),
        (
            "8192 tokens, window 4096: blocks held end / peak",
            f"{f['window_blocks_end']} / {f['window_blocks_peak']}",
        ),
        (
            "8192 tokens, no window: blocks held end / peak",
            f"{f['no_window_blocks_end']} / {f['no_window_blocks_peak']}",
        ),
        ("block ops/s (allocate+free)", f"{f['block_ops_per_s']:,.0f}"),
        ("allocate_slots per decode, us", f"{f['decode_allocate_us']:.2f}"),
        ("lookup_prefix full hit, us per 1k tokens", f"{f['lookup_hit_us_per_1k_tokens']:.1f}"),
        (
            "lookup_prefix again, same request, us per 1k tokens",
            f"{f['lookup_repeat_us_per_1k_tokens']:.1f}",
        ),
        ("lookup_prefix first-block miss, us", f"{f['lookup_miss_us']:.2f}"),
        ("commit_full_blocks, us per 1k tokens", f"{f['commit_us_per_1k_tokens']:.1f}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:>20}" for name, value in rows)


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()}-core {model}"


def record(path: str, command: str, text: str) -> None:
    """Append a results section (creating the file with its header if absent)."""
    header = (
        "# Benchmark results\n\nEach benchmark appends a section: date, machine, command, "
        "versions, figures.\n"
    )
    exists = os.path.exists(path)
    with open(path, "a") as out:
        if not exists:
            out.write(header)
        out.write(
            f"\n## KV-cache simulation (bench/cache_sim.py)\n\n"
            f"- Date: {datetime.date.today()}. Machine: {machine()}, shared with other jobs. "
            f"Python {platform.python_version()}, kvpage-cache 0.1.0.\n"
            f"- Command: `{command}`\n"
            f"- Request mix: log-normal prompt (mu 4.58, sigma 1.0) and output (mu 5.32, "
            f"sigma 1.0) lengths clipped to 1..1024, seed 0; max_model_len {MAX_MODEL_LEN}.\n"
            f"- Memory and sharing figures are exact for the seed; speed figures (best of 5) "
            f"depend on the load (1-minute load average {os.getloadavg()[0]:.1f} at the end).\n\n"
            f"```\n{text}\n```\n"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run (for tests)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", metavar="RESULTS_MD", help="append a results section")
    args = parser.parse_args()
    figures = run(args.quick, args.seed)
    text = table(figures)
    print(text)
    if args.record:
        record(args.record, "python bench/cache_sim.py" + (" --quick" if args.quick else ""), text)
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
