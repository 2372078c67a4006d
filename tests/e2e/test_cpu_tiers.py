"""The CPU-dependent tests again, in processes that see an older CPU or no compiler at all.

The in-process tests already run kvpage's own code on every tier this CPU offers
(``KVPAGE_CPU_ISA``); here torch's libraries are held back too, for the whole process, as on
an AVX2-only CPU (AMD Zen 2/3) or one without AVX (oneDNN, MKL and ATen each have a switch),
and once with no C++ compiler to be found (the cpu kernel backend then stands down). Each run
must pass, skipping (with a reason) only what needs a CPU feature or a compiler it lacks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from kvpage_kernels.cpu_isa import detected_isa

ROOT = Path(__file__).resolve().parents[2]
CPU_TESTS = [
    "tests/kernels/test_cpu_backend.py",
    "tests/kernels/test_fused_decoder.py",
    "tests/kernels/test_dispatch.py",
    "tests/kernels/test_quantized_linear.py",
    "tests/kernels/test_lora.py",
    "tests/runtime/test_packed_gemm.py",
    "tests/runtime/test_fused_decode.py",
    "tests/runtime/test_loaders.py",
    "tests/runtime/test_models_llama.py",
    "tests/runtime/test_models_quantized.py",
    "tests/runtime/test_engine.py",
    "tests/runtime/test_lora.py::test_mixed_batch_equals_transformers_and_peft",
    "tests/runtime/test_tensor_parallel.py::test_tensor_parallel_matches_one_rank",
    "tests/runtime/test_models_families.py",
    "tests/runtime/test_rope_scaling.py",
]
# Splitting each family over two ranks runs no tier-specific code that
# test_tensor_parallel_matches_one_rank does not already run on each tier
NOT_RERUN = ["tests/runtime/test_models_families.py::test_families_split_over_two_ranks"]
MACHINES = {
    "avx2": {"KVPAGE_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "scalar": {"KVPAGE_CPU_ISA": "scalar", "ONEDNN_MAX_CPU_ISA": "SSE41",
               "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "no compiler": {"CXX": "", "PATH": ""},
}


@pytest.mark.slow
@pytest.mark.parametrize("machine", list(MACHINES))
def test_cpu_tests_pass_on(machine, tmp_path):
    if machine == detected_isa():
        pytest.skip(f"{machine} is this CPU's own tier: the main run already tests it")
    env = {**os.environ, **MACHINES[machine]}
    if machine == "no compiler":  # and no library built by one either
        env["KVPAGE_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CPU_TESTS,
         *(f"--deselect={test}" for test in NOT_RERUN)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    print(f"\n{machine}: {summary}")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert re.search(r"\d+ passed", summary)
