"""How a unit comes in: from the store (mapped, or read directly into reused buffers), or from
the host tier, then copied into a device slot (`slots`) and converted to the compute dtype on
the copy stream. `UnitLoader` does it for the `Pager`, on the pager's reader thread (where only
the computing thread may copy, MPS, the copy waits for `get`)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from blocktune.machine.devices import Device
from blocktune.machine.hostmem import ensure_resident
from blocktune.paging.buffers import BufferPool
from blocktune.paging.hosttier import HostTier
from blocktune.paging.slots import DeviceSlots, slot_layout
from blocktune.store.store import BlockStore

__all__ = ["LoadedUnit", "UnitLoader", "copied_units", "resident_sizes", "resident_specs"]

DEMAND_WAIT_S = 1.0  # a load the computing thread waits for: how long it waits for a slot's holder


def resident_specs(store: BlockStore, name: str, compute_dtype: torch.dtype,
                   as_stored: frozenset[str] = frozenset()) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """A unit's tensors as they are held on an accelerator: floating ones in the compute
    dtype (units in `as_stored` stay as stored)."""
    tensors = store.unit_tensors(name)
    if name in as_stored:
        return tensors
    return {k: (compute_dtype if dt.is_floating_point else dt, shape) for k, (dt, shape) in tensors.items()}


def copied_units(store: BlockStore, compute_dtype: torch.dtype, as_stored: frozenset[str],
                 device: Device | None = None) -> frozenset[str]:
    """The units copied into slots (`slots`): every unit on an accelerator; on the CPU (`device`
    None) those converted to the compute dtype on the way in (the rest are used as read: views of
    their read buffers or of the mapped file)."""
    if device is not None and not device.is_cpu:
        return frozenset(store.units)
    if compute_dtype == store.dtype:
        return frozenset()
    return frozenset(n for n in store.units if n not in as_stored)


def resident_sizes(store: BlockStore, compute_dtype: torch.dtype,
                   as_stored: frozenset[str] = frozenset(), device: Device | None = None) -> dict[str, int]:
    """Bytes of each unit as it is held resident: the slot it is copied into (`slots`) where it
    is copied (on an accelerator, and on the CPU where it is converted to the compute dtype);
    otherwise its files (units in `as_stored` stay in the stored dtype)."""
    copied = copied_units(store, compute_dtype, as_stored, device)
    return {n: slot_layout(resident_specs(store, n, compute_dtype, as_stored))[1] if n in copied
            else store.unit_bytes(n) for n in store.units}


@dataclass
class LoadedUnit:
    """A unit as loaded: resident, or on its way (a load in flight returns one)."""
    tensors: dict[str, torch.Tensor]
    nbytes: int
    ready: object = None  # the event after the copy to the device, still in flight
    landed: Landed | None = None  # tensors still in host memory: `get` copies them (MPS)
    slot: object = None  # the device slot the tensors are views of (accelerators)


class Landed:
    """A host slot's copy made by the computing thread (MPS): set once `get` has copied."""

    def __init__(self):
        self._done = threading.Event()

    def set(self) -> None:
        self._done.set()

    def synchronize(self) -> None:
        self._done.wait()


def _nbytes(tensors: dict[str, torch.Tensor] | None) -> int:
    return sum(t.numel() * t.element_size() for t in (tensors or {}).values())


