"""The block store: a model as one safetensors file per unit plus a manifest.

    STORE/
      manifest.json            format version, model args, dtype, step, and per file:
                               name, size, crc32, tensor dtypes and shapes
      embed.safetensors        tok_embeddings.weight
      block_00.safetensors     attention.wq.weight, …, ffn_norm.weight   (Meta names, no prefix)
      …
      head.safetensors         norm.weight, output.weight (tied embeddings: norm.weight only;
                               the unit is read with embed's tok_embeddings.weight as output.weight)
      block_00-000003.state.safetensors   optimizer state after step 3 (full fine-tune)
      tokenizer.model

Durability: a new version of a unit goes to a new file name (``block_00-000004.safetensors``).
Nothing refers to it until `commit` fsyncs it and replaces the manifest atomically (temp,
fsync, rename, fsync of the folder); only then are the files of the previous step deleted.
So the store on disk is always exactly one committed step.

Direct IO: a full fine-tune rewrites every unit every step, so its versions are written with
O_DIRECT (no page-cache copy, no dirty pages to flush, next to no CPU: it competes with compute
on a small machine), from the buffer the unit was read into and updated in, or else through an
aligned bounce buffer (`blocktune.fileio`), and read back the same way; frozen units of a store
bigger than RAM are read so too. Where the file system refuses O_DIRECT (tmpfs), the page cache
is used instead.

One writer, many readers (`blocktune.storelock`): a process takes the store's writer lock
before it writes a file version, commits or deletes anything (`open(..., writer=True)`, or
at its first write); a reader pins the files of the manifest version it opened, and garbage
collection deletes only files that neither the manifest on disk nor a live pin names.

Integrity: every file's crc32 is recorded in the manifest and checked when read (once per
file version per process by default; ISA-L's crc32 runs at ≈35 GB/s here, zlib's at ≈7).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ModelArgs
from .devices import dtype_name, parse_dtype
from .errors import ChecksumError, StoreError
from .fileio import (
    ALIGN,
    AlignedWriter,
    aligned_empty,
    atomic_write,
    crc32,
    decode_tensors,
    file_image,
    open_direct,
    read_into,
    round_up,
    staging_dir,
    write_image,
    write_stream,
    write_tensors,
)
from .model import unit_name
from .storelock import ReadPin, WriterLock, pinned_files
from .tokenizer import HF_TOKENIZER_FILES, detect_kind

__all__ = ["BlockStore", "FileRecord", "FORMAT_VERSION", "unit_names", "build_store", "atomic_write",
           "staging_dir"]

FORMAT = "blocktune-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

def unit_names(args: ModelArgs) -> list[str]:
    return ["embed"] + [unit_name(i) for i in range(args.n_layers)] + ["head"]


def manifest_files(m: dict[str, Any]) -> set[str]:
    """Every file a manifest refers to, itself included."""
    files = {r["file"] for r in m.get("units", {}).values()} | {r["file"] for r in m.get("state", {}).values()}
    files.add(MANIFEST)
    if m.get("tokenizer"):
        files.add(m["tokenizer"])
    files.update(m.get("extra_files", []))
    files.update(r["file"] for r in m.get("base", {}).get("units", {}).values())  # the kept base model
    return files


@dataclass(frozen=True)
class FileRecord:
    file: str
    nbytes: int
    crc32: int
    tensors: dict[str, dict[str, Any]]  # key -> {"dtype": "bf16", "shape": [...]}

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "bytes": self.nbytes, "crc32": self.crc32, "tensors": self.tensors}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileRecord:
        tensors = d["tensors"]
        ok = isinstance(d["file"], str) and isinstance(tensors, dict) and all(
            isinstance(m, dict) and isinstance(m.get("dtype"), str) and isinstance(m.get("shape"), list)
            and all(isinstance(n, int) and n >= 0 for n in m["shape"]) for m in tensors.values())
        if not ok:
            raise ValueError(f"file record {str(d)[:80]} is malformed")
        return cls(d["file"], int(d["bytes"]), int(d["crc32"]), tensors)


class BlockStore:
    """A prepared model on disk. Opening reads only the manifest (milliseconds at any size)."""

    def __init__(self, path: str | Path, manifest: dict[str, Any], *,
                 lock: WriterLock | None = None, pin: ReadPin | None = None):
        self.path = Path(path)
        self.manifest = manifest
        self._lock, self._pin = lock, pin
        self.args = ModelArgs(**manifest["model"])
        self.dtype = parse_dtype(manifest["dtype"])
        self.units = unit_names(self.args)
        self._records = {n: FileRecord.from_dict(manifest["units"][n]) for n in self.units}
        self._state = {n: FileRecord.from_dict(r) for n, r in manifest.get("state", {}).items()}
        # fault-injection seam for tests of disk-full and IO errors
        self.opener: Callable = open
        self._verified: set[str] = set()  # files whose crc32 was checked in this process
        self._uncached: set[str] = set()  # files this process wrote with direct IO: read them so too

    # ---- opening ----
    @classmethod
    def open_base(cls, path: str | Path) -> BlockStore:
        """The model as it was before the store's first full fine-tune (kept unless the run was
        --in-place), read-only: the base's files, pinned like any reader's."""
        store = cls.open(path)
        base = store.manifest.get("base")
        if base is None:
            store.close()
            raise StoreError(f"{path}: no base model is kept (the store was never fully fine-tuned, or "
                             "with --in-place): the store itself is its only version")
        manifest = {**store.manifest, "units": base["units"], "step": base["step"], "state": {}}
        view = cls(store.path, manifest, pin=store._pin)
        store._pin = None
        return view

    @classmethod
    def open(cls, path: str | Path, writer: bool = False) -> BlockStore:
        """Open the committed step. `writer`: take the writer lock first (a clear error if
        another process holds it). Otherwise the files of the step opened are pinned until
        `close`, so a writer's garbage collection keeps them."""
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            hint = " (it holds params.json: run `blocktune prepare` on it first)" if (
                path / "params.json").exists() else ""
            raise StoreError(f"{path}: not a blocktune store, no {MANIFEST}{hint}")
        if writer:
            lock = WriterLock.acquire(path)
            try:
                return cls(path, cls._read_manifest(mpath)[1], lock=lock)
            except BaseException:
                lock.release()
                raise
        raw, manifest = cls._read_manifest(mpath)
        for _ in range(1000):
            pin = ReadPin.create(path, manifest_files(manifest), int(manifest["step"]))
            again = mpath.read_bytes()
            if pin is None or again == raw:
                return cls(path, manifest, pin=pin)
            pin.release()  # a writer committed meanwhile: pin the step it committed
            raw, manifest = cls._read_manifest(mpath)
        raise StoreError(f"{mpath}: the store changed on every one of 1000 tries to open it")

    @classmethod
    def _read_manifest(cls, mpath: Path) -> tuple[bytes, dict[str, Any]]:
        try:
            raw = mpath.read_bytes()
            manifest = json.loads(raw)
        except FileNotFoundError:
            raise StoreError(f"{mpath.parent}: not a blocktune store, no {MANIFEST}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{mpath}: corrupt manifest ({exc})") from exc
        cls._check_manifest(manifest, mpath)
        return raw, manifest

    def acquire_writer(self) -> None:
        """Take the writer lock (if this store does not hold it yet), before anything is
        written; the step on disk must still be the one this store opened."""
        if self._lock is not None and self._lock.held:
            return
        lock = WriterLock.acquire(self.path)
        try:
            _, on_disk = self._read_manifest(self.path / MANIFEST)
        except BaseException:
            lock.release()
            raise
        if on_disk != self.manifest:
            lock.release()
            raise StoreError(f"{self.path}: another process committed step {on_disk['step']} since "
                             f"this store was opened at step {self.step}; open it again")
        self._lock = lock
        if self._pin is not None:  # the writer keeps what it needs itself
            self._pin.release()
            self._pin = None

    @property
    def is_writer(self) -> bool:
        return self._lock is not None and self._lock.held

    def close(self) -> None:
        """Let go of the writer lock or the read pin (the kernel does it if the process dies)."""
        if self._lock is not None:
            self._lock.release()
        if self._pin is not None:
            self._pin.release()
            self._pin = None

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _check_manifest(m: Any, mpath: Path) -> None:
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise StoreError(f"{mpath}: not a blocktune manifest (format={m.get('format') if isinstance(m, dict) else None!r})")
        version = m.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StoreError(
                f"{mpath}: store format version {version!r} is newer than this blocktune "
                f"understands ({FORMAT_VERSION}); upgrade blocktune"
            )
        try:
            args = ModelArgs(**m["model"])
            parse_dtype(m["dtype"])
            int(m["step"])
            for n in unit_names(args):
                FileRecord.from_dict(m["units"][n])
            for r in m.get("state", {}).values():
                FileRecord.from_dict(r)
        except Exception as exc:  # any malformed field: one clear error
            raise StoreError(f"{mpath}: malformed manifest ({type(exc).__name__}: {exc})") from exc

    # ---- reading ----
    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def tokenizer_path(self) -> Path | None:
        """The tokenizer file, checked against the crc32 the store recorded for it (stores
        prepared before the checksum was recorded are not checked)."""
        name = self.manifest.get("tokenizer")
        if not name:
            return None
        self.check_small_file(name)
        return self.path / name

    def check_small_file(self, name: str) -> None:
        """A file beside the units (tokenizer, extras) against its recorded size and crc32."""
        want = self.manifest.get("checksums", {}).get(name)
        if want is None or name in self._verified:
            return
        path = self.path / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{path}: missing from the store (named in {MANIFEST}); the store is "
                             "damaged, prepare it again") from None
        crc = crc32(memoryview(data))
        if len(data) != want["bytes"] or crc != want["crc32"]:
            raise ChecksumError(f"{path}: checksum mismatch (crc32 {crc:08x}, {len(data)} bytes; the "
                                f"manifest says {want['crc32']:08x}, {want['bytes']} bytes); the file is "
                                "damaged: copy it again from the checkpoint the store was prepared from")
        self._verified.add(name)

    def record(self, name: str) -> FileRecord:
        return self._records[name]

    def state_record(self, name: str) -> FileRecord | None:
        return self._state.get(name)

    @property
    def tied(self) -> bool:
        return self.args.tie_embeddings

    def unit_files(self, name: str) -> list[FileRecord]:
        """The files a unit is read from: its own, and for a tied head the embeddings' too."""
        recs = [self._records[name]]
        if name == "head" and self.tied:
            recs.append(self._records["embed"])
        return recs

    def unit_version(self, name: str) -> str:
        """A key that changes whenever any file the unit is read from does."""
        return "+".join(r.file for r in self.unit_files(name))

    def unit_bytes(self, name: str) -> int:
        return sum(r.nbytes for r in self.unit_files(name))

    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self._records.values())

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
        check = verify in (True, "always") or (verify == "once" and record.file not in self._verified)
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
                  map_file: bool = False, direct: bool = False) -> dict[str, torch.Tensor]:
        tensors = self.read_file(self._records[name], alloc, verify, map_file, direct)
        if name == "head" and self.tied:
            embed = self.read_file(self._records["embed"], alloc, verify, map_file, direct)
            tensors["output.weight"] = embed["tok_embeddings.weight"]
        return tensors

    def read_state(self, name: str) -> dict[str, torch.Tensor] | None:
        """A unit's optimizer state as `optim.unit_step` keeps it (pieces joined), or None."""
        from .optim import whole_state

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
            with f:
                out = AlignedWriter(f) if direct else f
                nbytes, crc, layout = body(out, f if direct else None)
                if direct:
                    out.finish(nbytes)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise StoreError(f"{path}: write failed ({exc.strerror or exc}); the store still holds "
                             f"step {self.step}, intact; free space or fix the disk, then resume") from exc
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        self._verified.add(filename)  # written by this process: its first check is the write
        if direct:
            self._uncached.add(filename)
        return FileRecord(filename, nbytes, crc, layout)

    def _create(self, path: Path, direct: bool):
        """(file, whether it is open for direct IO)."""
        if direct and hasattr(os, "O_DIRECT"):
            try:
                return self.opener(path, "wb", buffering=0, opener=open_direct), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: this file system does no direct IO
                    raise
        return self.opener(path, "wb"), False

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
        old = self._records[name].tensors
        if set(old) != set(tensors):
            raise StoreError(f"{name}: tensor keys changed on write-back ({sorted(set(old) ^ set(tensors))})")
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

        return self.write_stream(f"{name}-{step:06d}.safetensors", spec, data(), sync, direct)

    @staticmethod
    def _state_file(name: str, step: int) -> str:
        return f"{name}-{step:06d}.state.safetensors"

    def commit(self, step: int, units: dict[str, FileRecord],
               state: dict[str, FileRecord] | None = None, collect: bool = True, **extra: Any) -> None:
        """Make the new files durable, switch the store to `step` in one atomic manifest
        replace, then (unless `collect` is False: the caller does it later) delete stale files."""
        self.acquire_writer()
        for rec in list(units.values()) + list((state or {}).values()):
            fd = os.open(self.path / rec.file, os.O_RDONLY)
            try:
                os.fsync(fd)  # cheap when the kernel has already written the pages back
            finally:
                os.close(fd)
        manifest = dict(self.manifest)
        manifest["step"] = step
        manifest["units"] = {n: (units.get(n) or self._records[n]).to_dict() for n in self.units}
        merged_state = {**self._state, **(state or {})}
        manifest["state"] = {n: r.to_dict() for n, r in merged_state.items()}
        manifest.update(extra)
        try:
            atomic_write(self.path / MANIFEST, json.dumps(manifest, indent=1).encode(), opener=self.opener)
        except OSError as exc:
            raise StoreError(f"{self.path / MANIFEST}: write failed ({exc.strerror or exc}); the store "
                             f"still holds step {self.step}, intact; free space or fix the disk, then resume") from exc
        self.manifest = manifest
        self._records = {n: FileRecord.from_dict(manifest["units"][n]) for n in self.units}
        self._state = merged_state
        if collect:
            self.collect_garbage()

    def referenced_files(self) -> set[str]:
        return manifest_files(self.manifest)

    def collect_garbage(self) -> list[str]:
        """Delete files that nothing can need: not named by the committed manifest on disk
        (read again here, under the writer lock), by this store's own view, nor by a live
        reader's pin (uncommitted versions, old steps, temp files). Where any of these cannot
        be read, nothing is deleted."""
        self.acquire_writer()
        try:
            on_disk = json.loads((self.path / MANIFEST).read_bytes())
        except (OSError, ValueError):
            return []
        pinned = pinned_files(self.path)
        if pinned is None or not isinstance(on_disk, dict):
            return []
        keep = self.referenced_files() | manifest_files(on_disk) | pinned
        removed = []
        for p in self.path.iterdir():
            if p.is_file() and p.name not in keep and (
                p.suffix == ".safetensors" or ".tmp-" in p.name
            ):
                p.unlink(missing_ok=True)
                removed.append(p.name)
        # forget what this process knew of deleted versions (a long run makes thousands)
        self._verified -= set(removed)
        self._uncached -= set(removed)
        return removed

    def verify(self) -> list[str]:
        """Read every file and check it against the manifest; return one line per problem."""
        problems = []
        for name in self.manifest.get("checksums", {}):
            self._verified.discard(name)
            try:
                self.check_small_file(name)
            except StoreError as exc:
                problems.append(str(exc))
        base = [FileRecord.from_dict(r) for r in self.manifest.get("base", {}).get("units", {}).values()]
        seen = set()
        for rec in list(self._records.values()) + list(self._state.values()) + base:
            if rec.file in seen:  # a unit the fine-tune has not changed yet is its base too
                continue
            seen.add(rec.file)
            try:
                tensors = self.read_file(rec)
                for key, meta in rec.tensors.items():
                    t = tensors.get(key)
                    if t is None or list(t.shape) != meta["shape"]:
                        problems.append(f"{self.path / rec.file}: tensor {key} missing or misshapen")
            except StoreError as exc:
                problems.append(str(exc))
        return problems


