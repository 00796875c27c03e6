"""Device slots: where an accelerator's resident units live, in device memory bounded by
construction (and, on the CPU, units converted on the way in: a bf16 store computed in fp32
is converted into the memory the last unit of its layout left, not a fresh allocation).

Each unit is copied into a slot, one device buffer laid out for that unit's tensors (every
block has the same layout, so blocks share slots; the embeddings and the head have their
own). The slots together never hold more bytes than the device budget: a slot is made only
where the budget has room for it, idle slots of another layout are let go to make that
room, and a slot is used again only when nothing views its last unit's tensors any more (a
write-back still stepping them, a graph still holding them) and the compute stream has
finished with them (an event recorded at eviction, which the copy stream waits for). A load
that finds every byte held waits for a holder to let go; past `wait_s` it takes a buffer
outside the slots, counted in `overflows`, rather than stop the run (a test asserts none).

Without slots every load would be a fresh allocation: the caching allocator keeps what it
freed, copies queued ahead of the compute hold theirs, and device memory has no bound but
what the allocator happens to do.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from blocktune.machine.devices import Device
from blocktune.paging.buffers import _storage_users
from blocktune.store.fileio import aligned_empty

__all__ = ["DeviceSlots", "SLOT_ALIGN", "slot_layout"]

SLOT_ALIGN = 256  # each tensor starts on a 256-byte boundary (as the caching allocator's blocks do)


def _align(n: int) -> int:
    return -(-n // SLOT_ALIGN) * SLOT_ALIGN


def slot_layout(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> tuple[dict, int]:
    """Each tensor's (offset, dtype, shape) in a slot, in the order given, and the slot's bytes."""
    out, at = {}, 0
    for key, (dtype, shape) in specs.items():
        out[key] = (at, dtype, tuple(shape))
        numel = 1
        for d in shape:
            numel *= d
        at += _align(numel * dtype.itemsize)
    return out, at


@dataclass(eq=False)
class DeviceSlot:
    buf: torch.Tensor  # uint8 on the device
    idle: int | None  # the buffer's storage use count when nothing views it (None: unknown)
    counted: bool = True  # False: a buffer outside the slots (an overflow)
    released: object = None  # compute-stream event after its last unit's last use

    @property
    def nbytes(self) -> int:
        return self.buf.numel()

    def unviewed(self) -> bool:
        return self.idle is not None and _storage_users(self.buf) == self.idle

    def views(self, layout: dict) -> dict[str, torch.Tensor]:
        out = {}
        for key, (offset, dtype, shape) in layout.items():
            numel = 1
            for d in shape:
                numel *= d
            out[key] = self.buf[offset:offset + numel * dtype.itemsize].view(dtype).view(shape)
        return out


class DeviceSlots:
    """Device buffers for resident units, at most `cap` bytes of them. `take` runs where the
    copies to the device run (the reader thread; the computing thread on MPS), `give` where
    units are evicted."""

    def __init__(self, device: Device, cap: int, wait_s: float = 60.0):
        self.device, self.cap, self.wait_s = device, cap, wait_s
        self.bytes = 0  # held by slots, in use or idle
        self.peak_bytes = 0
        self.made = 0  # slots allocated (the rest of the takes reused one)
        self.overflows = 0  # buffers taken outside the slots after waiting wait_s
        self.waits = 0  # takes that had to wait for a holder to let go
        self._idle: list[DeviceSlot] = []
        self._cond = threading.Condition()

    def _make(self, nbytes: int) -> DeviceSlot:
        if self.device.is_cpu:  # huge pages: a 7B block's fresh slot faulted 197k times in 4 KiB pages
            buf = aligned_empty(nbytes)
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device.torch)
        self.device.scribble(buf)
        return DeviceSlot(buf, _storage_users(buf))

    def take(self, nbytes: int, wait_s: float | None = None) -> DeviceSlot:
        """A slot of exactly `nbytes`, free of views and of the compute's last use (the caller's
        copy stream must still wait for `released`); `wait_s` for a holder to let go (default:
        the slots' own)."""
        wait_s = self.wait_s if wait_s is None else wait_s
        deadline = None
        with self._cond:
            while True:
                free = [s for s in self._idle if s.unviewed()]
                same = [s for s in free if s.nbytes == nbytes]
                if same:
                    slot = same[-1]
                    self._idle.remove(slot)
                    self.device.scribble(slot.buf)  # what it held is gone (emu: NaN, so a stale view shows)
                    return slot
                del free, same
                self._let_idle_go(nbytes)  # room for a new one: idle slots of other layouts go
                if self.bytes + nbytes <= self.cap:
                    slot = self._make(nbytes)
                    self.bytes += nbytes
                    self.made += 1
                    self.peak_bytes = max(self.peak_bytes, self.bytes)
                    return slot
                now = time.monotonic()
                if deadline is None:  # every byte is held: a write-back or a graph lets go soon
                    deadline = now + wait_s
                    self.waits += 1
                if now >= deadline:
                    self.overflows += 1
                    slot = self._make(nbytes)
                    slot.counted = False
                    return slot
                self._cond.wait(min(0.005, deadline - now))  # views going away tell no one: look again

    def make_room(self, nbytes: int) -> None:
        """Let idle slots go until `nbytes` held outside the slots fit beside them under the cap
        (a unit the pager holds as read, not copied into a slot)."""
        with self._cond:
            self._let_idle_go(nbytes)

    def _let_idle_go(self, nbytes: int) -> None:
        """Idle slots nothing views go, largest first, until `nbytes` more fit under the cap."""
        free = sorted((s for s in self._idle if s.unviewed()), key=lambda s: -s.nbytes)
        while free and self.bytes + nbytes > self.cap:
            self._let_go(free.pop(0))
        del free  # the last references to the slots let go: their memory is free now

    def _let_go(self, slot: DeviceSlot) -> None:
        if slot.released is not None:
            slot.released.synchronize()  # the compute is done with it before the allocator reuses it
        self._idle.remove(slot)
        self.bytes -= slot.nbytes

    def give(self, slot: DeviceSlot, released) -> None:
        """An evicted unit's slot; `released`: an event on the compute stream after its last use."""
        if not slot.counted:
            return  # an overflow buffer goes back to the allocator with its last view
        slot.released = released
        with self._cond:
            self._idle.append(slot)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._idle.clear()
            self.bytes = 0
