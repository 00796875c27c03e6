"""Whether this CPU computes bf16 faster than fp32, for `--compute-dtype auto`: bf16 matmuls
run at 2-3x fp32's speed where the processor has bf16 dot-product units that outrun its fp32 FMAs
(AMX, AMD's Zen 4 and later, Apple's M2 and later) and torch's oneDNN uses them; without bf16
instructions torch widens bf16 to fp32 in software, slower than fp32.

Two steps, once per process. The processor's feature flags first (x86's avx512_bf16 or amx_bf16
in /proc/cpuinfo, Arm's bf16, Apple's FEAT_BF16): without them bf16 is emulated, and fp32 is
chosen without timing anything. With them a matmul of a 7B block's shape is timed in both
dtypes (best of three, alternated so that other processes' load falls on both alike): a flag says
the instructions exist, not that they are faster — on an Intel Xeon with avx512_bf16 but no AMX
(this project's test machine, 2026-12-06) oneDNN's bf16 kernel ran at 0.5-0.75x MKL's fp32
speed, side by side in one process. bf16 is chosen only where it is clearly faster (BF16_MARGIN).
The measurement is kept per machine (CPU model, torch version, threads) in the cache folder
($BLOCKTUNE_CACHE or ~/.cache/blocktune/cpu-bf16.json): one second once, not at every start, and
a run and its --resume choose alike even where the two speeds are close.

`BLOCKTUNE_CPU_BF16=1` or `=0` overrides the probe (a user who knows better; the tests).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from blocktune.errors import ConfigError

__all__ = ["ENV", "cpu_bf16"]

ENV = "BLOCKTUNE_CPU_BF16"
_X86_FLAGS = ("amx_bf16", "avx512_bf16")
BF16_MARGIN = 1.2  # bf16 is chosen where its matmul is at least this much faster than fp32's


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
    has, why = _flag()
    if not has:
        return False, why
    speedup, said = _kept_speedup()
    verdict = (f"and computes bf16 {speedup:.1f}x as fast as fp32" if speedup >= BF16_MARGIN
               else f"but computes bf16 at {speedup:.2f}x fp32's speed")
    return speedup >= BF16_MARGIN, f"{why} {verdict} ({said})"


def _flag() -> tuple[bool, str]:
    """Whether the processor has bf16 instructions torch can use, and the words for it."""
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


def _kept_speedup() -> tuple[float, str]:
    """bf16's matmul speed over fp32's on this machine: from the cache file, or timed now and
    kept there (where the folder is writable); and the words for where it came from."""
    path = Path(os.environ.get("BLOCKTUNE_CACHE") or Path.home() / ".cache" / "blocktune") / "cpu-bf16.json"
    key = f"{_cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        kept = {}
    if isinstance(kept.get(key), dict) and isinstance(kept[key].get("speedup"), float):
        return kept[key]["speedup"], f"a matmul timed on this machine before, kept in {path}"
    speedup, shape = _timed_speedup()
    kept[key] = {"speedup": speedup, "shape": shape, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(kept, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError:
        return speedup, f"a {shape} matmul timed at start"
    return speedup, f"a {shape} matmul timed now, kept in {path}"


def _cpu_model() -> str:
    for line in _cpuinfo_lines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "CPU part"):
            return value.strip()
    return platform.processor() or platform.machine()


def _timed_speedup(m: int = 128, k: int = 4096, n: int = 4096, reps: int = 3) -> tuple[float, str]:
    """fp32's best time over bf16's for x @ Wᵀ of a 7B block's shape, the two alternated (so
    that other processes' load falls on both alike), and the shape's words."""
    best = {}
    for dt in (torch.float32, torch.bfloat16):
        x, w = torch.randn(m, k, dtype=dt), torch.randn(n, k, dtype=dt)
        torch.nn.functional.linear(x, w)  # the kernel's first call: its set-up
        best[dt] = (x, w, float("inf"))
    for _ in range(reps):
        for dt, (x, w, t_best) in best.items():
            t = time.perf_counter()
            torch.nn.functional.linear(x, w)
            best[dt] = (x, w, min(t_best, time.perf_counter() - t))
    return best[torch.float32][2] / best[torch.bfloat16][2], f"{m}x{k}x{n}"


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _cpuinfo_flags() -> set[str]:
    """The first processor's flags (x86) or Features (Arm) in /proc/cpuinfo."""
    for line in _cpuinfo_lines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
