"""The pager: which units are resident on the compute device, under a byte budget.

It loads units on demand and counts every byte it moves. The engine tells it the order of the
gets to come (`plan`: a pass, the turn into the backward, the next step's first units), and a
background thread reads ahead by bytes: after each get, the next planned units that are not
resident, as many as the budget holds beside the current one. Eviction takes the unit whose
next use is farthest (Belady's rule; without a plan, least-recently-used, its order after a
forward pass), and a read ahead never evicts a unit needed before the one it loads. Where
the budget has no room for the next unit but its file is converted on the way in (a bf16
store computed in fp32 on the CPU), its raw file is still read ahead (the raw ahead), into
the raw buffer `auto` keeps beside the budget for units in flight, and converted when its
turn comes: with a budget of one unit, the disk reads the next unit while the compute runs
on this one. Its neighbours, one idea each: the device slots resident units live in
(`slots`), the host tier (`hosttier`), reusable read buffers (`buffers`), how a unit comes in
(`loader`), the budgets and the two-unit rule (`budgets`), write-back and commit
(`writeback`), the activation stash (`stash`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from blocktune.engine.config import check_frozen_reads
from blocktune.engine.optim import OptimizerConfig
from blocktune.errors import BudgetError
from blocktune.machine.devices import Device, dtype_name
from blocktune.machine.hostmem import advise_cold, host_memory_available
from blocktune.paging.budgets import holds_two_units, limit
from blocktune.paging.buffers import BufferPool, counts_views
from blocktune.paging.hosttier import BOUNCE_SLOTS, HostTier
from blocktune.paging.loader import LoadedUnit, UnitLoader, copied_units, resident_sizes
from blocktune.paging.slots import DeviceSlots
from blocktune.paging.writeback import WriteBack
from blocktune.store.fileio import round_up
from blocktune.store.store import BlockStore

__all__ = ["Pager", "PagerStats", "resident_sizes"]


@dataclass
class PagerStats:
    bytes_read: int = 0
    bytes_written: int = 0
    unit_reads: int = 0
    unit_writes: int = 0
    hits: int = 0
    host_hits: int = 0
    bytes_to_device: int = 0  # host->device copies (accelerators)
    peak_resident: int = 0
    read_seconds: float = 0.0
    write_seconds: float = 0.0
    wait_seconds: float = 0.0  # the computing thread waiting in `get` for a unit's load
    demand_reads: int = 0  # gets whose unit was neither resident nor already being loaded
    staged_reads: int = 0  # units whose raw file was read ahead outside the budget, converted at their get
    reads_by_unit: dict = field(default_factory=dict)  # unit -> times read from the store

    def snapshot(self) -> dict:
        return {**self.__dict__, "reads_by_unit": dict(self.reads_by_unit)}


@dataclass
class _Pending:
    future: Future
    reserved: int


class Pager:

    def __init__(
        self,
        store: BlockStore,
        device: Device,
        budget: int | None = None,
        compute_dtype: torch.dtype = torch.float32,
        prefetch: bool = True,
        verify: bool | str = "once",
        host_budget: int | None = 0,
        mutable: bool = True,
        max_dirty: int | None = 512 << 20,
        frozen_reads: str = "auto",
        as_stored: frozenset[str] = frozenset(),
        state_budget: int = 0,
        master: BlockStore | None = None,
    ):
        self.store, self.device, self.dtype = store, device, compute_dtype
        self.as_stored = as_stored  # units kept in the stored dtype (the engine widens at use)
        self.verify, self.prefetch_enabled = verify, prefetch
        self.mutable = mutable  # False: units are only read (LoRA), so files may be mapped read-only
        self.mapped, self._advise_cold = _frozen_reads(store, device, mutable, frozen_reads)
        self._size = resident_sizes(store, compute_dtype, as_stored, device)
        self.budget = limit(budget)
        self._check_budget()
        self.stats = PagerStats()
        self._resident: OrderedDict[str, LoadedUnit] = OrderedDict()
        self._loading: dict[str, _Pending] = {}
        self._current: str | None = None
        self._plan: list[str] = []  # the gets to come, in order (`plan`)
        self._at = 0  # how far along the plan the gets have come
        self._raw_ahead: tuple[str, Future] | None = None  # a unit's raw file read ahead, not yet converted
        self._pinned: set[str] = set()
        self.on_evict: list = []  # callbacks(name): whoever holds a unit's tensors lets go
        self._lock = threading.Lock()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="blocktune-read")
        # Host tier and its bounce slots (accelerators only; on the CPU the device tier is host RAM)
        self.host_budget = 0 if device.host_is_device else limit(host_budget)
        self._tier = self._slots = None
        if not device.is_cpu:
            # resident units live in device slots: never more bytes of them than the budget
            self._slots = DeviceSlots(device, self.budget)
            slot = max(sum(round_up(r.nbytes) for r in store.unit_files(n)) for n in store.units)
            self._tier = HostTier(device, self.host_budget, slot)
        elif copied_units(store, compute_dtype, as_stored, device) and counts_views():
            # units converted on the way in (a bf16 store computed in fp32) are converted into
            # slots too: into memory the last unit of their layout left, not a fresh allocation
            # (a page fault per 4 KiB: 0.27 s against 0.06 s for a 7B block here, on every get);
            # only where torch counts a storage's views, or no slot could be seen to come free
            self._slots = DeviceSlots(device, self.budget)
        # CPU, units not mapped (a full fine-tune, or direct reads of frozen units): files are
        # read with direct IO into reused buffers
        self._direct = device.is_cpu and not self.mapped
        self._pool = self._read_buffers() if self._direct else None
        self.loader = UnitLoader(store, device, self._size, self.stats, self._lock, compute_dtype=compute_dtype,
                                 as_stored=as_stored, verify=verify, mapped=self.mapped, direct=self._direct,
                                 tier=self._tier, slots=self._slots, pool=self._pool,
                                 pooled=None if self.holds_two_units or compute_dtype == store.dtype
                                 else copied_units(store, compute_dtype, as_stored, device))
        # `master`: a full fine-tune whose units are read from `store`, a copy of `master` in the
        # compute dtype (`NarrowedCopy`); the write-back steps and commits `master`, and the copy with it
        self.writes = WriteBack(master or store, device, self.stats, self._lock, verify, max_dirty, state_budget,
                                narrowed=store if master is not None else None)

    def _check_budget(self) -> None:
        """A budget below the largest unit is an error that names the budget to use."""
        largest = self.largest_unit
        if self.budget < largest:
            big = max(self._size, key=self._size.get)
            raise BudgetError(
                f"device budget {self.budget:,} bytes is smaller than the largest unit "
                f"({big}: {largest:,} bytes in {dtype_name(self.dtype)}); raise the budget to at "
                f"least {(largest + (1 << 20) - 1) >> 20} MiB"
            )

    def _read_buffers(self) -> BufferPool | None:
        """Reused buffers for direct reads, idle ones kept up to the resident units and one more
        unit (or what was in use at once, if more). Optimizer state never comes whole into
        memory (`optim.streamed_step`), so it takes no buffer."""
        unit_file = max(self.store.unit_bytes(n) for n in self.store.units)
        # resident units are views of their read buffers, unless they are converted to the
        # compute dtype: then a buffer is only in flight, and idle ones are kept up to one
        # unit file. Where the budget holds under two units, only the converted units' reads
        # take from it (`UnitLoader`): read one at a time, each buffer free again once its
        # unit is converted, so one buffer serves them all, in the unit file in flight the
        # budgets count. A fresh buffer per read cost its page faults, and pinning its 4 KiB
        # pages for direct IO took 8 s of kernel time a step (7B shape under 2 GiB, 26 GB read)
        if self.dtype != self.store.dtype:
            idle = unit_file
        else:
            idle = self.budget + unit_file  # (unlimited: `NO_LIMIT`, more than any machine has)
        return BufferPool(idle) if idle else None

    # ---- accounting ----
    @property
    def largest_unit(self) -> int:
        """Bytes of the largest unit as it is held resident (in the compute dtype)."""
        return max(self._size.values())

    @property
    def holds_two_units(self) -> bool:
        """Whether the budget has room for two of the largest units (`budgets.holds_two_units`)."""
        return holds_two_units(self.budget, self.largest_unit)

    @property
    def buffers_in_use_peak(self) -> int:
        """Most read buffers of a full fine-tune alive at once: the resident units, writes in
        flight, and anything else still holding a unit (a graph that pinned one would show)."""
        return self._pool.peak_in_use if self._pool is not None else 0

    @property
    def resident_bytes(self) -> int:
        held = sum(e.nbytes for e in self._resident.values())
        return held + sum(p.reserved for p in self._loading.values())

    @property
    def held(self) -> set[str]:
        """Units resident or being loaded."""
        return set(self._resident) | set(self._loading)

    def _fit_slots(self, name: str) -> None:
        """A unit held as read (on the CPU: not converted, so not in a slot) is about to come in:
        idle slots go until the slots fit in the budget beside every unit held outside them."""
        if self._slots is None or self.loader.slotted(name):
            return
        beside = self._size[name] + sum(e.nbytes for e in self._resident.values() if e.slot is None)
        beside += sum(p.reserved for n, p in self._loading.items() if not self.loader.slotted(n))
        self._slots.make_room(beside)

    def _note_peak(self) -> None:
        self.stats.peak_resident = max(self.stats.peak_resident, self.resident_bytes)

    def drop(self, name: str) -> None:
        """Forget a resident unit (its tensors are out of date: a tied head after the embeddings'
        step); the next `get` reads it again."""
        entry = self._resident.pop(name, None)
        if entry is not None:
            for callback in self.on_evict:
                callback(name)
            self._give_slot(entry)

    def _give_slot(self, entry: LoadedUnit) -> None:
        """An evicted unit's device slot, free once nothing views it and the compute stream has
        passed the event recorded now (what it queued with the unit)."""
        if entry.slot is not None:
            self._slots.give(entry.slot, self.device.record_event())
            entry.slot = None

    def pin(self, name: str) -> None:
        """Keep a resident unit resident until `unpin` (its optimizer step is still to come)."""
        self._pinned.add(name)

    def unpin(self, name: str) -> None:
        self._pinned.discard(name)

    def _next_uses(self) -> dict[str, int]:
        """Each planned unit's next use (its position in the plan), soonest first."""
        uses: dict[str, int] = {}
        for j in range(self._at, len(self._plan)):
            uses.setdefault(self._plan[j], j)
        return uses

    def _make_room(self, need: int, uses: dict[str, int], before: float = -1) -> bool:
        """Evict units until `need` more bytes fit: those used farthest ahead first (unplanned
        ones first of all, least recently used first), never the current or a pinned unit, and
        only units whose next use is after `before`. Evicts nothing if that cannot make room."""
        never = float("inf")
        victims = sorted((n for n in self._resident if n != self._current and n not in self._pinned
                          and uses.get(n, never) > before), key=lambda n: -uses.get(n, never))
        free = self.budget - self.resident_bytes
        if free + sum(self._resident[n].nbytes for n in victims) < need:
            return False
        for victim in victims:
            if self.resident_bytes + need <= self.budget:
                break
            entry = self._resident.pop(victim)
            for callback in self.on_evict:
                callback(victim)
            if entry.slot is not None:
                self._give_slot(entry)  # views of a slot: dropped here, so the slot is free at once
                continue
            # the last reference goes on the reader thread: unmapping 50-400 MB and the madvise
            # take page-table walks the compute need not wait for
            self._reader.submit(self._release, entry)
        return True

    def _release(self, entry: LoadedUnit) -> None:
        """Runs on the reader thread, which then drops `entry` (the work item holds it)."""
        if self._advise_cold:
            advise_cold(entry.tensors.values())

    # ---- loading ----
    @property
    def slots(self) -> DeviceSlots | None:
        """The slots resident units are copied into (accelerators, and converted units on the
        CPU; None where nothing is copied)."""
        return self._slots

    @property
    def host_tier_bytes(self) -> int:
        """Host memory the tier and its bounce slots hold (page-locked, exactly)."""
        return self._tier.bytes if self._tier is not None else 0

    def plan(self, names: list[str]) -> None:
        """The units the next gets will ask for, in order; reading ahead starts now."""
        self._plan, self._at = list(names), 0
        self._fill()

    def _advance(self, name: str) -> None:
        """A get of a unit other than the current one: the plan moves past its next planned use
        (an unplanned get moves nothing)."""
        try:
            self._at = self._plan.index(name, self._at) + 1
        except ValueError:
            pass

    def _fill(self) -> None:
        """Start loading the next planned units that are not resident, soonest first, while
        the budget has room for them without evicting anything needed before them."""
        if not self.prefetch_enabled:
            return
        uses = self._next_uses()
        for name, at in uses.items():
            if name in self._resident or name in self._loading or name == self._current:
                continue
            if name == self.raw_ahead:
                return  # its raw file is read ahead already: converted when it is asked for
            if not self.device.copies_on_any_thread and len(self._loading) >= BOUNCE_SLOTS:
                return  # (MPS) a third load would wait for a bounce slot only a get frees
            if not self._make_room(self._size[name], uses, before=at):
                self._start_raw_ahead()  # no room: its raw file, at least, may be read ahead
                return
            self._fit_slots(name)
            self._loading[name] = _Pending(self._reader.submit(self.loader.load, name), self._size[name])
            self._note_peak()

    def _reads_raw_ahead(self, name: str) -> bool:
        """Whether `name`'s raw file can be read ahead without room in the budget: on the CPU,
        read directly into a buffer of its own and converted to the compute dtype after."""
        return self._direct and self._size[name] > self.store.unit_bytes(name)

    @property
    def raw_ahead(self) -> str | None:
        """The unit whose raw file is read ahead outside the budget, waiting for room."""
        return self._raw_ahead[0] if self._raw_ahead is not None else None

    def _start_raw_ahead(self) -> None:
        """Start reading the next planned unit's raw file ahead if the budget cannot hold it
        (beside a unit being converted, two raw files are in flight: what `auto` keeps room for)."""
        if self._raw_ahead is not None or not self.prefetch_enabled:
            return
        for name in self._next_uses():
            if name in self._resident or name in self._loading or name == self._current:
                continue
            if self._reads_raw_ahead(name) and self.resident_bytes + self._size[name] > self.budget:
                self._raw_ahead = (name, self._reader.submit(self.loader.read, name))
            return

    def _take_raw_ahead(self, name: str) -> Future | None:
        """The raw read ahead of `name`'s file, if that is the one in flight; another unit's is
        let go."""
        raw, self._raw_ahead = self._raw_ahead, None
        if raw is None:
            return None
        if raw[0] == name:
            return raw[1]
        try:
            raw[1].result()
        except Exception:
            pass  # a read that failed is read again, and fails there, when its unit is asked for
        return None

    def get(self, name: str) -> dict[str, torch.Tensor]:
        """The unit's tensors on the device in the compute dtype; it becomes the current unit,
        and reading ahead goes on from it."""
        again = name == self._current  # a kept graph's weights ask again: nothing moves on
        if not again:
            self._advance(name)
        self._current = name
        if name in self._resident:
            self._resident.move_to_end(name)
            self.stats.hits += 1
            entry = self._resident[name]
        else:
            t0 = time.perf_counter()
            pending = self._loading.pop(name, None)
            if pending is None:
                raw = self._take_raw_ahead(name)
                if raw is None:
                    self.stats.demand_reads += 1
                if not self.device.copies_on_any_thread:
                    self._drain()  # (MPS) its read may need a bounce slot that only a get frees
                uses = self._next_uses()
                if not self._make_room(self._size[name], uses):
                    self._drain()  # loads in flight hold reservations: land them, then evict
                    self._make_room(self._size[name], uses)
                self._fit_slots(name)
                self._loading[name] = _Pending(Future(), self._size[name])  # reserve while loading
                self._note_peak()
                try:
                    if raw is not None:  # read ahead: convert it now that there is room
                        host = raw.result()
                        del raw  # (the future holds the raw buffer too)
                        # into its slot: a copy, no page faults; this thread waits for it
                        entry = self.loader.to_device(name, *host, demand=True)
                        del host
                        self._start_raw_ahead()  # the next raw file once this one's memory is free
                        self.stats.staged_reads += 1
                    else:
                        entry = self._reader.submit(self.loader.load, name, True).result()
                finally:
                    del self._loading[name]
            else:
                entry = pending.future.result()
            entry = self.loader.on_device(name, entry)
            self.stats.wait_seconds += time.perf_counter() - t0
            self._resident[name] = entry
            self._note_peak()
        if not again:
            self._fill()
        if entry.ready is not None:
            # the compute stream waits for the copy (no host sync), and the allocator learns
            # that the compute stream uses these tensors, so their memory is not reused early
            self.device.wait_event(entry.ready)
            self.device.record_stream(entry.tensors.values())
            entry.ready = None
        return entry.tensors

    def _drain(self) -> None:
        for other, p in list(self._loading.items()):
            entry = self.loader.on_device(other, p.future.result())
            del self._loading[other]
            self._resident[other] = entry
            self._resident.move_to_end(other, last=False)  # first to go

    # ---- writing: blocktune.paging.writeback ----
    def step_and_write(self, name: str, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                       optimizer: OptimizerConfig, lr: float, step: int) -> Future:
        """A full fine-tune's step of a unit and its new version, in the background (where the
        budget holds under two units, memory is tight: finished before this returns)."""
        return self.writes.step_and_write(name, params, grads, optimizer, lr, step,
                                          tight=not self.holds_two_units)

    def commit(self, step: int, **extra) -> None:
        self.writes.commit(step, **extra)

    def abort_writes(self) -> None:
        self.writes.abort()

    def close(self) -> None:
        self.writes.close()
        self._take_raw_ahead("")
        for p in self._loading.values():  # in the order they were asked for
            try:
                entry = p.future.result()
            except Exception:
                continue
            if entry.landed is not None:  # (MPS) never copied: its bounce slot is free
                entry.landed.set()
        self._reader.shutdown(wait=True)
        self._resident.clear()
        self._loading.clear()
        self.loader.close()
        if self._tier is not None:
            self._tier.close()  # page-locked memory goes back to the OS
        if self._slots is not None:
            self._slots.close()
        if self._pool is not None:
            self._pool.clear()


def _frozen_reads(store: BlockStore, device: Device, mutable: bool, frozen_reads: str) -> tuple[bool, bool]:
    """Whether frozen units are mapped, and whether evicted mapped units are advised cold.

    CPU, frozen units: "mapped" (the page cache, for stores that fit in RAM) or "direct"
    (O_DIRECT into reused huge-page buffers: for stores bigger than RAM, twice the cold read
    rate of mapped reads here, and no page cache for the kernel to juggle); "auto": direct
    where the store is more than 80% of the memory available. Evicted mapped units are advised
    cold only where the page cache may run short: the advice clears the pages' accessed bits
    (TLB flushes the compute pays for, ~3% of a LoRA step here) and is wasted where the store
    stays cached anyway."""
    check_frozen_reads(frozen_reads)
    available = host_memory_available()
    if frozen_reads == "auto":
        big = available is not None and store.total_bytes() > 0.8 * available
        frozen_reads = "direct" if big else "mapped"
    mapped = device.is_cpu and not mutable and frozen_reads == "mapped"
    return mapped, mapped and (available is None or store.total_bytes() > available / 2)
