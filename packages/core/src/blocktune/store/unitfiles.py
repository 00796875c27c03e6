"""A store's file versions: read (into a buffer, mapped, or with direct IO; checked against
the manifest's crc32) and written (new names, invisible until commit; from the tensors'
memory, from pieces as they are made, or with direct IO). Mixed into `BlockStore`."""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from blocktune.errors import ChecksumError, StoreError
from blocktune.store.fileio import (
    ALIGN,
    AlignedWriter,
    StreamedTensors,
    aligned_empty,
    crc32,
    decode_tensors,
    file_image,
    open_direct,
    open_new_direct,
    read_into,
    round_up,
    write_image,
    write_stream,
    write_tensors,
)
from blocktune.store.records import MANIFEST, FileRecord
from blocktune.store.safefiles import open_new

__all__ = ["UnitFiles"]


class UnitFiles:
    """Needs of its host: path, dtype, tied, opener, spares, acquire_writer, step, _records,
    _state, _verified, _uncached."""

    def read_file(
        self, record: FileRecord, alloc: Callable[[int], torch.Tensor] | None = None,
        verify: bool | str = True, map_file: bool = False, direct: bool = False, populate: bool = True,
    ) -> dict[str, torch.Tensor]:
        """One file's tensors, checked against the manifest.

        By default the file is read into one buffer (pinned where `alloc` makes it so). With
        `map_file`, it is memory-mapped read-only and pre-faulted instead: no copy out of the
        page cache; the tensors must not be written (frozen weights, LoRA). With `direct` (and
        for files this process wrote so), it is read with O_DIRECT, past the page cache, where
        the file system allows. `verify`: True or
        "always" checks the crc32 on every read, "once" on the first read of each file version
        in this process, False or "never" not at all.
        """
        path = self.path / record.file
        check = self._check_due(record, verify)
        try:
            if map_file and alloc is None:
                buf, got, extra = self._map(path, record.nbytes, populate)
            elif (direct or record.file in self._uncached) and (
                    read := self._read_direct(path, record.nbytes, alloc)) is not None:
                buf, got, extra = read
            else:
                buf = alloc(record.nbytes) if alloc else torch.empty(record.nbytes, dtype=torch.uint8)
                with self.opener(path, "rb", buffering=0) as f:
                    got = read_into(f, memoryview(buf.numpy()))
                    extra = f.read(1)
        except FileNotFoundError:
            raise StoreError(f"{path}: missing from the store (named in {MANIFEST}); "
                             "the store is damaged, prepare it again") from None
        except OSError as exc:
            raise StoreError(f"{path}: read failed ({exc.strerror or exc})") from exc
        if got != record.nbytes or extra:
            raise ChecksumError(f"{path}: size differs from the manifest "
                                f"({'more than' if extra else got} vs {record.nbytes} bytes); the file is damaged")
        if check:
            crc = crc32(memoryview(buf.numpy()))
            if crc != record.crc32:
                raise ChecksumError(f"{path}: checksum mismatch (crc32 {crc:08x}, manifest says "
                                    f"{record.crc32:08x}); the file is damaged")
            self._verified.add(record.file)
        return decode_tensors(buf, str(path))

    def _check_due(self, record: FileRecord, verify: bool | str) -> bool:
        """Whether a read of `record` checks its crc32 (`verify` as `read_file` takes it)."""
        return verify in (True, "always") or (verify == "once" and record.file not in self._verified)

    def _read_direct(self, path: Path, nbytes: int, alloc) -> tuple[torch.Tensor, int, bool] | None:
        """Whole aligned blocks straight into the buffer, no page-cache copy; None where the
        file system (or the OS) has no direct IO."""
        if not hasattr(os, "O_DIRECT"):
            return None
        try:
            f = self.opener(path, "rb", buffering=0, opener=open_direct)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return None
            raise
        with f:
            cap = round_up(nbytes)
            buf = alloc(cap) if alloc else aligned_empty(cap)
            if buf.data_ptr() % ALIGN or buf.numel() < cap:
                buf = aligned_empty(cap)
            got = read_into(f, memoryview(buf.numpy()))
        return buf[:nbytes], min(got, nbytes), got > nbytes

    def _map(self, path: Path, nbytes: int, populate: bool = True) -> tuple[torch.Tensor, int, bool]:
        with self.opener(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size != nbytes or size == 0:
                return torch.empty(0, dtype=torch.uint8), min(size, nbytes), size > nbytes
            # Read-only, pre-faulted here (not in compute). Read-only matters: the kernel populates
            # a writable private mapping by copying every page, which would undo the point.
            flags = mmap.MAP_PRIVATE | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
            mm = mmap.mmap(f.fileno(), size, flags=flags, prot=mmap.PROT_READ)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.frombuffer(mm, dtype=torch.uint8), size, False

    def read_unit(self, name: str, alloc=None, verify: bool | str = True,
                  map_file: bool = False, direct: bool = False, populate: bool = True) -> dict[str, torch.Tensor]:
        """A unit's tensors (`read_file`; `populate=False`: mapped and read as they are touched)."""
        tensors = self.read_file(self._records[name], alloc, verify, map_file, direct, populate)
        if name == "head" and self.tied:
            embed = self.read_file(self._records["embed"], alloc, verify, map_file, direct, populate)
            tensors["output.weight"] = embed["tok_embeddings.weight"]
        return tensors

    def read_state(self, name: str) -> dict[str, torch.Tensor] | None:
        """A unit's optimizer state as `optim.unit_step` keeps it (pieces joined), or None."""
        from blocktune.engine.optim import whole_state

        rec = self._state.get(name)
        if rec is None:
            return None
        shapes = {k: tuple(t["shape"]) for k, t in self._records[name].tensors.items()}
        if name == "head" and self.tied:
            shapes["output.weight"] = tuple(self._records["embed"].tensors["tok_embeddings.weight"]["shape"])
        return whole_state(self.read_file(rec), shapes)

    def map_state(self, name: str, verify: bool | str = True) -> dict[str, torch.Tensor] | None:
        """A unit's optimizer state file as it is stored (in pieces), mapped read-only and not
        pre-faulted: a paged step reads one piece at a time, so only that piece is in memory
        (page cache the kernel can take back). None before the unit's first step."""
        rec = self._state.get(name)
        return None if rec is None else self.read_file(rec, verify=verify, map_file=True, populate=False)

    def stream_state(self, name: str, verify: bool | str = True, alloc=None) -> StreamedTensors | None:
        """A unit's optimizer state file read once, in file order, with direct IO, a thread
        reading ahead of the step that takes its pieces (`fileio.StreamedTensors`, its reads in
        `alloc`'s memory; its crc32 checked as `verify` says, when the last piece is read). None
        before the unit's first step. `close` it when done."""
        rec = self._state.get(name)
        if rec is None:
            return None
        check = self._check_due(rec, verify)
        try:
            return StreamedTensors(self.path / rec.file, rec.nbytes, rec.crc32, check=check, alloc=alloc)
        except FileNotFoundError:
            raise StoreError(f"{self.path / rec.file}: missing from the store (named in {MANIFEST}); "
                             "the store is damaged, prepare it again") from None

    def stream_unit(self, name: str, order: list[str], verify: bool | str = True,
                    alloc=None) -> StreamedTensors | None:
        """A unit's tensors read once, in `order`, with direct IO (`stream_state`); None where
        that cannot be: the head tied to the embedding, or a check due on a file whose order is
        not `order` (the crc32 runs in file order)."""
        rec = self._records[name]
        if name == "head" and self.tied:
            return None
        check = self._check_due(rec, verify)
        try:
            return StreamedTensors(self.path / rec.file, rec.nbytes, rec.crc32, order, check=check, alloc=alloc)
        except ValueError:
            return None
        except FileNotFoundError:
            raise StoreError(f"{self.path / rec.file}: missing from the store (named in {MANIFEST}); "
                             "the store is damaged, prepare it again") from None

    # ---- writing (new versions; invisible until commit) ----
    def write_file(self, filename: str, tensors: dict[str, torch.Tensor],
                   sync: bool = True, direct: bool = False) -> FileRecord:
        """Write a new file (a name no manifest refers to yet). With `sync=False` the fsync is
        left to `commit`, so the kernel writes the data back while compute goes on. With
        `direct`, the data bypasses the page cache (O_DIRECT) where the file system allows."""
        def body(out, raw):  # raw: the file itself, where it is open for direct IO (else None)
            if raw is not None and (image := file_image(tensors)) is not None:
                return write_image(raw, image, tensors)  # whole blocks from the buffer itself
            return write_tensors(out, tensors)

        return self._write_new(filename, body, sync, direct)

    def write_stream(self, filename: str, spec: list[tuple[str, torch.dtype, tuple[int, ...]]],
                     data: Iterable[torch.Tensor], sync: bool = True, direct: bool = False) -> FileRecord:
        """`write_file` from pieces made as they are written (`fileio.write_stream`)."""
        return self._write_new(filename, lambda out, raw: write_stream(out, spec, data), sync, direct)

    def _write_new(self, filename: str, body: Callable, sync: bool, direct: bool) -> FileRecord:
        self.acquire_writer()
        path = self.path / filename
        try:
            f, direct = self._create(path, direct)
        except OSError as exc:  # nothing was created: what stands at the name is not this process's
            raise self._write_failed(path, exc) from exc
        try:
            with f:
                # direct: the writes go to the disk behind the body, as it makes the bytes
                out = AlignedWriter(f, behind=True) if direct else f
                try:
                    nbytes, crc, layout = body(out, f if direct else None)
                    if direct:
                        out.finish(nbytes)
                finally:
                    if direct:
                        out.settle()  # nothing in flight once the file closes
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise self._write_failed(path, exc) from exc
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        self._verified.add(filename)  # written by this process: its first check is the write
        if direct:
            self._uncached.add(filename)
        return FileRecord(filename, nbytes, crc, layout)

    def _write_failed(self, path: Path, exc: OSError) -> StoreError:
        return StoreError(f"{path}: write failed ({exc.strerror or exc}); the store still holds "
                          f"step {self.step}, intact; free space or fix the disk, then resume")

    def _create(self, path: Path, direct: bool):
        """(file, whether it is open for direct IO): for direct IO, a spare of the same unit and
        kind renamed to `path` where one is kept (`blocktune.store.spares`: written over in
        place, cut to size when the write finishes), else made by `open_new`: a new file, never
        written through a link or into another name's file."""
        if direct and hasattr(os, "O_DIRECT"):
            fd = self.spares.take(path.name)
            if fd is not None:
                handed = []  # once handed over, the file object owns the descriptor

                def spare(_path, _flags) -> int:
                    handed.append(fd)
                    return fd

                try:
                    return self.opener(path, "wb", buffering=0, opener=spare), True
                except BaseException:
                    if not handed:
                        os.close(fd)
                    raise
            try:
                return self.opener(path, "wb", buffering=0, opener=open_new_direct), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: this file system does no direct IO
                    raise
        return self.opener(path, "wb", opener=open_new), False

    def write_unit(self, name: str, tensors: dict[str, torch.Tensor], step: int,
                   sync: bool = True, direct: bool = False) -> FileRecord:
        old = self._records[name].tensors
        if name == "head" and self.tied:  # the embeddings' tensor: written with embed
            tensors = {k: v for k, v in tensors.items() if k != "output.weight"}
        if set(old) != set(tensors):
            raise StoreError(f"{name}: tensor keys changed on write-back ({sorted(set(old) ^ set(tensors))})")
        return self.write_file(f"{name}-{step:06d}.safetensors", tensors, sync, direct)

    def write_state(self, name: str, tensors: dict[str, torch.Tensor], step: int,
                    sync: bool = True, direct: bool = False) -> FileRecord:
        return self.write_file(self._state_file(name, step), tensors, sync, direct)

    def write_state_stream(self, name: str, spec, data, step: int, sync: bool = True,
                           direct: bool = False) -> FileRecord:
        """A unit's new optimizer state from pieces (`optim.streamed_step`)."""
        return self.write_stream(self._state_file(name, step), spec, data, sync, direct)

    def write_unit_stream(self, name: str, tensors: dict[str, torch.Tensor], step: int,
                          sync: bool = True, direct: bool = False, to_host=None) -> FileRecord:
        """`write_unit` of wider tensors (fp32 compute) in the store's dtype, converted a piece
        at a time: no converted copy of the whole unit (`to_host` brings a piece off the device)."""
        if name == "head" and self.tied:
            tensors = {k: v for k, v in tensors.items() if k != "output.weight"}
        dtypes = {k: self.dtype if t.is_floating_point() else t.dtype for k, t in tensors.items()}
        order = sorted(tensors, key=lambda k: (-dtypes[k].itemsize, k))  # as write_tensors lays them out
        spec = [(k, dtypes[k], tuple(tensors[k].shape)) for k in order]
        piece = 1 << 22

        def data():
            for k in order:
                flat = tensors[k].reshape(-1)
                for s in range(0, flat.numel(), piece):
                    out = flat[s:s + piece].to(dtypes[k])
                    yield to_host(out) if to_host is not None else out

        return self.write_unit_pieces(name, spec, data(), step, sync, direct)

    def write_unit_pieces(self, name: str, spec: list[tuple[str, torch.dtype, tuple[int, ...]]],
                          data: Iterable[torch.Tensor], step: int, sync: bool = True,
                          direct: bool = False) -> FileRecord:
        """A unit's new version from pieces made as they are written, its tensors `spec`
        (key, dtype, shape) in that order (`fileio.write_stream`): the same keys as the unit's."""
        old, new = set(self._records[name].tensors), {k for k, _, _ in spec}
        if old != new:
            raise StoreError(f"{name}: tensor keys changed on write-back ({sorted(old ^ new)})")
        return self.write_stream(f"{name}-{step:06d}.safetensors", spec, data, sync, direct)

    @staticmethod
    def _state_file(name: str, step: int) -> str:
        return f"{name}-{step:06d}.state.safetensors"
