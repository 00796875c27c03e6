"""Write-back: a full fine-tune's new unit versions, made and written off the compute thread.

`step_and_write` runs a unit's optimizer step a piece of state at a time and writes the new
weights and state as new files (invisible until commit) on the writer thread — the only
thread that creates or deletes store files (a unit file of masters is written beside the
state file on a thread of its own, within the writer thread's job, which waits for it);
`commit` waits for every write of the step and switches the manifest atomically, then
deletes the last step's files in the background. At
most one step waits behind the one being written (each holds its unit and gradients), and
written-but-unsynced bytes are bounded (`max_dirty`): a memory cgroup v1 does not throttle
dirty pages, and they are memory the kernel cannot reclaim until they reach the disk.

Where the budgets leave room (`Budgets.state`, on the CPU), each unit's new optimizer state is
also kept in RAM (`StateInRam`, keyed by the file it was written to) and the next step reads it
there and updates it in place, instead of reading the file back: mapped, a state file came back
at about 0.5 GB/s, and the last unit's (the embeddings') was most of the wait at the commit.

What is read back (the state, and the masters that the unit file holds) goes into buffers the
write-back reuses within a step (`BufferPool`), let go at its commit. In fresh buffers, the
kernel zeroed every page as the direct read pinned it: the laptop-shaped full fine-tune under
1 GiB streamed 10.5 GB a step so, and zeroing pages was 11% of both cores' time (perf).
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from blocktune.engine.optim import OptimizerConfig, state_kinds, streamed_step
from blocktune.errors import StoreError
from blocktune.machine.devices import Device
from blocktune.paging.budgets import limit
from blocktune.paging.buffers import BufferPool
from blocktune.store.fileio import STREAM_AHEAD, StreamedTensors, aligned_empty
from blocktune.store.records import FileRecord
from blocktune.store.store import BlockStore

__all__ = ["WriteBack", "StateInRam"]

# what the write-back's streams read into, in use or idle, reused within a step: four of their
# read-aheads. Their pieces and whole tensors differ in size: with three, 4.1 of the laptop
# shape's 10.5 GB a step still went into fresh buffers (1.0 with four, 8.9 with two). With four,
# its full step under 1 GiB peaked at 1.01 GB of anonymous memory, not 0.92-0.95: the budgets
# do not count the pool, as they never counted the read-aheads (with its 128 MiB past those
# counted, `auto` found no room there for the spill's overlap, and the step was slower than
# without the pool)
READ_BACK_POOL = 4 * STREAM_AHEAD


class StateInRam:
    """Units' optimizer state as last written, in RAM, within `budget` bytes: an entry is the
    pieces of one state file, keyed by that file's record, so a state the store no longer
    records (a step aborted, rolled back, or started again from the base) is never used. An
    entry is taken out while its unit's step updates it in place, and put back once the new
    file is written; a step that fails leaves nothing behind."""

    def __init__(self, budget: int = 0):
        self.budget, self.nbytes = budget, 0
        self._entries: dict[str, tuple[FileRecord, dict[str, torch.Tensor]]] = {}

    def take(self, name: str, record: FileRecord | None) -> dict[str, torch.Tensor] | None:
        """`name`'s state if it is the one `record` names (its entry is removed), else None."""
        entry = self._entries.pop(name, None)
        if entry is None:
            return None
        self.nbytes -= _bytes(entry[1])
        return entry[1] if record is not None and entry[0] == record else None

    def room(self, nbytes: int) -> bool:
        return self.budget > 0 and self.nbytes + nbytes <= self.budget

    def put(self, name: str, record: FileRecord, pieces: dict[str, torch.Tensor]) -> None:
        self._entries[name] = (record, pieces)
        self.nbytes += _bytes(pieces)

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0


def _bytes(pieces: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in pieces.values())


