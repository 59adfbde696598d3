"""The host a benchmark ran on. Timings mean little without it: the same section-4 job took 20.7 s on one
2-core VM and 35.8 s on another (AMD EPYC, AVX2), and fp32 kernels round differently between the two."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """CPU model and the widest vector ISA it offers (what oneDNN/MKL pick their kernels by), from
    /proc/cpuinfo; `platform.processor()` is empty on Linux."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        lines = []
    field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines) if v}
    flags = set(field.get("flags", "").split())
    isa = next((f for f in ("amx_tile", "avx512f", "avx2") if f in flags), None)
    return {"cpu_model": field.get("model name") or platform.processor() or platform.machine(), "isa": isa}


if __name__ == "__main__":
    print(cpu(), loadavg())
