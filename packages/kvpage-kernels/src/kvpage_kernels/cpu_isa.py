"""Which vector instruction tier this CPU offers, and the tier kvpage's CPU code may use.

Tiers, lowest first:

- ``scalar``: plain C++ (any x86-64 or other CPU); the compiler may still vectorize loops.
- ``avx2``: AVX2 and FMA (x86-64-v3: Intel Haswell and later, AMD Zen 1-3).
- ``avx512``: AVX-512 F, BW, VL and DQ (x86-64-v4: Intel Skylake-SP and later, AMD Zen 4+),
  the set oneDNN needs for its bf16 kernels.

The tier is detected at run time, never assumed from the machine that built anything.
``KVPAGE_CPU_ISA=scalar|avx2|avx512`` lowers it for the whole process, so that one machine
can run the code paths of an older CPU (tests do); asking for a tier the CPU lacks logs a
warning and keeps the detected one.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from .errors import KernelInputError

TIERS = ("scalar", "avx2", "avx512")
ENV_VAR = "KVPAGE_CPU_ISA"
# /proc/cpuinfo flags each tier needs (on top of the tiers below it)
_TIER_FLAGS = {
    "avx2": frozenset({"avx2", "fma"}),
    "avx512": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
}
# torch.backends.cpu.get_cpu_capability() -> tier, where /proc/cpuinfo cannot be read
_TORCH_CAPABILITY = {"AVX512": "avx512", "AVX512_BF16": "avx512", "AMX": "avx512",
                     "AVX2": "avx2"}
logger = logging.getLogger(__name__)


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


@functools.cache
def cpu_vendor() -> str:
    """The vendor id /proc/cpuinfo gives (GenuineIntel, AuthenticAMD, ...), or "" if unknown.
    Some libraries' fast paths depend on it (MKL's run on Intel CPUs)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""
    return line.partition(":")[2].strip()


@functools.cache
def detected_isa() -> str:
    """The highest tier this CPU supports."""
    flags = cpu_flags()
    if not flags:
        return _TORCH_CAPABILITY.get(torch.backends.cpu.get_cpu_capability(), "scalar")
    tier = "scalar"
    for name in TIERS[1:]:
        if not _TIER_FLAGS[name] <= flags:
            break
        tier = name
    return tier


def tier_at_least(tier: str, floor: str) -> bool:
    return TIERS.index(tier) >= TIERS.index(floor)


@functools.cache
def _effective(requested: str | None) -> str:
    detected = detected_isa()
    if not requested:
        return detected
    if requested not in TIERS:
        raise KernelInputError(f"{ENV_VAR}={requested!r} is not a CPU tier; choose one of {TIERS}")
    if not tier_at_least(detected, requested):
        logger.warning("%s=%s asks for more than this CPU offers (%s): using %s", ENV_VAR,
                       requested, detected, detected)
        return detected
    if requested != detected:
        logger.info("%s=%s: CPU code limited to the %s tier (the CPU offers %s)", ENV_VAR,
                    requested, requested, detected)
    return requested


def cpu_isa() -> str:
    """The tier kvpage's CPU code uses: the detected one, lowered by ``KVPAGE_CPU_ISA``."""
    return _effective(os.environ.get(ENV_VAR, "").strip().lower() or None)
