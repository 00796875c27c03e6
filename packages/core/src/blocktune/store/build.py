"""A new store from units in order: streamed in, written beside, all or nothing."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from blocktune.errors import StoreError
from blocktune.formats.tokenizer import HF_TOKENIZER_FILES, TOKENIZERS, detect_kind
from blocktune.machine.devices import dtype_name
from blocktune.model.args import ModelArgs
from blocktune.store.fileio import crc32, write_tensors
from blocktune.store.records import FORMAT, FORMAT_VERSION, MANIFEST, FileRecord, manifest_bytes, unit_names
from blocktune.store.safefiles import atomic_write, open_new, staging_dir
from blocktune.store.store import BlockStore

__all__ = ["build_store"]


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
    cache: bool = True,
) -> BlockStore:
    """Write a new store from (unit name, tensors) pairs in order; all or nothing.

    `units` may be a generator that assembles each unit on demand (streaming import), so only
    one unit is in memory at a time. `files`: small extra files (name -> bytes) that belong to
    the store (named in the manifest's `extra_files`). `tokenizer`: a tokenizer.model
    (sentencepiece or tiktoken, told apart by content), or with `tokenizer_kind="hf"` the folder
    that holds tokenizer.json and its companions. `cache=False`: each unit file leaves the page
    cache once it is written (a copy made for a run under a memory limit).
    """
    expected = unit_names(args)
    named: dict[str, Any] = {}
    tok_files = _tokenizer_files(tokenizer, tokenizer_kind, named)  # read and checked before anything is written
    with staging_dir(Path(dst)) as tmp, ThreadPoolExecutor(1, thread_name_prefix="blocktune-build") as pool:
        records = _write_units(tmp, pool, args, units, dtype, progress, cache)
        missing = [n for n in expected if n not in records]
        if missing:
            raise StoreError(f"store is missing units {missing}")
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "model": args.to_dict(),
            "dtype": dtype_name(dtype), "step": 0,
            "units": {n: records[n].to_dict() for n in expected}, "state": {},
            "tokenizer": None, **(extra or {}), **named,
        }
        small = {**(files or {}), **tok_files}
        extras = sorted(set(small) - {manifest["tokenizer"]})
        if extras:
            manifest["extra_files"] = extras
        manifest["checksums"] = {}
        for name, data in small.items():  # small files: written and checksummed from memory
            atomic_write(tmp / name, data)
            manifest["checksums"][name] = {"bytes": len(data), "crc32": crc32(memoryview(data))}
        atomic_write(tmp / MANIFEST, manifest_bytes(manifest))
    return BlockStore.open(dst)


def _write_unit(folder: Path, name: str, tensors: dict[str, torch.Tensor], cache: bool = True) -> FileRecord:
    with open(folder / f"{name}.safetensors", "wb", opener=open_new) as f:
        nbytes, crc, layout = write_tensors(f, tensors)
        f.flush()
        os.fsync(f.fileno())
        if not cache and hasattr(os, "posix_fadvise"):  # written and synced: its pages leave the page
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # cache (and a memory cgroup's count)
    return FileRecord(f"{name}.safetensors", nbytes, crc, layout)


def _write_units(tmp: Path, pool: ThreadPoolExecutor, args: ModelArgs, units, dtype: torch.dtype,
                 progress, cache: bool = True) -> dict[str, FileRecord]:
    """Each unit cast and written on the pool while the next is assembled: two units in memory
    at most."""
    expected = unit_names(args)
    records: dict[str, FileRecord] = {}
    pending: tuple[str, Future] | None = None

    def landed() -> None:
        records[pending[0]] = pending[1].result()
        if progress:
            progress(pending[0])

    for name, tensors in units:
        if name not in expected or name in records or (pending and pending[0] == name):
            raise StoreError(f"unexpected or repeated unit {name!r}; expected {expected}")
        if name == "head" and args.tie_embeddings and "output.weight" in tensors:
            raise StoreError("tied embeddings: the head's output.weight is the embedding matrix, "
                             "stored once with embed; leave it out of the head")
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        if pending:
            landed()
        pending = (name, pool.submit(_write_unit, tmp, name, cast, cache))
        del tensors, cast
    if pending:
        landed()
    return records


def _tokenizer_files(tokenizer: str | Path | None, kind: str | None, manifest: dict) -> dict[str, bytes]:
    """The tokenizer's files (name -> bytes), and its name and kind in the manifest; loaded
    once here, so that a damaged tokenizer fails `prepare`, not the first run."""
    if tokenizer is None:
        return {}
    kind = kind or detect_kind(Path(tokenizer))
    manifest["tokenizer_kind"] = kind
    TOKENIZERS[kind](tokenizer)
    if kind == "hf":  # a folder: tokenizer.json, its config, the chat template
        folder = Path(tokenizer)
        manifest["tokenizer"] = "tokenizer.json"
        return {n: (folder / n).read_bytes() for n in HF_TOKENIZER_FILES if (folder / n).is_file()}
    manifest["tokenizer"] = "tokenizer.model"
    return {"tokenizer.model": Path(tokenizer).read_bytes()}
