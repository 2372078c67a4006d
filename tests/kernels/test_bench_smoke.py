"""bench/kernels.py stays runnable: its GPU section on tiny shapes on any device (the Triton
kernels in the interpreter here) and its results writer."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("kvpage_bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_section_on_tiny_shapes_and_results_file(tmp_path):
    bench = _bench_module()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = bench.run_gpu([2], [40], [(1, 24)], device=device,
                           shape=bench.Shape("tiny", 4, 2, 32))
    assert result["decode"][0]["torch_gbs"] > 0
    assert result["prefill"][0]["sdpa_contiguous_tflops"] > 0
    row = {"case": "c", "model_shape": "s", "dtype": "float32", "torch_ms": 1.0,
           "sdpa_contiguous_ms": 1.0, "reference_ms": 2.0, "torch_vs_sdpa": 1.0,
           "reference_vs_torch": 2.0}
    section = bench.markdown_section({"date": "d", "machine": "m", "torch": "t", "threads": 1,
                                      "cpu": [row], "gpu": result}, "python bench/kernels.py")
    assert "| 2 | 40 | " in section and "| 1 x 24 | " in section  # the GPU tables
    path = tmp_path / "RESULTS.md"
    bench.append_results(str(path), section)
    bench.append_results(str(path), section)
    text = path.read_text()
    assert text.startswith("# Benchmark results") and text.count("## kvpage-kernels") == 2
