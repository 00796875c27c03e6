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
fsync, rename, fsync of the folder); only then are the files of the previous step deleted, or,
during a full fine-tune, kept as spares that the next step's versions are written over
(`blocktune.store.spares`). So the store on disk is always exactly one committed step.

Direct IO: a full fine-tune rewrites every unit every step, so its versions are written with
O_DIRECT (no page-cache copy, no dirty pages to flush, next to no CPU: it competes with compute
on a small machine), from the buffer the unit was read into and updated in, or else through an
aligned bounce buffer (`blocktune.store.fileio`), and read back the same way; frozen units of a store
bigger than RAM are read so too. Where the file system refuses O_DIRECT (tmpfs), the page cache
is used instead.

One writer, many readers (`blocktune.store.lock`): a process takes the store's writer lock
before it writes a file version, commits or deletes anything (`open(..., writer=True)`, or
at its first write); a reader pins the files of the manifest version it opened, and garbage
collection deletes only files that neither the manifest on disk nor a live pin names.

Integrity: every file's crc32 is recorded in the manifest and checked when read (once per
file version per process by default; ISA-L's crc32 runs at ≈35 GB/s here, zlib's at ≈7).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from blocktune.errors import ChecksumError, StoreError
from blocktune.machine.dtypes import TORCH_NAMES, parse_dtype
from blocktune.store.fileio import crc32
from blocktune.store.lock import ReadPin, WriterLock, pin_notes, pinned_files
from blocktune.store.records import (
    MANIFEST,
    FileRecord,
    StoreManifest,
    manifest_bytes,
    manifest_files,
    manifest_path,
    read_manifest,
    shape_mismatches,
)
from blocktune.store.safefiles import atomic_write, partial_dirs, readable_size
from blocktune.store.spares import SpareFiles
from blocktune.store.unitfiles import UnitFiles

__all__ = ["BlockStore", "NARROWED"]

NARROWED = "narrowed"  # a run's copy of the store in its compute dtype: `.narrowed.partial-PID-*` in the store


