"""Kept activations on disk: a block's saved tensors written as its forward ends and read back for
its backward, where RAM cannot keep them, instead of recomputing the block.

Recomputing a block costs its forward again (a 7B-shaped block: about 0.4 s of a CPU's compute
for 128 tokens); its activations are about 54 MB, which the disk writes and reads back in a
fraction of that, and off the computing thread: each block's are written while the next block
computes, and read back while the block after it in the backward computes. They go to one file
with no name (O_TMPFILE, where the file system has it), in the store's folder or the system's
temporary folder: nothing is left behind, however the process ends, and no other process can
see it. Where the spill cannot be opened, or runs out of room, the blocks are recomputed.

A small model's block is cheap to recompute for its activations' size (SmolLM2-135M: about 110
FLOPs a byte, against 920 for the 7B shape), and there the disk loses: `spill_activations auto`
spills only from `budgets.SPILL_MIN_FLOPS_PER_BYTE` up.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from blocktune.engine.handles import WeightHandles
from blocktune.paging.pager import Pager
from blocktune.store.fileio import AlignedWriter, aligned_empty, round_up

__all__ = ["ActivationSpill", "SpillHandles"]

log = logging.getLogger("blocktune")

_PIECE = 64  # each tensor's bytes start on a 64-byte boundary in its region


class _Region:
    """One (unit, micro-batch)'s saved tensors: held while they are written, then on disk at
    `offset`, then read back into one aligned buffer for the backward."""

    def __init__(self) -> None:
        # (as stored: a view or copy of it, the tensor saved), until written
        self.held: list[tuple[torch.Tensor, torch.Tensor]] = []
        # (byte offset in the region, dtype, shape as stored, the permutation back to the saved
        # layout); for another view of a storage stored whole: (its offset, dtype, None, (shape,
        # stride, storage offset) of the view), and nothing held to write
        self.layout: list[tuple[int, torch.dtype, tuple[int, ...] | None, tuple]] = []
        self.index: dict[tuple, int] = {}
        self.whole: dict[int, int] = {}  # storage address -> the entry that holds all its bytes
        self.packs = 0  # tensors saved (some more than once)
        self.nbytes = 0
        self.offset = -1
        self.written: Future | None = None
        self.read: Future | None = None

    def add(self, t: torch.Tensor) -> int:
        """`t` stored as its bytes in memory order: a transposed view is stored as the contiguous
        tensor it is a view of, and comes back with the strides it had."""
        self.packs += 1
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        found = self.index.get(key)
        if found is not None:  # one tensor saved by several ops (q, k and v's input)
            return found
        storage = t.untyped_storage()
        whole = self.whole.get(key[0])
        if whole is not None and self.layout[whole][1] == t.dtype:
            # another view of a storage stored whole (the attention's output, and wo's input)
            self.layout.append((self.layout[whole][0], t.dtype, None, (tuple(t.shape), t.stride(), t.storage_offset())))
            self.held.append((None, t))
        else:
            perm = sorted(range(t.dim()), key=lambda d: -t.stride(d))
            stored = t.permute(perm)
            if not stored.is_contiguous():
                stored = stored.contiguous()
            elif t.storage_offset() == 0 and stored.numel() * stored.element_size() == storage.nbytes():
                self.whole[key[0]] = len(self.layout)
            back = tuple(sorted(range(len(perm)), key=lambda d: perm[d]))
            self.layout.append((self.nbytes, t.dtype, tuple(stored.shape), back))
            self.held.append((stored, t))  # t too: no other tensor may take its address while its key is here
            n = stored.numel() * stored.element_size()
            self.nbytes += n + (-n % _PIECE)
        self.index[key] = len(self.layout) - 1
        return self.index[key]

    def tensor(self, buf: torch.Tensor, i: int) -> torch.Tensor:
        start, dtype, shape, back = self.layout[i]
        if shape is None:  # a view of a storage stored whole at `start`
            size, stride, offset = back
            base = buf[start:].view(dtype)
            return base.as_strided(size, stride, base.storage_offset() + offset)
        n = math.prod(shape) * dtype.itemsize
        return buf[start:start + n].view(dtype).view(shape).permute(back)

    def unwritten(self, i: int) -> torch.Tensor:
        """Entry i as it was saved, where the region was never written."""
        stored, t = self.held[i]
        return t if stored is None else stored.permute(self.layout[i][3])


class _Ref:
    """What the graph holds for a spilled tensor."""

    __slots__ = ("region", "i")

    def __init__(self, region: _Region, i: int):
        self.region, self.i = region, i


class ActivationSpill:
    """The spill file and its IO thread, for one engine: regions are laid out one after another
    each step (`new_step` starts again at 0), written in the order the forward ends them and
    read back in the order the backward asks. Within `budget` bytes of disk (checked against
    the file system's free space when the file is opened: at most half of it). `overlap`: a
    region is written while the next is made (else the forward waits for each write)."""

    def __init__(self, budget: int, folders: list[Path], overlap: bool = True):
        self.budget, self.folders, self.overlap = budget, folders, overlap
        self._fd: int | None = None
        self._opened = False
        self._io = ThreadPoolExecutor(1, thread_name_prefix="blocktune-spill")
        self._end = 0
        self.where: Path | None = None
        self.bytes_written = self.bytes_read = 0
        self._lock = threading.Lock()
        self._last: Future | None = None
        self.broken: Exception | None = None  # a write failed: nothing more is spilled

    def open(self) -> bool:
        """Whether the spill is there (opened on first use; a folder that will not take it is
        passed over, with a log line, for the next; none: the blocks are recomputed)."""
        if self._opened:
            return self._fd is not None
        self._opened = True
        for folder in self.folders:
            if _in_memory(folder):
                log.info("kept activations: %s is in memory (tmpfs), not a disk: not spilled to", folder)
                continue
            try:
                free = shutil.disk_usage(folder).free
                if free // 2 < min(self.budget, 1 << 30):
                    log.info("kept activations: %s has %.1f GB free, too little to spill to", folder, free / 1e9)
                    continue
                self._fd = _open_nameless(folder)
            except OSError as exc:
                log.info("kept activations: cannot spill to %s (%s)", folder, exc)
                continue
            self.budget = min(self.budget, free // 2)
            self.where = folder
            return True
        log.info("kept activations: no folder to spill to; blocks past the RAM budget are recomputed")
        return False

    def new_step(self) -> None:
        self._end = 0

    def room(self, nbytes: int) -> bool:
        return self.broken is None and self._end + nbytes <= self.budget

    def write(self, region: _Region) -> None:
        """`region`'s tensors to the file (on the IO thread), after the region before it. The
        write before it must be done first: at most two regions' tensors are held."""
        if self._last is not None:
            self._last.result()
        region.offset = self._end
        self._end += round_up(region.nbytes)
        region.written = self._last = self._io.submit(self._write, region)
        if not self.overlap:  # no room for the next block's beside these: wait for the disk
            region.written.result()

    def _write(self, region: _Region) -> None:
        try:
            self._write_out(region)
        except Exception as exc:  # a full or failing disk (or no memory for the buffer): this region stays in RAM, no other is spilled
            if self.broken is None:
                log.warning("kept activations: writing to the spill in %s failed (%s); the blocks after it are "
                            "recomputed (free space there, or set spill_activations = 0)", self.where, exc)
            self.broken = exc
            return
        region.held, region.index = [], {}
        with self._lock:
            self.bytes_written += region.nbytes

    def _write_out(self, region: _Region) -> None:
        out = AlignedWriter(_At(self._fd, region.offset))
        at = 0  # bytes of the region given so far
        for (start, _, _, _), (stored, _) in zip(region.layout, region.held, strict=True):
            if stored is None:  # a view of bytes written before
                continue
            if start > at:
                out.write(bytes(start - at))
            src = stored.reshape(-1).view(torch.uint8)
            out.write(src.numpy())
            at = start + src.numel()
        out.finish(0)

    def read(self, region: _Region) -> None:
        """Start reading `region` back (on the IO thread, after any write before it)."""
        if region.read is None:
            region.read = self._io.submit(self._read, region)

    def _read(self, region: _Region) -> torch.Tensor | None:
        region.written.result()
        if region.held:  # its write failed: its tensors are still here
            return None
        buf = aligned_empty(round_up(region.nbytes))
        mv = memoryview(buf.numpy())
        pos = 0
        while pos < len(mv):
            n = os.preadv(self._fd, [mv[pos:]], region.offset + pos)
            if n <= 0:
                raise OSError(f"kept activations: the spill file ended at {region.offset + pos}")
            pos += n
        with self._lock:
            self.bytes_read += region.nbytes
        return buf

    def close(self) -> None:
        self._io.shutdown(wait=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _At:
    """The spill file from `pos` on, as `AlignedWriter` writes a file: in order, each block once."""

    def __init__(self, fd: int, pos: int):
        self.fd, self.pos = fd, pos

    def write(self, mv: memoryview) -> int:
        n = os.pwritev(self.fd, [mv], self.pos)
        self.pos += n
        return n

    def truncate(self, size: int) -> None:  # a region ends padded to a block: the file keeps its length
        pass


def _in_memory(folder: Path) -> bool:
    """Whether `folder` is on a file system in RAM (tmpfs, ramfs; Linux's /proc/mounts): a spill
    there would take the memory it is meant to save."""
    try:
        mounts = [line.split()[1:3] for line in open("/proc/mounts").read().splitlines()]
    except OSError:
        return False
    path = os.path.realpath(folder)
    best = max((m for m in mounts if len(m) == 2 and (path == m[0] or path.startswith(m[0].rstrip("/") + "/"))),
               key=lambda m: len(m[0]), default=None)
    return best is not None and best[1] in ("tmpfs", "ramfs")


def _open_nameless(folder: Path) -> int:
    """A file in `folder` that no other process can see and that goes when it is closed: O_TMPFILE
    where the file system has it, else a temporary name unlinked at once; O_DIRECT where it is
    allowed (the page cache would only hold bytes read once, in the memory the run is short of)."""
    direct = getattr(os, "O_DIRECT", 0)
    tmpfile = getattr(os, "O_TMPFILE", 0)
    for flags in ((tmpfile | direct, tmpfile, 0) if tmpfile else (0,)):
        if flags:
            try:
                return os.open(folder, flags | os.O_RDWR | os.O_CLOEXEC, 0o600)
            except OSError:
                continue
        fd, path = tempfile.mkstemp(prefix=".blocktune-activations-", dir=folder)
        os.unlink(path)
        return fd
    raise OSError(f"cannot create a file in {folder}")


class SpillHandles(WeightHandles):
    """saved_tensors_hooks for one unit whose activations go to the spill: weights become handles
    (as `WeightHandles`), everything else is gathered in the micro-batch's region, written when
    `end` is called (the micro-batch's forward through the unit is over) and read back when the
    backward first unpacks one of them (or earlier, by `fetch`), held until `release`: at most
    the micro-batch being differentiated and the one read ahead are in memory."""

    def __init__(self, pager: Pager, unit: str, spill: ActivationSpill, held: Iterable[torch.Tensor] = ()):
        super().__init__(pager, unit, held)
        self.spill = spill
        self.regions: dict[int, _Region] = {}  # micro-batch -> its region, until its backward is through
        self._open: _Region | None = None

    def _activation(self, t: torch.Tensor):
        if t.device.type != "cpu":  # not in host memory
            return super()._activation(t)
        if self._open is None:  # counted as written, in `end`
            self._open = _Region()
        return _Ref(self._open, self._open.add(t))

    def unpack(self, packed):
        if not isinstance(packed, _Ref):
            return super().unpack(packed)
        region = packed.region
        if region.read is None:
            self.spill.read(region)
        buf = region.read.result()
        if buf is None:  # never written: the view taken when it was saved (the tensor itself may be hollowed since)
            return region.unwritten(packed.i)
        return region.tensor(buf, packed.i)

    def end(self, m: int) -> None:
        """Micro-batch m's forward through the unit is over: its region goes to the disk."""
        region, self._open = self._open, None
        if region is None:
            return
        self.activation_bytes += region.nbytes
        self.spill.write(region)
        self.regions[m] = region

    def fetch(self, m: int) -> None:
        """Start reading micro-batch m's region back."""
        region = self.regions.get(m)
        if region is not None:
            self.spill.read(region)

    def release(self, m: int) -> None:
        """Micro-batch m's backward through the unit is done: what was read back for it goes."""
        self.regions.pop(m, None)
