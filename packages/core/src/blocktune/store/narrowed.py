"""A store's units in a narrower dtype, written once beside it for one run to read.

A LoRA run on the CPU that computes in bf16 from an fp32 store, with units paged through RAM,
would read every unit twice a step and convert it at every read. `NarrowedCopy` writes the units
in the compute dtype once, into a `ScratchDir` in the store folder (`.narrowed.partial-PID-*`,
locked by its maker; one a killed run left goes with the next copy, and `verify` reports it),
and opens it as a store: the same values the pager's conversion gives (the same rounding), half
the bytes a pass, no conversion. A full fine-tune of such a store (`full`) reads the copy too,
and its write-back writes each step's new weights into it as new versions, committed with the
store's step: the parameters as the step rounded them from the fp32 masters, the same values
the conversion of the store's new files would give. Where the disk or the RAM has no room for
it, no copy is made and `note` says why. `close` removes it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import torch

from blocktune.errors import StoreError
from blocktune.machine.devices import dtype_name
from blocktune.machine.hostmem import host_memory_free, trim_host_heap
from blocktune.store.build import build_store
from blocktune.store.safefiles import ScratchDir, is_write_failure, readable_size
from blocktune.store.store import NARROWED, BlockStore

__all__ = ["NarrowedCopy"]


class NarrowedCopy:
    """`source`'s units in `dtype`, or the reason there are none: `store` (None where no copy was
    made) and `note`, the line the run's log says."""

    def __init__(self, source: BlockStore, dtype: torch.dtype, verify: bool | str, full: bool = False):
        self.source, self.dtype, self.verify, self.full = source, dtype, verify, full
        self.store: BlockStore | None = None
        self._scratch: ScratchDir | None = None
        self.note = self._make()

    def _make(self) -> str:
        source, name = self.source, dtype_name(self.dtype)
        need = sum(source.unit_bytes(n) for n in source.units) * self.dtype.itemsize // source.dtype.itemsize
        free = shutil.disk_usage(source.path).free
        # as much again left free: another run may be writing this store's next step; a full
        # fine-tune's copy takes a new version a step, written over the one of two steps back
        times = 4 if self.full else 2
        if free < times * need:
            return self.unused(f"a {name} copy would take {readable_size(need)}{' a step' if self.full else ''} "
                               f"and its disk has {readable_size(free)} free ({times} times that is asked)")
        # a unit read, its narrowed copy and the one before it being written (2x the largest),
        # and a margin for the page cache a file takes before it is synced
        ram, free_ram = 5 * max(source.unit_bytes(n) for n in source.units) // 2, host_memory_free()
        if free_ram is not None and free_ram < ram:
            return self.unused(f"making the copy takes {readable_size(ram)} of RAM, and {readable_size(free_ram)} "
                               "is free")
        t0 = time.perf_counter()
        try:
            scratch = ScratchDir(source.path / NARROWED)
        except OSError as exc:  # a folder blocktune may read, not write
            return self.unused(f"no folder could be made in it ({exc.strerror})")
        try:
            self.store = build_store(scratch.path / "store", source.args, self._units(), self.dtype,
                                     cache=False)  # opened, its files pinned until `close`
        except BaseException as exc:
            scratch.close()
            cause = exc.__cause__ if isinstance(exc, StoreError) and exc.__cause__ is not None else exc
            if not (isinstance(cause, OSError) or is_write_failure(cause)):
                raise
            return self.unused(f"its {name} copy could not be written ({cause})")
        self._scratch = scratch
        trim_host_heap()  # the copy's pieces freed: the heap they grew goes back before budgets are worked out
        made = f"({readable_size(need)} in {time.perf_counter() - t0:.1f} s, in {scratch.path}, removed at the end)"
        if self.full:
            return (f"units read as {name}: the {dtype_name(source.dtype)} store was narrowed {made}, and each step "
                    f"writes its new weights there too, as rounded to {name} for the compute, so each pass reads "
                    f"half the bytes and converts none (the {dtype_name(source.dtype)} masters are stepped in the store)")
        return (f"frozen units read as {name}: the {dtype_name(source.dtype)} store was narrowed once {made}, "
                "so each pass reads half the bytes and converts none")

    def _units(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """Each unit of the source in `dtype`, one at a time (a tied head: its norm only)."""
        for n in self.source.units:
            tensors = self.source.read_unit(n, verify=self.verify, direct=True)
            if n == "head" and self.source.tied:
                del tensors["output.weight"]  # the embedding's, which read_unit lends it
            narrow = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in tensors.items()}
            del tensors  # not held while the next unit is read
            yield n, narrow

    def unused(self, why: str) -> str:
        """Drop the copy, if any: the source is read, and converted at every pass, because `why`."""
        self.close()
        self.note = (f"note: the {dtype_name(self.source.dtype)} units of {self.source.path} are converted to "
                     f"{dtype_name(self.dtype)} at every read: {why}")
        return self.note

    def close(self) -> None:
        """Let go of the copy and remove it."""
        if self._scratch is not None:
            self.store.close()
            self._scratch.close()
            self._scratch, self.store = None, None
