"""bench/serving.py: its statistics, and its JSON report against the live server."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from .live_server import API_KEY

_PATH = Path(__file__).resolve().parents[2] / "bench" / "serving.py"
_spec = importlib.util.spec_from_file_location("bench_serving", _PATH)
serving = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = serving  # dataclasses look their module up there
_spec.loader.exec_module(serving)


def test_percentile_interpolates():
    assert serving.percentile([], 50) is None
    assert serving.percentile([3.0], 99) == 3.0
    assert serving.percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert serving.percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)


def test_summarize_math():
    a = serving.RequestResult(
        ok=True,
        start=0.0,
        ttft=0.5,
        latency=2.5,
        output_tokens=5,
        chunk_times=[0.5, 1.0, 1.5, 2.0, 2.5],
    )
    b = serving.RequestResult(
        ok=True, start=0.0, ttft=1.5, latency=3.5, output_tokens=3, chunk_times=[1.5, 2.5, 3.5]
    )
    failed = serving.RequestResult(ok=False, error="HTTP 500")
    s = serving.summarize([a, b, failed], duration_s=4.0)
    assert (s["completed"], s["failed"], s["output_tokens"]) == (2, 1, 8)
    assert s["request_throughput"] == pytest.approx(0.5) and s["output_tok_s"] == pytest.approx(2.0)
    assert s["ttft_p50_s"] == pytest.approx(1.0)
    assert a.tpot == pytest.approx(0.5) and b.tpot == pytest.approx(1.0)
    assert s["tpot_p50_s"] == pytest.approx(0.75)
    assert s["itl_p50_s"] == pytest.approx(0.5) and s["itl_p99_s"] == pytest.approx(1.0)


def test_json_report_against_the_server(server, capsys):
    code = serving.main(
        [
            "--target",
            f"kvpage={server.url}/v1",
            "--api-key",
            API_KEY,
            "--num-prompts",
            "4",
            "--max-tokens",
            "4",
            "--concurrency",
            "2",
            "--warmup",
            "0",
            "--json",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)["kvpage"]
    for key in (
        "output_tok_s",
        "request_throughput",
        "ttft_p50_s",
        "ttft_p99_s",
        "tpot_p50_s",
        "itl_p99_s",
        "failed",
    ):
        assert key in report, key
    assert report["failed"] == 0 and report["completed"] == 4 and report["output_tokens"] == 16
    assert report["ttft_p50_s"] > 0 and report["output_tok_s"] > 0
