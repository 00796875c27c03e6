"""Reusable host buffers for unit files (a full fine-tune, and direct reads of frozen units)."""

from __future__ import annotations

import threading

import torch

from blocktune.store.fileio import aligned_empty

__all__ = ["BufferPool", "counts_views"]


def _storage_users(t: torch.Tensor) -> int | None:
    """How many tensors (and storage objects) share `t`'s memory; None where torch cannot say."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else count(t.untyped_storage()._cdata)


def counts_views() -> bool:
    """Whether this torch says how many tensors view a storage (CPU builds before 2.8 may not)."""
    return _storage_users(torch.empty(1)) is not None


class BufferPool:
    """Reusable host byte buffers for unit files a full fine-tune reads and rewrites.

    A fresh buffer of a unit's size costs a page fault per 4 KiB on first touch (about 2.5 GB/s
    on a 2-core VM, work that competes with compute); a reused one costs nothing. A buffer is
    handed out again only when no tensor views it any more (the storage's use count is back to
    what it was when the buffer was made), so nothing still in use is ever overwritten. Buffers
    start 4 KiB-aligned, as direct IO wants.

    Idle buffers are kept up to `max_bytes`, or up to the most bytes that were ever in use at
    once if that is more: the pool then never holds more than its busiest moment already took,
    and a steady pattern (a step's units, states and write-backs) allocates nothing new. With
    `to_high_water` False, up to `max_bytes` only.
    """

    def __init__(self, max_bytes: int, to_high_water: bool = True):
        self.max_bytes = max_bytes  # idle buffers are let go past this (or past `high_water`)
        self.to_high_water = to_high_water
        self.high_water = 0  # most bytes in use at once
        self.peak_in_use = 0  # most buffers held at once (by resident units, writes, graphs)
        self.allocated = 0  # buffers made (the rest of `take`s reused one)
        self._bufs: list[tuple[torch.Tensor, int]] = []  # (buffer, its use count when free)
        self._lock = threading.Lock()

    def _idle(self, i: int) -> bool:
        buf, idle = self._bufs[i]
        return _storage_users(buf) == idle

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            idle = [self._idle(i) for i in range(len(self._bufs))]
            free = [(buf.numel(), i) for i, (buf, _) in enumerate(self._bufs)
                    if nbytes <= buf.numel() <= 2 * nbytes and idle[i]]
            if free:
                return self._bufs[min(free)[1]][0][:nbytes]
            in_use = sum(buf.numel() for (buf, _), spare in zip(self._bufs, idle) if not spare)
            self.peak_in_use = max(self.peak_in_use, 1 + idle.count(False))
            self.high_water = max(self.high_water, in_use + nbytes)
            # let idle buffers go (oldest first) until the new one fits under the cap
            held = sum(b.numel() for b, _ in self._bufs)
            cap = max(self.max_bytes, self.high_water) if self.to_high_water else self.max_bytes
            drop = []
            for i in (i for i, spare in enumerate(idle) if spare):
                if held + nbytes <= cap:
                    break
                held -= self._bufs[i][0].numel()
                drop.append(i)
            for i in reversed(drop):
                del self._bufs[i]
            buf = aligned_empty(nbytes)
            self.allocated += 1
            users = _storage_users(buf)
            if users is not None:  # None: torch cannot say; never reuse
                self._bufs.append((buf, users))
            return buf

    def clear(self) -> None:
        with self._lock:
            self._bufs.clear()
