import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "cache_sim.py"


def test_quick_simulation_meets_the_goals():
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in (
        "utilization_block16",
        "concurrency_ratio_vs_contiguous",
        "prefix_hit_rate",
        "fork_block_ratio_n4",
        "block_ops_per_s",
    ):
        assert key in figures
    assert figures["utilization_block16"] >= 0.97
    assert (
        figures["utilization_block8"]
        > figures["utilization_block16"]
        > figures["utilization_block32"]
    )
    assert figures["concurrency_ratio_vs_contiguous"] >= 4
    assert figures["prefix_hit_rate"] >= 0.99  # all but the first request reuse the 512 tokens
    assert figures["blocks_saved"] == 99 * 512 // 16
    assert figures["fork_blocks"] == figures["fork_ideal_blocks"]
    assert 0.46 < figures["fork_block_ratio_n4"] < 0.48
    assert figures["block_ops_per_s"] > 0  # a speed: bench/RESULTS.md records it, tests do not judge it