def build_store(
    dst: str | Path,
    args: ModelArgs,
    units: Iterable[tuple[str, dict[str, torch.Tensor]]],
    dtype: torch.dtype,
    tokenizer: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    extra: dict[str, Any] | None = None,
    files: dict[str, bytes] | None = None,
    tokenizer_kind: str | None = None,
) -> BlockStore:
    """Write a new store from (unit name, tensors) pairs in order; all or nothing.

    `units` may be a generator that assembles each unit on demand (streaming import), so only
    one unit is in memory at a time. `files`: small extra files (name -> bytes) that belong to
    the store (named in the manifest's `extra_files`). `tokenizer`: a tokenizer.model
    (sentencepiece or tiktoken, told apart by content), or with `tokenizer_kind="hf"` the folder
    that holds tokenizer.json and its companions.
    """
    expected = unit_names(args)

    def write(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> FileRecord:
        with open(folder / f"{name}.safetensors", "wb") as f:
            nbytes, crc, layout = write_tensors(f, tensors)
            f.flush()
            os.fsync(f.fileno())
        return FileRecord(f"{name}.safetensors", nbytes, crc, layout)

    with staging_dir(Path(dst)) as tmp, ThreadPoolExecutor(1, thread_name_prefix="blocktune-build") as pool:
        # unit i is written on the pool while unit i+1 is assembled: two units in memory at most
        records: dict[str, FileRecord] = {}
        pending: tuple[str, Future] | None = None
        for name, tensors in units:
            if name not in expected or name in records or (pending and pending[0] == name):
                raise StoreError(f"unexpected or repeated unit {name!r}; expected {expected}")
            if name == "head" and args.tie_embeddings and "output.weight" in tensors:
                raise StoreError("tied embeddings: the head's output.weight is the embedding matrix, "
                                 "stored once with embed; leave it out of the head")
            cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
            if pending:
                records[pending[0]] = pending[1].result()
                if progress:
                    progress(pending[0])
            pending = (name, pool.submit(write, tmp, name, cast))
            del tensors, cast
        if pending:
            records[pending[0]] = pending[1].result()
            if progress:
                progress(pending[0])
        missing = [n for n in expected if n not in records]
        if missing:
            raise StoreError(f"store is missing units {missing}")
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "model": args.to_dict(),
            "dtype": dtype_name(dtype), "step": 0,
            "units": {n: records[n].to_dict() for n in expected}, "state": {},
            "tokenizer": None, **(extra or {}),
        }
        small = dict(files or {})
        if tokenizer is not None:
            kind = tokenizer_kind or detect_kind(Path(tokenizer))
            if kind == "hf":  # a folder: tokenizer.json, its config, the chat template
                folder = Path(tokenizer)
                small.update({n: (folder / n).read_bytes() for n in HF_TOKENIZER_FILES
                              if (folder / n).is_file()})
                manifest["tokenizer"] = "tokenizer.json"
            else:
                small["tokenizer.model"] = Path(tokenizer).read_bytes()
                manifest["tokenizer"] = "tokenizer.model"
            manifest["tokenizer_kind"] = kind
        extras = sorted(set(small) - {manifest["tokenizer"]})
        if extras:
            manifest["extra_files"] = extras
        manifest["checksums"] = {}
        for name, data in small.items():  # small files: written and checksummed from memory
            atomic_write(tmp / name, data)
            manifest["checksums"][name] = {"bytes": len(data), "crc32": crc32(memoryview(data))}
        atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    return BlockStore.open(dst)