class _MasterTee:
    """Where weights are stored wider than they compute in (an fp32 store under bf16 compute),
    the fp32 masters are the stored weights: their pieces are taken out of the stream that goes
    to the state file and written, as they come, to the new unit file, on a thread of its own
    (`FedFile`), not from the rounded parameters. The state file holds no masters then (the unit
    file is them, bit for bit: a third less written a step, an AdamW state of two moments); a step
    with no masters in its old state makes them from the unit file (`first`), which a resume reads
    anyway. The two files are written side by side, so no unit's masters are ever whole in memory
    (gathered, a block's took 113 MB beside the step and a copy of each tensor to join them)."""

    def __init__(self, store_dtype: torch.dtype, params: dict[str, torch.Tensor], optimizer: OptimizerConfig):
        compute = next((p.dtype for p in params.values() if p.is_floating_point()), store_dtype)
        self.keep = "master" in state_kinds(optimizer, store_dtype, compute) and (
            store_dtype.itemsize > compute.itemsize)
        self.dtype = store_dtype
        self.shapes = {k: p.shape for k, p in params.items()}
        self.unit_file: FedFile | None = None  # where the masters go, once `start`ed

    def first(self, old: dict | None) -> bool:
        """Whether the masters come from the unit file now (weights stored wider than the
        parameters, and no masters in the old state: the first step, or any step whose state is
        read back from its file): the stored weights, not the parameters' rounding of them."""
        return self.keep and not (old is not None and any(k.startswith("master.") for k in old))

    def file_spec(self, spec):
        """The state file's tensors: `spec` less the masters where the unit file holds them."""
        return [s for s in spec if not (self.keep and s[0].startswith("master."))]

    def start(self, spec, write: Callable[[list, Iterable[torch.Tensor]], FileRecord], pool: ThreadPoolExecutor) -> None:
        """Where `spec` has masters to keep: start their unit file, `write(unit spec, pieces)` on
        `pool`, its tensors in the order their pieces come (the parameters')."""
        keys = list(dict.fromkeys(n.partition(".")[2].rpartition("#")[0] for n, _, _ in spec
                                  if self.keep and n.startswith("master.")))
        if keys:
            unit_spec = [(k, self.dtype, tuple(self.shapes[k])) for k in keys]
            self.unit_file = FedFile(pool, lambda pieces: write(unit_spec, pieces))

    def tee(self, spec, data):
        """The state file's pieces of `data` (in `spec`'s order), the masters handed to the unit file."""
        for (name, _, _), piece in zip(spec, data, strict=True):
            if self.unit_file is not None and name.startswith("master."):
                self.unit_file.put(piece.to(self.dtype))
                continue
            yield piece


class FedFile:
    """A file written on a pool's thread from pieces handed to it one at a time (`put`, at most
    `depth` waiting), while the caller goes on making them. `finish` ends it and returns what
    the writer returned; `abandon` makes the writer raise, so the file is removed as any failed
    write's is. A failed writer's error is raised to the caller at its next `put`."""

    _END = object()

    def __init__(self, pool: ThreadPoolExecutor, write: Callable[[Iterable[torch.Tensor]], FileRecord], depth: int = 1):
        self._queue: queue.Queue = queue.Queue(depth)
        self._future = pool.submit(write, self._pieces())

    def _pieces(self):
        while (item := self._queue.get()) is not self._END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def put(self, piece) -> None:
        while True:
            if self._future.done():  # the writer stopped: its error, or one that says why not
                self._future.result()
                raise StoreError("a unit file's writer stopped before the last of its pieces")
            try:
                self._queue.put(piece, timeout=0.05)
                return
            except queue.Full:
                continue

    def finish(self) -> FileRecord:
        self.put(self._END)
        return self._future.result()

    def abandon(self) -> None:
        """Stop the writer where it is (the file it made is removed) and wait for it."""
        if not self._future.done():
            try:
                self.put(StoreError("abandoned: the step that fed this file failed"))
            except BaseException:
                pass
        wait([self._future])


def _pieced(rec: FileRecord) -> bool:
    """Whether a state file holds its tensors in pieces, each read once (`optim.streamed_step`)."""
    return all("#" in k for k in rec.tensors if k != "step")


def _kept(spec, data, keep: dict[str, torch.Tensor]):
    """The new state's pieces as they go to the file, also kept (by name) for the next step."""
    for (name, _, _), piece in zip(spec, data, strict=True):
        keep[name] = piece
        yield piece