class UnitLoader:
    """Brings units in for a pager: host copies (`read`), then device copies (`to_device`).

    The pager hands it the read paths it chose (`mapped`: frozen units mapped read-only from
    the page cache; `direct`: read with direct IO, into `pool`'s buffers if any, for the units
    in `pooled` or all), its host tier
    and device slots (accelerators), each unit's resident bytes (`sizes`), and the counters and
    their lock it shares with the write-back. The loader owns the files it keeps mapped, each
    unit's slot layout and the copy stream.
    """

    def __init__(self, store: BlockStore, device: Device, sizes: dict[str, int], stats, lock: threading.Lock, *,
                 compute_dtype: torch.dtype, as_stored: frozenset[str], verify: bool | str,
                 mapped: bool, direct: bool, tier: HostTier | None, slots: DeviceSlots | None,
                 pool: BufferPool | None, pooled: frozenset[str] | None = None):
        self.store, self.device, self.dtype, self.as_stored = store, device, compute_dtype, as_stored
        self.verify, self.mapped, self.direct = verify, mapped, direct
        self._size, self.stats, self._lock = sizes, stats, lock
        self._tier, self._slots, self._pool = tier, slots, pool
        self._pooled = pooled  # the units whose direct reads take `pool`'s buffers (None: all)
        self._copy_stream = device.copy_stream()
        self._maps: dict[str, dict[str, torch.Tensor]] = {}  # file -> its mapped tensors (reader thread)
        copied = copied_units(store, compute_dtype, as_stored, device)
        self._layouts = {} if slots is None else {  # the units copied into slots, and where each tensor goes
            n: slot_layout(resident_specs(store, n, compute_dtype, as_stored))[0] for n in copied}

    def slotted(self, name: str) -> bool:
        """Whether the unit is copied into a slot (else held as read, or converted fresh)."""
        return name in self._layouts

    def read(self, name: str) -> tuple[dict[str, torch.Tensor], object]:
        """The unit's tensors in host memory, and the host slot they are in (accelerators), its
        time counted as reading."""
        t0 = time.perf_counter()
        host, slot = self._host_copy(name)
        with self._lock:
            self.stats.read_seconds += time.perf_counter() - t0
        return host, slot

    def _host_copy(self, name: str):
        """From the host tier, or read from disk."""
        slot = None
        if self._tier is not None:
            file = self.store.unit_version(name)
            host = self._tier.get(file)
            if host is not None:
                with self._lock:
                    self.stats.host_hits += 1
                return host, None
            slot, keep = self._tier.slot_for(name, file)
            host = self.store.read_unit(name, alloc=slot.alloc, verify=self.verify)
            if keep:
                self._tier.keep(name, file, host, slot)
        elif self.mapped:
            host = self._mapped(name)
        else:  # on the CPU, past the page cache: a unit is read once a pass, and RAM is short
            pooled = self._pool is not None and (self._pooled is None or name in self._pooled)
            alloc = self._pool.take if pooled else None
            host = self.store.read_unit(name, alloc=alloc, verify=self.verify, direct=self.direct)
        with self._lock:
            self.stats.bytes_read += self.store.unit_bytes(name)
            self.stats.unit_reads += 1
            self.stats.reads_by_unit[name] = self.stats.reads_by_unit.get(name, 0) + 1
        return host, slot

    def _mapped(self, name: str) -> dict[str, torch.Tensor]:
        """CPU, frozen units: the unit file mapped read-only, so compute reads the page cache
        directly. A file stays mapped after its unit is evicted (advised cold, so reclaim takes
        its pages first under memory pressure): loading it again costs a residency check, not
        a fresh map, page-table fill and unmap (5 ms per 50 MB unit, on the core compute needs).
        With verify="always" every load maps and checks the file anew."""
        version = self.store.unit_version(name)
        if self.verify in (True, "always"):
            return self.store.read_unit(name, verify=True, map_file=True)
        tensors = self._maps.get(version)
        if tensors is None:
            tensors = self._maps[version] = self.store.read_unit(name, verify=self.verify, map_file=True)
        else:
            ensure_resident(tensors.values())
        return dict(tensors)

    def load(self, name: str, demand: bool = False) -> LoadedUnit:
        """Runs on the reader thread only (the host tier and its slots are its own). Where only
        the computing thread may copy to the device (MPS), the unit comes back in host memory
        and `get` copies it (`on_device`); its slot is reused only after that."""
        host, slot = self.read(name)  # the disk read (or the tier's hit), then the copy below
        if not self.device.copies_on_any_thread:
            landed = Landed()
            if slot is not None:
                self._tier.copied(slot, landed)
            return LoadedUnit(host, self._size[name], landed=landed)
        return self.to_device(name, host, slot, demand)

    def to_device(self, name: str, host: dict[str, torch.Tensor], slot, demand: bool = False) -> LoadedUnit:
        """The unit's host copy (from `read`) on the device in the compute dtype. `demand`: the
        computing thread waits for this copy, so a slot that thread still views will not come
        free: waiting for one is cut short."""
        t0 = time.perf_counter()
        tensors, dslot = {}, None
        with self.device.stream(self._copy_stream):
            if name in self._layouts:  # into a slot, once the compute is done with its last unit
                dslot = self._slots.take(self._size[name], DEMAND_WAIT_S if demand else None)
                self.device.wait_event(dslot.released)
                tensors = dslot.views(self._layouts[name])
                if tensors.keys() != host.keys():
                    raise RuntimeError(f"unit {name}: its file holds {sorted(host)}, the manifest says "
                                       f"{sorted(tensors)}; run `blocktune verify` on the store")
                for k, v in host.items():  # copied and converted in one op on the copy stream
                    self.device.copy_into(tensors[k], v)
            else:
                wide = self.dtype if name not in self.as_stored else None
                for k, v in host.items():
                    tensors[k] = self.device.to_device(v, wide if v.is_floating_point() else None)
            ready = self.device.record_event(self._copy_stream)
        if slot is not None:
            self._tier.copied(slot, ready)
        with self._lock:
            self.stats.read_seconds += time.perf_counter() - t0
            if not self.device.is_cpu:
                self.stats.bytes_to_device += self.store.unit_bytes(name)
        if dslot is not None:
            return LoadedUnit(tensors, self._size[name], ready=ready, slot=dslot)
        return LoadedUnit(tensors, _nbytes(tensors), ready=ready)

    def on_device(self, name: str, unit: LoadedUnit) -> LoadedUnit:
        """A loaded unit, copied to the device here if it came back in host memory (MPS)."""
        if unit.landed is None:
            return unit
        on_device = self.to_device(name, unit.tensors, None, demand=True)  # on the computing thread
        unit.landed.set()
        return on_device

    def close(self) -> None:
        """Lets go of the files kept mapped (the reader thread has stopped)."""
        self._maps.clear()