class BlockStore(UnitFiles, StoreManifest):
    """A prepared model on disk: what its manifest says (`StoreManifest`), and its files, read and
    written. Opening reads only the manifest (milliseconds at any size)."""

    def __init__(self, path: str | Path, manifest: dict[str, Any], *,
                 lock: WriterLock | None = None, pin: ReadPin | None = None):
        super().__init__(path, manifest)
        self._lock, self._pin = lock, pin
        self.dtype = parse_dtype(manifest["dtype"])
        # fault-injection seam for tests of disk-full and IO errors
        self.opener: Callable = open
        self._verified: set[str] = set()  # files whose crc32 was checked in this process
        self._uncached: set[str] = set()  # files this process wrote with direct IO: read them so too
        self.spares = SpareFiles(self.path)  # old versions the next ones are written over (`spares`)

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
        mpath = manifest_path(path)
        if writer:
            lock = WriterLock.acquire(path)
            try:
                return cls(path, read_manifest(mpath)[1], lock=lock)
            except BaseException:
                lock.release()
                raise
        raw, manifest = read_manifest(mpath)
        for _ in range(1000):
            pin = ReadPin.create(path, manifest_files(manifest), int(manifest["step"]))
            again = mpath.read_bytes()
            if pin is None or again == raw:
                return cls(path, manifest, pin=pin)
            pin.release()  # a writer committed meanwhile: pin the step it committed
            raw, manifest = read_manifest(mpath)
        raise StoreError(f"{mpath}: the store changed on every one of 1000 tries to open it")

    def acquire_writer(self) -> None:
        """Take the writer lock (if this store does not hold it yet), before anything is
        written; the step on disk must still be the one this store opened."""
        if self._lock is not None and self._lock.held:
            return
        lock = WriterLock.acquire(self.path)
        try:
            _, on_disk = read_manifest(self.path / MANIFEST)
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

    # ---- reading ----
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

    def unit_tensors(self, name: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """A unit's tensors as `read_unit` returns them, from the manifest: key -> (dtype, shape)."""
        def spec(meta):
            kind = meta["dtype"]
            dtype = getattr(torch, TORCH_NAMES.get(kind) or kind.removeprefix("torch."))
            return dtype, tuple(meta["shape"])

        out = {k: spec(m) for k, m in self._records[name].tensors.items()}
        if name == "head" and self.tied:
            out["output.weight"] = spec(self._records["embed"].tensors["tok_embeddings.weight"])
        return out

    def commit(self, step: int, units: dict[str, FileRecord], state: dict[str, FileRecord] | None = None,
               collect: bool = True, keep_previous: bool = False, drop: tuple[str, ...] = (),
               fresh_state: bool = False, **extra: Any) -> None:
        """Make the new files durable, switch the store to `step` in one atomic manifest
        replace, then (unless `collect` is False: the caller does it later) delete stale files.
        `keep_previous`: the step before stays on disk until the next commit, so that
        `roll_back` can return to it (processes that must agree on one step: stages, replicas).
        `extra`: entries the manifest records beside the units; `drop`: entries it no longer does;
        `fresh_state`: the optimizer state recorded so far is dropped (the units went back to the base)."""
        self.acquire_writer()
        for rec in list(units.values()) + list((state or {}).values()):
            fd = os.open(self.path / rec.file, os.O_RDONLY)
            try:
                os.fsync(fd)  # cheap when the kernel has already written the pages back
            finally:
                os.close(fd)
        manifest = dict(self.manifest)
        manifest.pop("previous", None)
        for key in drop:
            manifest.pop(key, None)
        if keep_previous and step != self.step:
            manifest["previous"] = {"step": self.step, "units": self.manifest["units"],
                                    "state": self.manifest.get("state", {})}
        manifest["step"] = step
        manifest["units"] = {n: (units.get(n) or self._records[n]).to_dict() for n in self.units}
        merged_state = {**({} if fresh_state else self._state), **(state or {})}
        manifest["state"] = {n: r.to_dict() for n, r in merged_state.items()}
        manifest.update(extra)
        try:
            atomic_write(self.path / MANIFEST, manifest_bytes(manifest), opener=self.opener)
        except OSError as exc:
            raise StoreError(f"{self.path / MANIFEST}: write failed ({exc.strerror or exc}); the store "
                             f"still holds step {self.step}, intact; free space or fix the disk, then resume") from exc
        self.use_manifest(manifest)
        if collect:
            self.collect_garbage()

    # ---- a full fine-tune's bookkeeping ----
    def start_run(self, keep_base: bool, run_id: str = "", out: str = "", from_base: bool = False) -> None:
        """Record, in one commit and before the run writes anything else, that the full fine-tune
        `run_id` (run folder `out`) owns the tuned state from the committed step on (`run_start`).
        With `keep_base` the weights as they are now stay on disk as the base model, unless an
        earlier run kept one already; without it a kept base is dropped (the run may replace
        its files). `from_base`: the units go back to the kept base first, and the optimizer
        state and last step of the weights they replace are dropped."""
        extra: dict[str, Any] = {"run": {"id": run_id, "out": out, "first_step": self.step}}
        units: dict[str, FileRecord] = {}
        drop = [] if keep_base else ["base"]
        if from_base:
            if not self.keeps_base:
                raise StoreError(f"{self.path}: no base model is kept to start from")
            units = {n: FileRecord.from_dict(r) for n, r in self.manifest["base"]["units"].items()}
            drop.append("last_step")
        elif keep_base and not self.keeps_base:
            extra["base"] = {"step": self.step, "units": self.manifest["units"]}
        self.commit(self.step, units, drop=tuple(drop), fresh_state=from_base, **extra)

    def roll_back(self) -> None:
        """Return the store to the step before its last commit (kept by `keep_previous`), in
        one atomic manifest replace; the newer step's files go at the next collection."""
        self.acquire_writer()
        prev = self.manifest.get("previous")
        if prev is None:
            raise StoreError(f"{self.path}: step {self.step} kept no previous step to return to")
        manifest = {k: v for k, v in self.manifest.items() if k not in ("previous", "last_step")}
        manifest.update(step=prev["step"], units=prev["units"], state=prev["state"])
        atomic_write(self.path / MANIFEST, manifest_bytes(manifest), opener=self.opener)
        self.use_manifest(manifest)

    def collect_garbage(self, keep_spares: bool = False) -> list[str]:
        """Delete files that nothing can need: not named by the committed manifest on disk
        (read again here, under the writer lock), by this store's own view, nor by a live
        reader's pin (uncommitted versions, old steps, temp files). Where any of these cannot
        be read, nothing is deleted. `keep_spares` (a full fine-tune's write-back, between its
        steps): one such file per unit and kind is kept for the next version to be written
        over (`blocktune.store.spares`); otherwise the spares kept so far go too."""
        self.acquire_writer()
        spares = self.spares.names() if keep_spares else set(self.spares.clear())
        try:
            on_disk = json.loads((self.path / MANIFEST).read_bytes())
        except (OSError, ValueError):
            return []
        pinned = pinned_files(self.path)
        if pinned is None or not isinstance(on_disk, dict):
            return []
        keep = self.referenced_files() | manifest_files(on_disk) | pinned
        removed, gone = [], set(spares)
        for p in self.path.iterdir():
            if p.is_file() and p.name not in keep and (
                p.suffix == ".safetensors" or ".tmp-" in p.name
            ):
                gone.add(p.name)
                if keep_spares and (p.name in spares or self.spares.keep(p.name)):
                    continue
                p.unlink(missing_ok=True)
                removed.append(p.name)
        # forget what this process knew of old versions, spares included (a long run makes thousands)
        self._verified -= gone
        self._uncached -= gone
        return removed

    def shape_problems(self) -> list[str]:
        """Where the manifest's model fields and its tensor records disagree (a damaged field,
        vocab_size or multiple_of say, would otherwise fail only when a unit is built)."""
        base = self.manifest.get("base", {}).get("units", {})
        lines = shape_mismatches(self.args, self.manifest["units"]) + shape_mismatches(self.args, base, "base ")
        return [f"{self.path / MANIFEST}: {line}; the model fields or the tensor records are damaged: "
                "restore manifest.json from a copy, or prepare the store again" for line in lines]

    def leftovers(self) -> list[str]:
        """What killed or departed processes left, for `verify` (removing nothing): file versions
        no manifest needs (a reader open across commits keeps its step's until the next writer
        commits), live readers' pins, oddities in .lock/readers, partial folders of a killed
        `prepare` beside the store, and narrowed copies killed runs left in it (`NARROWED`)."""
        kept, notes = pin_notes(self.path)
        need = manifest_files(self.manifest)
        orphans = sorted(p.name for p in self.path.iterdir() if p.is_file() and p.name not in need and (
            p.suffix == ".safetensors" or ".tmp-" in p.name))
        dead = [p for p in orphans if p not in kept]
        if dead:
            size = sum((self.path / p).stat().st_size for p in dead)
            notes.append(f"{self.path}: {len(dead)} file version(s) no step needs ({readable_size(size)}: "
                         f"{', '.join(dead[:4])}{' …' if len(dead) > 4 else ''}), left by a killed run or "
                         "kept for a reader that has gone; the next writer's commit removes them")
        if len(orphans) > len(dead):
            notes.append(f"{self.path}: {len(orphans) - len(dead)} older file version(s) kept for "
                         "readers still open (eval, export); removed at the first commit after they close")
        for p, alive in partial_dirs(self.path):
            if not alive:
                notes.append(f"{p}: left by a killed `prepare` of this folder; the next prepare to "
                             f"{self.path.name} removes it, or remove it yourself")
        for p, alive in partial_dirs(self.path / NARROWED):
            if not alive:
                notes.append(f"{p}: a narrowed copy of this store that a killed run left; the next "
                             "run that makes one removes it, or remove it yourself")
        return notes

    def verify(self) -> list[str]:
        """Read every file and check it against the manifest; return one line per problem."""
        problems = self.shape_problems()
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


