"""What the CPU can do for bf16, from ``/proc/cpuinfo`` (Linux): a warning before a run that would crawl.

On an x86 CPU without AVX-512 BF16 or AMX, PyTorch emulates bfloat16 matrix products and celldiff's 11 M U-Net
trains 25x slower in ``bf16-mixed`` than in ``32-true`` (README, Performance: measured on an AVX2-only EPYC);
with either extension bf16-mixed is the faster (1.8x with AVX-512 BF16, 2.3x with AMX).
"""

from __future__ import annotations

import platform
from pathlib import Path

X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def read_cpuinfo(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str | None, set[str] | None]:
    """(the first processor's model name, its ``flags`` (x86) or ``Features`` (ARM) words); (None, None) where
    there is no such file. scripts/curve_points.py records both with every curve point."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None, None
    model, flags = None, None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key == "model name" and model is None:
            model = value.strip()
        elif sep and key in ("flags", "Features") and flags is None:
            flags = set(value.split())
    return model, flags


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The first processor's ``flags`` (x86) or ``Features`` (ARM) words; None where there is no such file."""
    return read_cpuinfo(cpuinfo)[1]


def _arch(machine: str | None) -> str | None:
    machine = (machine or platform.machine()).lower()
    return "x86" if machine in ("x86_64", "amd64", "i686", "i386") else "arm" if machine in ("aarch64", "arm64") else None


def bf16_is_native(flags: set[str] | None, machine: str | None = None) -> bool | None:
    """True / False where the flags tell (x86: avx512_bf16 or amx_bf16; ARM: bf16), None where they don't."""
    arch = _arch(machine)
    if flags is None or arch is None:
        return None
    return any(flag in flags for flag in X86_BF16_FLAGS) if arch == "x86" else "bf16" in flags


def slow_bf16_warning(precision: object, on_cpu: bool, flags: set[str] | None = None, machine: str | None = None) -> str | None:
    """One warning line when a run would compute in bf16 on a CPU that has no bf16 instructions, else None."""
    if not on_cpu or not str(precision).startswith("bf16"):
        return None
    if bf16_is_native(cpu_flags() if flags is None else flags, machine) is not False:
        return None
    wanted = " or ".join(X86_BF16_FLAGS) if _arch(machine) == "x86" else "bf16"
    return (f"celldiff: warning: --trainer.precision {precision} on a CPU without bf16 instructions (no {wanted} in "
            "/proc/cpuinfo): on such a CPU it measured 25x slower than 32-true (README, Performance); "
            "pass --trainer.precision 32-true")  # fmt: skip
