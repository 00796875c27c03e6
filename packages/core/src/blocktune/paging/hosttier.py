"""The host tier of an accelerator: unit files in page-locked RAM, in slots of exact size.

A unit that comes from the tier costs one host->device copy instead of a disk read. Memory is
taken in slots: page-aligned buffers registered with the device (CUDA: cudaHostRegister), each
as large as the largest unit's files, so the tier holds exactly what its budget says — torch's
pinned allocator would round every buffer up to a power of two (a 7B store's 13.5 GB became
~17.7 GB). Two more slots are bounce slots: a unit the tier does not keep passes through
one on its way to the device.

Entries are keyed by file version: a unit written back is a new file, so the tier can never
hand out the weights of an earlier step. A slot is reused only after the copy out of it has
finished (its event). `close` hands every slot back to the OS.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from blocktune.machine.devices import Device
from blocktune.store.fileio import aligned_empty, round_up

__all__ = ["HostTier", "BOUNCE_SLOTS"]


def _unregister(release, buf: torch.Tensor) -> None:
    release()

BOUNCE_SLOTS = 2  # one unit being copied to the device while the next is read


@dataclass
class _Slot:
    buf: torch.Tensor
    release: object  # unregisters the buffer (callable, once)
    event: object = None  # the last copy out of the slot
    used: int = 0  # bytes handed out of it for the file being read

    def alloc(self, nbytes: int) -> torch.Tensor:
        """The next `nbytes` of the slot (a tied head reads two files into one slot)."""
        start = self.used
        self.used = start + round_up(nbytes)
        if self.used > self.buf.numel():
            raise RuntimeError(f"a host slot of {self.buf.numel():,} bytes cannot hold {self.used:,}")
        return self.buf[start:start + nbytes]

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()
            self.event = None


@dataclass
class _Entry:
    unit: str
    tensors: dict[str, torch.Tensor]
    slot: _Slot = field(repr=False)


class HostTier:
    """Runs on the pager's reader thread only (one thread allocates and reuses slots)."""

    def __init__(self, device: Device, budget: int, slot_bytes: int):
        self.device = device
        self.slot_bytes = round_up(slot_bytes)
        self.capacity = budget // self.slot_bytes if budget > 0 else 0  # slots the tier may keep
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # file version -> entry
        self._free: list[_Slot] = []  # tier slots whose entry was let go
        self._bounce: list[_Slot] = []  # for units the tier does not keep
        self._next_bounce = 0
        self.hits = 0

    @property
    def bytes(self) -> int:
        """Host memory the tier and its bounce slots hold (registered, exactly)."""
        slots = len(self._entries) + len(self._free) + len(self._bounce)
        return slots * self.slot_bytes

    def _new_slot(self) -> _Slot:
        buf = aligned_empty(self.slot_bytes)
        slot = _Slot(buf, None)
        # released on close, or when the slot is collected (an engine never closed): the
        # finalizer holds the buffer, so it is unregistered before its memory goes back
        slot.release = weakref.finalize(slot, _unregister, self.device.register_host(buf), buf)
        return slot

    def get(self, file: str) -> dict[str, torch.Tensor] | None:
        entry = self._entries.get(file)
        if entry is None:
            return None
        self._entries.move_to_end(file)
        self.hits += 1
        return entry.tensors

    def slot_for(self, unit: str, file: str) -> tuple[_Slot, bool]:
        """A slot to read `unit`'s file version `file` into, and whether the tier keeps it
        (else it is a bounce slot, reused once its copy has landed)."""
        for old in [f for f, e in self._entries.items() if e.unit == unit]:
            self._free.append(self._entries.pop(old).slot)  # an earlier version: never asked for again
        if self.capacity:
            if self._free:
                slot = self._free.pop()
            elif len(self._entries) < self.capacity:
                slot = self._new_slot()
            else:  # least recently used out
                slot = self._entries.popitem(last=False)[1].slot
            slot.wait()
            self.device.scribble(slot.buf)  # emu: a copy out of it that no wait ordered reads NaN
            slot.used = 0
            return slot, True
        if len(self._bounce) < BOUNCE_SLOTS:
            self._bounce.append(self._new_slot())
        slot = self._bounce[self._next_bounce % len(self._bounce)]
        self._next_bounce += 1
        slot.wait()
        self.device.scribble(slot.buf)
        slot.used = 0
        return slot, False

    def keep(self, unit: str, file: str, tensors: dict[str, torch.Tensor], slot: _Slot) -> None:
        self._entries[file] = _Entry(unit, tensors, slot)

    def copied(self, slot: _Slot, event) -> None:
        """The copy out of `slot` is ordered before `event`: the slot is reused after it."""
        slot.event = event

    def close(self) -> None:
        """Every slot back to the OS, after the copies out of them have landed."""
        slots = [e.slot for e in self._entries.values()] + self._free + self._bounce
        for slot in slots:
            slot.wait()
            slot.release()
        self._entries.clear()
        self._free.clear()
        self._bounce.clear()
