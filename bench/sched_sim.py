"""Scheduler simulation: kvpage-sched + kvpage-cache driven by a fake model.

Reports, per concurrency level, the Python time of one schedule() + update_from_output() round
(median over the measured steps, in microseconds), the tokens scheduled per step and the
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

from kvpage_cache import BlockPool, KVCacheManager
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
    times, tokens = [], []
    for step in range(warmup, warmup + steps):
        t0 = time.perf_counter_ns()
        out = sched.schedule()
        t1 = time.perf_counter_ns()
        new_tokens, stops = wl.model_step(out)
        t2 = time.perf_counter_ns()
        sched.update_from_output(out, new_tokens, stops)
        t3 = time.perf_counter_ns()
        for _ in out.finished_ids:
            sched.add_request(wl.request(step))
        times.append((t1 - t0 + t3 - t2) / 1000)
        tokens.append(out.stats.num_scheduled_tokens)
    return {"step_us": statistics.median(times), "step_us_mean": statistics.fmean(times),
            "tokens_per_step": statistics.fmean(tokens), "preemptions": sched.num_preemptions}


def overload(policy: str, steps: int) -> dict:
    """Arrivals outpace service and the KV cache is short: measure preemptions and waiting."""
    wl = Workload(seed=7, prompt_len=(32, 512), max_tokens=(32, 256), stop_prob=0.0,
                  num_priorities=4)
    sched = make_scheduler(1500, max_num_seqs=128, max_num_batched_tokens=1024,
                           max_model_len=2048, policy=policy)
    arrival, first, prio = {}, {}, {}
    step = 0
    while step < steps or sched.has_unfinished_requests():
        if step < steps:
            for _ in range(2 if step % 3 else 1):  # ~1.67 requests per step
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
    steps, over_steps = (20, 60) if args.small else (300, 600)
    result: dict = {}
    print(f"{'concurrency':>11} {'step_us(median)':>15} {'step_us(mean)':>13} "
          f"{'tokens/step':>11} {'preemptions':>11}")
    for n in (64, 256, 1024):
        r = steady_state(n, steps)
        print(f"{n:>11} {r['step_us']:>15.0f} {r['step_us_mean']:>13.0f} "
              f"{r['tokens_per_step']:>11.0f} {r['preemptions']:>11}")
        result[f"step_us_{n}"] = round(r["step_us"], 1)
        result[f"tokens_per_step_{n}"] = round(r["tokens_per_step"], 1)
    print(f"\noverload (waiting time in steps): {'policy':>8} {'p50':>5} {'p99':>5} "
          f"{'p99 prio 0':>10} {'preemptions':>11}")
    for policy in ("fcfs", "priority"):
        r = overload(policy, over_steps)
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
