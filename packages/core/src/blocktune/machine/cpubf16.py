"""Whether this CPU computes bf16 natively, for `--compute-dtype auto`: bf16 matmuls run at
2-3x fp32's speed where the processor has bf16 dot-product instructions (x86's AVX512_BF16 or
AMX, Arm's BF16 extension, Apple's M2 and later) and torch's oneDNN uses them; elsewhere torch
widens bf16 to fp32 in software and is slower than fp32.

The processor's own feature flags are read (once per process), not a matmul timed: a flag is
the same answer on every run, costs nothing at start, and does not depend on what else the
machine is doing (a timing taken while other processes share the cores picks by their load).

`BLOCKTUNE_CPU_BF16=1` or `=0` overrides the probe (a user who knows better; the tests).
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

import torch

from blocktune.errors import ConfigError

__all__ = ["ENV", "cpu_bf16"]

ENV = "BLOCKTUNE_CPU_BF16"
_X86_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16() -> tuple[bool, str]:
    """(native bf16 here, why), the why as the log says it ("this CPU has avx512_bf16")."""
    said = os.environ.get(ENV, "").strip()
    if said:
        if said not in ("0", "1"):
            raise ConfigError(f"{ENV}={said!r}: set it to 1 (compute bf16 on this CPU) or 0 (fp32), "
                              "or unset it to probe the processor")
        return said == "1", f"{ENV}={said}"
    return _probe()


@functools.cache
def _probe() -> tuple[bool, str]:
    machine, system = platform.machine().lower(), platform.system()
    if system == "Darwin" and machine == "arm64":
        has = _sysctl("hw.optional.arm.FEAT_BF16") == "1"
        return has, "this Apple chip has FEAT_BF16" if has else "this Apple chip has no FEAT_BF16 (M1)"
    if system != "Linux":
        return False, f"no probe for bf16 on {system} {machine}"
    flags = _cpuinfo_flags()
    if machine in ("x86_64", "amd64"):
        found = [f for f in _X86_FLAGS if f in flags]
        if not found:
            return False, "this CPU has no avx512_bf16 or amx_bf16"
        if not torch.backends.mkldnn.is_available():
            return False, f"this CPU has {found[0]} but torch here is built without oneDNN"
        return True, f"this CPU has {found[0]}"
    if machine in ("aarch64", "arm64"):
        return ("bf16" in flags, "this CPU has bf16 (Armv8.6)" if "bf16" in flags else "this CPU has no bf16")
    return False, f"no probe for bf16 on {machine}"


def _cpuinfo_flags() -> set[str]:
    """The first processor's flags (x86) or Features (Arm) in /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
