"""Host memory as the OS reports it, and hints to its virtual memory (Linux): what RAM there
is for this process (MemAvailable, cgroup v1/v2 limits), its peak RSS, and what the kernel is
told about pages — cold (reclaim first), huge, resident — and about the heap (trim, the mmap
threshold). None of this is a device: it is the machine the devices live in. Off Linux every
hint is a no-op and every figure None.
"""

from __future__ import annotations

import ctypes
import functools
import resource
import sys
from pathlib import Path

import numpy as np
import torch

__all__ = ["peak_rss_bytes", "resident_anon_bytes", "host_memory_available", "host_memory_free",
           "trim_host_heap", "fix_mmap_threshold", "LeanHeap", "advise_cold", "advise_huge", "ensure_resident"]


def _status_bytes(field: str) -> int | None:
    """A kB field of /proc/self/status ("VmHWM", "RssAnon") in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process. On Linux VmHWM, not ru_maxrss: ru_maxrss
    survives exec, so a child started from a big parent (Python spawns with vfork) reports
    the parent's peak as its own (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def resident_anon_bytes() -> int | None:
    """This process's anonymous memory resident now (RssAnon: the heap and mapped allocations,
    not mapped files); None off Linux."""
    return _status_bytes("RssAnon")


def _mem_available() -> int | None:
    try:
        meminfo = open("/proc/meminfo").read()
    except OSError:
        return None
    found = [int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable:")]
    return found[0] if found else None


def _cgroup_memory() -> list[tuple[int, int, int]]:
    """(limit, usage, inactive file cache) of each memory cgroup (v1 or v2) this process is
    in, where the limit is a number."""
    out = []
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            _, controllers, path = line.split(":", 2)
        except ValueError:
            continue
        if controllers == "":  # v2
            d, names = Path(f"/sys/fs/cgroup{path}"), ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            d = Path(f"/sys/fs/cgroup/memory{path}")
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        try:
            limit = (d / names[0]).read_text().strip()
            usage = int((d / names[1]).read_text())
            stat = dict(row.split() for row in (d / "memory.stat").read_text().splitlines() if row.count(" ") == 1)
        except (OSError, ValueError):
            continue
        if limit.isdigit():
            out.append((int(limit), usage, int(stat.get(names[2], 0))))
    return out


def host_memory_available() -> int | None:
    """Bytes of RAM there are for this process, page cache included: the kernel's
    MemAvailable, or less where a memory cgroup (v1 or v2) limits the process. None where
    unknown (off Linux)."""
    found = _mem_available()
    if found is None:
        return None
    return min([found] + [limit for limit, _, _ in _cgroup_memory()])


def host_memory_free() -> int | None:
    """Bytes of RAM this process can still take now: MemAvailable, or a cgroup's limit less
    what the cgroup uses (its inactive file cache counted as free: reclaim takes it first).
    None where unknown (off Linux)."""
    found = _mem_available()
    if found is None:
        return None
    return min([found] + [limit - max(usage - inactive, 0) for limit, usage, inactive in _cgroup_memory()])


@functools.cache
def _libc():
    import ctypes.util

    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None  # glibc only
    except OSError:
        return None


def trim_host_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise). Costs time twice: the
    trim itself, and a page fault per 4 KiB when the memory is used again (after every step,
    that was 0.3-0.45 s of a 3 s step here, for no lower peak). `LeanHeap` decides when."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


def fix_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Allocations from `nbytes` up are mapped fresh and unmapped when freed (glibc). By
    default glibc raises that threshold to each large block freed (up to 32 MiB), after which
    blocks of unit pieces and gradients come from the heap, which keeps what they leave: a
    full fine-tune of a 3.35 GB store held 1.18 GB instead of 1.0 GB. For tight memory only:
    every such allocation then costs fresh page faults."""
    lib = _libc()
    if lib is not None:
        lib.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD (fixing it also stops the dynamic raise)


