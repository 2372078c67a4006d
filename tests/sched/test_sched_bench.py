"""The scheduler simulation runs and reports the figures bench/RESULTS.md quotes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "sched_sim.py"


def test_sched_sim_small_run_reports_its_keys():
    proc = subprocess.run([sys.executable, str(BENCH), "--small", "--json"], capture_output=True,
                          text=True, timeout=120, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("step_us_64", "step_us_256", "step_us_1024", "preemptions", "wait_p50_fcfs",
                "wait_p99_fcfs", "wait_p50_priority", "wait_p99_priority"):
        assert key in result
    assert all(result[f"step_us_{n}"] > 0 for n in (64, 256, 1024))
    assert result["tokens_per_step_256"] > 0
    # the overload (seeded, so the same every run) preempts under both policies, and the
    # priority policy serves the top priority class sooner than arrival order does
    assert result["preemptions_fcfs"] > 0 and result["preemptions_priority"] > 0
    assert result["wait_p99_top_priority_priority"] < result["wait_p99_top_priority_fcfs"]
    assert result["wait_p50_priority"] <= result["wait_p99_priority"]