class WriteBack:
    MAX_QUEUED_WRITES = 1  # unit write-backs waiting or in progress at once

    def __init__(self, store: BlockStore, device: Device, stats, lock: threading.Lock,
                 verify: bool | str = "once", max_dirty: int | None = 512 << 20, state_budget: int = 0,
                 narrowed: BlockStore | None = None):
        self.store, self.device, self.stats, self._lock, self.verify = store, device, stats, lock, verify
        # the copy of `store` in the compute dtype the pager reads (`NarrowedCopy`): each unit's
        # new weights, as the step rounded them, are written to it too, and committed with it
        self.narrowed = narrowed
        self._narrowed_recs: dict[str, FileRecord] = {}
        self.max_dirty = limit(max_dirty)
        # the state is stepped where it is read: in RAM only where RAM is the device
        self.in_ram = StateInRam(state_budget if device.host_is_device else 0)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="blocktune-write")
        self._side = ThreadPoolExecutor(1, thread_name_prefix="blocktune-masters")  # `FedFile`s, within a job
        self._writes: list[Future] = []
        self._unsynced: list[FileRecord] = []
        self._reads = BufferPool(READ_BACK_POOL, to_high_water=False)  # `_read_buffer`

    def step_and_write(self, name: str, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                       optimizer: OptimizerConfig, lr: float, step: int, tight: bool = False) -> Future:
        """A full fine-tune's optimizer step of a unit, and its new version (weights and
        state), in the background: the old state is read a piece at a time and the new one
        written as it is made (`optim.streamed_step`), so no unit's state is ever whole in
        memory; `params` are stepped in place, then written in the store's dtype."""
        import time

        event = self.device.record_event()

        def job() -> tuple[str, FileRecord, FileRecord | None]:
            t0 = time.perf_counter()
            if event is not None:
                event.synchronize()  # the gradients are complete
            old_rec = self.store.state_record(name)
            old = self.in_ram.take(name, old_rec)  # the last step's, in RAM: updated in place
            in_ram = old is not None
            streamed = None
            if old is None and old_rec is not None and _pieced(old_rec):
                # read once, in file order, as the step takes its pieces: direct reads ahead
                old = streamed = self.store.stream_state(name, verify=self.verify, alloc=self._read_buffer)
            elif old is None:  # a file of whole tensors (written before pieces were): mapped
                old = self.store.map_state(name, verify=self.verify)
            dev = self.device
            to_device = None if dev.is_cpu else (lambda t: dev.to_device(t, torch.float32))
            masters = _MasterTee(self.store.dtype, params, optimizer)
            # the masters as stored, read a piece at a time as the step goes (as a state file is):
            # read once, in the step's order, or else mapped
            stored, read_again = None, 0
            if masters.first(old):
                stored = self.store.stream_unit(name, list(params), verify=self.verify,
                                                alloc=self._read_buffer) or self.store.read_unit(
                    name, verify=self.verify, map_file=True, populate=False)
                # the unit's file a second time this step (the pager read it for the backward)
                read_again = self.store.unit_bytes(name)
            streams = [f for f in (streamed, stored) if isinstance(f, StreamedTensors)]
            try:
                # the pieces kept in RAM, or read for this step alone, are stepped in place
                owned = (old is None or in_ram or streamed is not None) and (
                    stored is None or isinstance(stored, StreamedTensors))
                spec, data = streamed_step(optimizer, params, grads, old, lr, self.store.dtype, to_device, stored,
                                           owned=owned)
                if not dev.is_cpu:
                    data = (dev.to_host(piece) for piece in data)
                keep = {} if self.in_ram.room(sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in spec)) else None
                if keep is not None:
                    data = _kept(spec, data, keep)
                # a store wider than the compute: its new weights are the masters, written as they come
                masters.start(spec, lambda unit_spec, pieces: self.store.write_unit_pieces(
                    name, unit_spec, pieces, step, sync=False, direct=True), self._side)
                # fsync'd at commit; direct IO: every unit is rewritten every step, caching it helps nothing
                srec = self.store.write_state_stream(name, masters.file_spec(spec), masters.tee(spec, data), step,
                                                     sync=False, direct=True)
                rec = masters.unit_file.finish() if masters.unit_file is not None else None
            finally:
                for f in streams:
                    f.close()
                if masters.unit_file is not None:
                    masters.unit_file.abandon()  # a no-op once finished
            del old, data, stored, streamed, streams
            if keep is not None:
                self.in_ram.put(name, srec, keep)
            if rec is None and dev.is_cpu and all(v.dtype == self.store.dtype for v in params.values()
                                                  if v.is_floating_point()):
                rec = self.store.write_unit(name, params, step, sync=False, direct=True)  # from its buffer
            elif rec is None:
                rec = self.store.write_unit_stream(name, params, step, sync=False, direct=True,
                                                   to_host=None if dev.is_cpu else dev.to_host)
            self._bound_dirty([rec, srec])
            written = [rec, srec]
            if self.narrowed is not None:  # the parameters: the new masters rounded to the compute dtype
                nrec = self.narrowed.write_unit(name, params, step, sync=False, direct=True)
                written.append(nrec)  # (direct IO: no dirty pages; its commit fsyncs it)
                with self._lock:
                    self._narrowed_recs[name] = nrec
            with self._lock:
                self.stats.bytes_read += (old_rec.nbytes if old_rec is not None and not in_ram else 0) + read_again
                self.stats.bytes_written += sum(r.nbytes for r in written)
                self.stats.unit_writes += 1
                self.stats.write_seconds += time.perf_counter() - t0
            return name, rec, srec

        # A queued step holds its unit and gradients in memory: with the disk behind, wait for the
        # oldest rather than let the queue (and RSS) grow. Where memory is `tight`, the write
        # finishes before the backward goes on. Errors surface at commit.
        queued = [f for f in self._writes if not f.done()]
        if len(queued) >= self.MAX_QUEUED_WRITES:
            wait(queued[:len(queued) - self.MAX_QUEUED_WRITES + 1])
        if not self.device.copies_on_any_thread:  # MPS: the step's copies stay on this thread
            fut = Future()
            try:
                fut.set_result(job())
            except BaseException as exc:  # surfaces at commit, as a background write's would
                fut.set_exception(exc)
            self._writes.append(fut)
            return fut
        fut = self._writer.submit(job)
        self._writes.append(fut)
        if tight:
            wait([fut])
        return fut

    def _read_buffer(self, nbytes: int) -> torch.Tensor:
        """Memory for a stream's read: from the pool, up to a read-ahead's bytes. A bigger read
        (a whole tensor past 64 MiB, read as masters: a big model's embeddings or FFN weights)
        gets memory of its own, freed once used: kept in the pool, such a buffer would sit idle
        beside the smaller reads, none of which it serves."""
        return self._reads.take(nbytes) if nbytes <= STREAM_AHEAD else aligned_empty(nbytes)

    def _bound_dirty(self, written: list[FileRecord]) -> None:
        """Unsynced written data is memory the kernel cannot reclaim until it reaches the disk
        (and a memory cgroup v1 does not throttle it): past `max_dirty` bytes, sync it now."""
        self._unsynced += written
        if sum(r.nbytes for r in self._unsynced) > self.max_dirty:
            for r in self._unsynced:
                fd = os.open(self.store.path / r.file, os.O_RDONLY)
                try:
                    getattr(os, "fdatasync", os.fsync)(fd)  # macOS has no fdatasync
                    if hasattr(os, "posix_fadvise"):  # nor posix_fadvise
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # written: not needed in RAM
                finally:
                    os.close(fd)
            self._unsynced = []

    def commit(self, step: int, **extra) -> None:
        """Wait for every write of this step, then switch the store's manifest to it atomically
        (`extra`: fields that go into the same manifest, e.g. what the step measured)."""
        units, states = {}, {}
        writes, self._writes = self._writes, []
        for i, fut in enumerate(writes):
            try:
                done = fut.result()
            except BaseException:
                # let the writes still in flight finish before anything is cleaned up, or they
                # would land after the clean-up and stay behind
                self._writes = writes[i + 1:]
                self.abort()
                raise
            if done is None:  # a garbage collection queued by the previous commit
                continue
            name, rec, srec = done
            units[name] = rec
            if srec is not None:
                states[name] = srec
        self._unsynced = []  # commit fsyncs every file of the step
        self._reads.clear()  # the next step's forward has the memory back
        self.store.commit(step, units, states, collect=False, **extra)
        if self.narrowed is not None:  # a failure here ends the run, as the store's own would
            recs, self._narrowed_recs = self._narrowed_recs, {}
            self.narrowed.commit(step, recs, collect=False)
        # deleting the last step's files takes a while (freeing extents): do it on the writer
        # thread, which is also the only thread that creates files, so nothing new is deleted;
        # one file of each unit and kind is kept, for the next step to write over (`spares`)
        self._writes.append(self._writer.submit(self._collect))

    def _collect(self):
        self.store.collect_garbage(keep_spares=True)  # the next step writes over the last one's files
        if self.narrowed is not None:
            self.narrowed.collect_garbage(keep_spares=True)
        return None

    def abort(self) -> None:
        """Wait for outstanding writes and drop them: the store keeps its last committed step."""
        for fut in self._writes:
            try:
                fut.result()
            except Exception:
                pass
        self._writes = []
        self._reads.clear()
        self.in_ram.clear()  # (keyed by file: none of it could be used for a state not committed)
        self._narrowed_recs = {}
        for store in (self.store, self.narrowed):
            if store is not None and store.is_writer:  # a reader (or an engine that never trained) deletes nothing
                store.collect_garbage()

    def close(self) -> None:
        self.abort()
        self._writer.shutdown(wait=True)
        self._side.shutdown(wait=True)
