"""Kernel tests run the Triton kernels in the interpreter when there is no CUDA device, and
the cpu backend's tests on every CPU tier this machine offers.

TRITON_INTERPRET is read when a kernel is decorated, so it is set here, before any test
module imports kvpage_kernels.triton_backend.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvpage_kernels import cpu_isa  # noqa: E402  (after TRITON_INTERPRET)

_TIER_NAMES = {"avx2": "AVX2 and FMA", "avx512": "AVX-512"}


@pytest.fixture(params=cpu_isa.TIERS)
def cpu_tier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs the test with the cpu backend on each CPU tier (KVPAGE_CPU_ISA); a tier this CPU
    lacks, or that the KVPAGE_CPU_ISA this run started with excludes, is skipped."""
    tier = request.param
    if not cpu_isa.tier_at_least(cpu_isa.detected_isa(), tier):
        pytest.skip(f"this CPU has no {_TIER_NAMES[tier]}")
    if not cpu_isa.tier_at_least(cpu_isa.cpu_isa(), tier):
        pytest.skip(f"{cpu_isa.ENV_VAR}={os.environ[cpu_isa.ENV_VAR]} keeps this run below {tier}")
    monkeypatch.setenv(cpu_isa.ENV_VAR, tier)
    return tier
