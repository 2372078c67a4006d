"""Scheduler simulation: kvpage-sched + kvpage-cache driven by a fake model.

Reports, per concurrency level, the Python time of one schedule() + update_from_output() round
(CPU time of the thread, median over the measured steps, in microseconds; the wall-clock median
too, which other processes on a shared machine inflate; then the same for rounds where every
request only decodes, over the real cache and over a do-nothing cache: the scheduler's own part), the tokens scheduled per step and the
preemptions; then, under overload (arrivals outpace service, KV cache short), the p50/p99
waiting time from arrival to first schedule, in steps, for the fcfs and priority policies.

    python bench/sched_sim.py            # table
    python bench/sched_sim.py --json     # table, then one JSON object as the last line
    python bench/sched_sim.py --small    # quick run (tests)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass, field

from kvpage_cache import BlockPool, CacheStats, KVCacheManager, PrefixHit
from kvpage_sched import Request, Scheduler, SchedulerConfig


@dataclass
class Workload:
    """Random prompts and output lengths; the fake model stops a request with `stop_prob`."""

    seed: int = 0
    prompt_len: tuple[int, int] = (16, 512)
    max_tokens: tuple[int, int] = (32, 512)
    stop_prob: float = 1 / 256
    num_priorities: int = 1
    rng: random.Random = field(init=False)
    count: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def request(self, now: int) -> Request:
        self.count += 1
        rng = self.rng
        prompt = [rng.randrange(32000) for _ in range(rng.randint(*self.prompt_len))]
        return Request(f"r{self.count}", prompt, rng.randint(*self.max_tokens),
                       priority=rng.randrange(self.num_priorities), arrival_time=float(now))

    def model_step(self, out) -> tuple[dict[str, list[int]], dict[str, str]]:
        """Fake forward pass: one random token per sampled request, random stops."""
        rng = self.rng
        tokens = {s.request_id: [rng.randrange(32000)] for s in out.scheduled
                  if not s.is_prefill_chunk}
        stops = {rid: "stop" for rid in tokens if rng.random() < self.stop_prob}
        return tokens, stops


def make_scheduler(num_blocks: int, **cfg) -> Scheduler:
    return Scheduler(KVCacheManager(BlockPool(num_blocks, 16)), SchedulerConfig(**cfg))


class NullCache:
    """A cache manager that does nothing and never runs out: isolates the scheduler's own cost."""

    block_size = 16
    stats = CacheStats()
    sliding_window = None

    def lookup_prefix(self, request_id, token_ids, extra_keys=()) -> PrefixHit:
        return PrefixHit([], 0)

    def allocate_slots(self, request_id, num_new_tokens, computed_blocks=(),
                       num_lookahead_tokens=0) -> list[int]:
        return []

    def block_ids(self, request_id) -> list[int]:
        return []

    def block_table(self, request_id) -> list[int]:
        return []

    def take_block_copies(self) -> list:
        return []

    def commit_full_blocks(self, request_id, token_ids, extra_keys=()) -> None: ...
    def free(self, request_id) -> None: ...
    def fork(self, parent_id, child_id) -> list:
        return []

    def truncate(self, request_id, num_tokens) -> None: ...

    def free_outside_window(self, request_id, num_computed_tokens) -> int:
        return 0

    def can_ever_fit(self, num_tokens) -> bool:
        return True

    def usage(self) -> float:
        return 0.0


def steady_state(concurrency: int, steps: int) -> dict:
    """Keep `concurrency` requests in flight (a finished one is replaced at once), once every
    first prompt is computed: mostly decodes, with the newcomers' prompts in between."""
    wl = Workload(seed=concurrency)
    sched = make_scheduler(concurrency * 70, max_num_seqs=concurrency,
                           max_num_batched_tokens=max(2048, 4 * concurrency), max_model_len=2048)
    for _ in range(concurrency):
        sched.add_request(wl.request(0))
    warmup = 0
    while sched.num_waiting or any(r.num_output_tokens == 0 for r in sched.running):
        sched.update_from_output(out := sched.schedule(), *wl.model_step(out))
        warmup += 1
    cpu, wall, tokens = [], [], []
    clocks = (time.thread_time_ns, time.perf_counter_ns)
    for step in range(warmup, warmup + steps):
        c0, w0 = (clock() for clock in clocks)
        out = sched.schedule()
        c1, w1 = (clock() for clock in clocks)
        new_tokens, stops = wl.model_step(out)
        c2, w2 = (clock() for clock in clocks)
        sched.update_from_output(out, new_tokens, stops)
        c3, w3 = (clock() for clock in clocks)
        for _ in out.finished_ids:
            sched.add_request(wl.request(step))
        cpu.append((c1 - c0 + c3 - c2) / 1000)
        wall.append((w1 - w0 + w3 - w2) / 1000)
        tokens.append(out.stats.num_scheduled_tokens)
    return {"step_us": statistics.median(cpu), "step_us_mean": statistics.fmean(cpu),
            "step_wall_us": statistics.median(wall), "tokens_per_step": statistics.fmean(tokens),
            "running": sched.num_running, "preemptions": sched.num_preemptions}


