"""What machine a benchmark ran on, for the figures in docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

#: CPU flags that decide how fast decoding and inference run.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8")


def cpu_model() -> str:
    """``lscpu``'s model name, or what ``platform`` knows."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (the machines are shared)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def all_cpu_flags() -> list[str]:
    """Every flag on ``/proc/cpuinfo``'s first ``flags`` line (the CPU behind a machine kind varies)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])


def cpu_flags() -> list[str]:
    """The flags of :data:`ISA_FLAGS` the CPU has."""
    flags = set(all_cpu_flags())
    return [f for f in ISA_FLAGS if f in flags]
