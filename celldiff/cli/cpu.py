"""What the CPU can do for bf16, from ``/proc/cpuinfo`` (Linux): a warning before a run that would crawl.

On an x86 CPU without AVX-512 BF16 or AMX, PyTorch emulates bfloat16 matrix products and celldiff's 11 M U-Net
trains 25x slower in ``bf16-mixed`` than in ``32-true`` (README, Performance: measured on an AVX2-only EPYC);
with either extension bf16-mixed is the faster (1.8x with AVX-512 BF16, 2.3x with AMX).
"""

from __future__ import annotations

import platform
from pathlib import Path

X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The first processor's ``flags`` (x86) or ``Features`` (ARM) words; None where there is no such file."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def bf16_is_native(flags: set[str] | None, machine: str | None = None) -> bool | None:
    """True / False where the flags tell (x86: avx512_bf16 or amx_bf16; ARM: bf16), None where they don't."""
    if flags is None:
        return None
    machine = (machine or platform.machine()).lower()
    if machine in ("x86_64", "amd64", "i686", "i386"):
        return any(flag in flags for flag in X86_BF16_FLAGS)
    if machine in ("aarch64", "arm64"):
        return "bf16" in flags
    return None


def slow_bf16_warning(precision: object, on_cpu: bool, flags: set[str] | None = None, machine: str | None = None) -> str | None:
    """One warning line when a run would compute in bf16 on a CPU that has no bf16 instructions, else None."""
    if not on_cpu or not str(precision).startswith("bf16"):
        return None
    if bf16_is_native(cpu_flags() if flags is None else flags, machine) is not False:
        return None
    wanted = "avx512_bf16 or amx_bf16" if (machine or platform.machine()).lower() in ("x86_64", "amd64") else "bf16"
    return (f"celldiff: warning: --trainer.precision {precision} on a CPU without bf16 instructions (no {wanted} in "
            "/proc/cpuinfo): on such a CPU it measured 25x slower than 32-true (README, Performance); "
            "pass --trainer.precision 32-true")  # fmt: skip
