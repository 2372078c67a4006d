"""What a benchmark records about the machine it ran on: the CPU, and the switches that hold
its instruction sets back (to measure an older CPU's paths on a newer one)."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

# kvpage's own tier, then oneDNN's, MKL's and torch's vectorized kernels'
CPU_SWITCHES = ("KVPAGE_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                "ATEN_CPU_CAPABILITY")


def cpu_name() -> str:
    """The CPU's model name, with its family and model numbers where the name alone does not
    tell the generation (a virtual machine may call any AMD EPYC just "AMD EPYC")."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    return f"{fields['model name']} (family {fields.get('cpu family')}, model {fields.get('model')})"


def describe() -> str:
    """'<CPU>, <n> cores, CPU tier <tier>' plus the switches set, if any."""
    from kvpage_kernels.cpu_isa import cpu_isa, detected_isa

    held = [f"{name}={os.environ[name]}" for name in CPU_SWITCHES if os.environ.get(name)]
    text = f"{cpu_name()}, {os.cpu_count()} cores, CPU tier {cpu_isa()} (detected {detected_isa()})"
    return text + (f", held back with {' '.join(held)}" if held else "")
