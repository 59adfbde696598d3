"""Benchmark JSONs name the CPU they ran on: timings and fp32 rounding differ between hosts."""

from __future__ import annotations

import platform

from benchmarks.machine import cpu


def test_cpu_reads_model_and_widest_isa(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480C\n"
                    "flags\t\t: fpu sse2 avx2 avx512f avx512bw amx_bf16\n\n"
                    "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8480C\n")
    assert cpu(info) == {"cpu_model": "Intel(R) Xeon(R) Platinum 8480C", "isa": "avx512f"}
    info.write_text("model name\t: AMD EPYC\nflags\t\t: fpu sse2 fma avx2\n")
    assert cpu(info) == {"cpu_model": "AMD EPYC", "isa": "avx2"}


def test_cpu_without_cpuinfo_still_names_the_machine(tmp_path):
    got = cpu(tmp_path / "absent")
    assert got["isa"] is None and got["cpu_model"] == (platform.processor() or platform.machine())