class LeanHeap:
    """Keeps glibc's heap from holding what freed tensors leave in it, where `auto` pages the
    units through RAM (`Budgets.lean`, `Budgets.heap_slack`) or `lean_memory` asks for it;
    `between_units` is called on the computing thread before each unit's compute.

    Two costs are weighed. Memory: left alone, the heap keeps freed activations in holes it
    does not reuse (a 7B bf16 LoRA step under 2 GiB: 0.66 GB of free heap after one step, and
    the cgroup's kill in the next). Time: each 4 KiB the OS gets back is a page fault when it
    is used again (about 2.5 GB/s on a 2-core VM, on the computing thread).

    - `slack` > 0 (LoRA, generation, eval): the tensors of a unit's compute come from the heap,
      which reuses them within the unit (glibc's dynamic mmap threshold), and the heap is trimmed
      before a unit, forward or backward, once the resident anonymous memory has grown by `slack`
      since the last trim. At the 7B shape under 2 GiB the hidden states are exactly 1 MiB: each
      mapped fresh, a run took 7.2 M page faults and a step 1.22x its floor; so, 1.2 M and 1.13x.
    - `slack` 0 (a full fine-tune, or `lean_memory` with budgets given): allocations from 1 MiB
      up are mapped fresh and unmapped when freed, and the heap is trimmed before every unit but
      the backward's through a graph kept from the forward. A unit's gradients and optimizer
      pieces are big; served from the heap they stayed in it (glibc's dynamic threshold killed
      the laptop-shaped full step under 1 GiB); the backward through a kept graph allocates
      little else, and trimmed there too the full step took 8-10% longer for the same peak.
    Off Linux and glibc every call is a no-op.
    """

    def __init__(self, slack: int = 0):
        self.slack = slack
        self.maps_big = slack == 0
        self.trims = 0
        self._base: int | None = None  # resident anonymous bytes just after the last trim
        if self.maps_big:
            fix_mmap_threshold()

    def between_units(self, graph_kept: bool = False) -> None:
        """Before a unit's compute (`graph_kept`: its backward, through the graph the forward
        kept)."""
        if graph_kept and self.maps_big:
            return
        anon = resident_anon_bytes() if self.slack else None
        if anon is not None and self._base is not None and anon <= self._base + self.slack:
            return
        trim_host_heap()
        self.trims += 1
        if self.slack:
            self._base = resident_anon_bytes()


_MADV_COLD = 20  # Linux 5.4+: deactivate these pages, so reclaim takes them before others
_MADV_WILLNEED = 3
_MADV_HUGEPAGE = 14
_MADV_POPULATE_READ = 22  # Linux 5.14+: fault the range in now, readable


def _page_span(tensors) -> tuple[int, int] | None:
    """(start, length) of the pages under these tensors (views of one buffer), or None."""
    spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors if t.numel()]
    if not spans:
        return None
    lo = min(a for a, _ in spans) & ~4095
    return lo, max(b for _, b in spans) - lo


def _linux_libc():
    return _libc() if sys.platform.startswith("linux") else None


def advise_cold(tensors) -> None:
    """Tell the kernel that the file pages behind these (mapped) tensors are done with: under
    memory pressure it then reclaims them first, instead of the next unit's freshly read
    pages, which the compute would otherwise fault back in from disk one by one. With
    RAM to spare nothing is dropped. A no-op off Linux."""
    lib, span = _linux_libc(), _page_span(tensors)
    if lib is not None and span is not None:
        lib.madvise(ctypes.c_void_p(span[0]), ctypes.c_size_t(span[1]), ctypes.c_int(_MADV_COLD))


def advise_huge(buf: torch.Tensor) -> None:
    """Ask for transparent huge pages behind `buf` (2 MiB-aligned, not yet touched). Only a
    hint: without THP (or off Linux) the pages stay 4 KiB."""
    lib = _linux_libc()
    if lib is not None and buf.numel():
        lib.madvise(ctypes.c_void_p(buf.data_ptr()), ctypes.c_size_t(buf.numel()), ctypes.c_int(_MADV_HUGEPAGE))


def ensure_resident(tensors) -> int:
    """Fault back in whatever the kernel reclaimed of the file pages behind these mapped
    tensors, so the compute that reads them next takes no page faults; returns the pages that
    were missing. Checking (mincore) costs microseconds when nothing is missing, where
    populating a 50 MB range that is already there costs milliseconds. A no-op off Linux."""
    lib, span = _linux_libc(), _page_span(tensors)
    if lib is None or span is None:
        return 0
    start, length = ctypes.c_void_p(span[0]), ctypes.c_size_t(span[1])
    pages = (span[1] + 4095) // 4096
    vec = (ctypes.c_ubyte * pages)()
    if lib.mincore(start, length, vec) != 0:
        return 0
    missing = pages - int(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1))
    if missing and lib.madvise(start, length, ctypes.c_int(_MADV_POPULATE_READ)) != 0:
        lib.madvise(start, length, ctypes.c_int(_MADV_WILLNEED))  # older kernels: read ahead
    return missing