def decode_only(concurrency: int, steps: int, cache=None) -> float:
    """Median CPU microseconds of a round where every request decodes one token (no arrivals,
    no stops), over a real KVCacheManager or the given `cache`."""
    cfg = SchedulerConfig(max_num_seqs=concurrency, max_num_batched_tokens=max(2048, 4 * concurrency))
    sched = Scheduler(cache or KVCacheManager(BlockPool(concurrency * 70, 16)), cfg)
    for i in range(concurrency):
        sched.add_request(Request(f"d{i}", list(range(i, i + 200)), max_tokens=100_000))
    times = []
    for _ in range(steps + 20):  # 200-token prompts: admitted and computed within 20 steps
        c0 = time.thread_time_ns()
        out = sched.schedule()
        c1 = time.thread_time_ns()
        sampled = {s.request_id: [1] for s in out.scheduled if not s.is_prefill_chunk}
        c2 = time.thread_time_ns()
        sched.update_from_output(out, sampled)
        times.append((c1 - c0 + time.thread_time_ns() - c2) / 1000)
    return statistics.median(times[20:])


def overload(policy: str, steps: int, rate: float = 0.6, num_blocks: int = 1500) -> dict:
    """`rate` arrivals per step for `steps` steps, about 1.5 times what the short KV cache of
    `num_blocks` serves: measure preemptions and the wait from arrival to first schedule, in
    steps."""
    wl = Workload(seed=7, prompt_len=(32, 512), max_tokens=(32, 256), stop_prob=0.0,
                  num_priorities=4)
    sched = make_scheduler(num_blocks, max_num_seqs=128, max_num_batched_tokens=1024,
                           max_model_len=2048, policy=policy)
    arrival, first, prio = {}, {}, {}
    step = 0
    while step < steps or sched.has_unfinished_requests():
        if step < steps:
            for _ in range(int((step + 1) * rate) - int(step * rate)):
                req = wl.request(step)
                arrival[req.request_id], prio[req.request_id] = step, req.priority
                sched.add_request(req)
        out = sched.schedule()
        for s in out.scheduled:
            first.setdefault(s.request_id, step)
        sched.update_from_output(out, *wl.model_step(out))
        step += 1
    waits = sorted(first[r] - arrival[r] for r in arrival)
    top = sorted(first[r] - arrival[r] for r in arrival if prio[r] == 0)
    return {"wait_p50": _pct(waits, 50), "wait_p99": _pct(waits, 99),
            "wait_p99_top_priority": _pct(top, 99), "preemptions": sched.num_preemptions,
            "requests": len(arrival), "steps": step}


def _pct(sorted_values: list[int], p: int) -> int:
    return sorted_values[min(len(sorted_values) - 1, len(sorted_values) * p // 100)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    ap.add_argument("--small", action="store_true", help="quick run")
    args = ap.parse_args()
    # the small run's KV cache is short enough for its fewer arrivals to overload it too
    steps, over_steps, over_blocks = (20, 60, 120) if args.small else (300, 600, 1500)
    result: dict = {}
    print(f"{'concurrency':>11} {'cpu_us(median)':>14} {'cpu_us(mean)':>12} "
          f"{'wall_us(median)':>15} {'decode_only_us':>14} {'null_cache_us':>13} "
          f"{'tokens/step':>11} {'preemptions':>11}")
    for n in (64, 256, 1024):
        r = steady_state(n, steps)
        decode_us, null_us = decode_only(n, steps), decode_only(n, steps, NullCache())
        print(f"{n:>11} {r['step_us']:>14.0f} {r['step_us_mean']:>12.0f} "
              f"{r['step_wall_us']:>15.0f} {decode_us:>14.0f} {null_us:>13.0f} "
              f"{r['tokens_per_step']:>11.0f} {r['preemptions']:>11}")
        result[f"step_us_{n}"] = round(r["step_us"], 1)
        result[f"step_wall_us_{n}"] = round(r["step_wall_us"], 1)
        result[f"decode_step_us_{n}"] = round(decode_us, 1)
        result[f"null_cache_step_us_{n}"] = round(null_us, 1)
        result[f"tokens_per_step_{n}"] = round(r["tokens_per_step"], 1)
    print(f"\noverload (waiting time in steps): {'policy':>8} {'p50':>5} {'p99':>5} "
          f"{'p99 prio 0':>10} {'preemptions':>11}")
    for policy in ("fcfs", "priority"):
        r = overload(policy, over_steps, num_blocks=over_blocks)
        print(f"{'':34}{policy:>8} {r['wait_p50']:>5} {r['wait_p99']:>5} "
              f"{r['wait_p99_top_priority']:>10} {r['preemptions']:>11}")
        result[f"wait_p50_{policy}"] = r["wait_p50"]
        result[f"wait_p99_{policy}"] = r["wait_p99"]
        result[f"wait_p99_top_priority_{policy}"] = r["wait_p99_top_priority"]
        result[f"preemptions_{policy}"] = r["preemptions"]
    result["preemptions"] = result["preemptions_fcfs"] + result["preemptions_priority"]
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
