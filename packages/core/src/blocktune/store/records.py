"""What a store's manifest records: its format, the unit names, one record per file (name,
size, crc32, each tensor's dtype and shape), and a crc32 of itself (`manifest_bytes`); read and
checked by `StoreManifest`, without torch (`blocktune info` needs nothing more)."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blocktune.errors import ChecksumError, StoreError
from blocktune.machine.dtypes import torch_name
from blocktune.model.args import ModelArgs
from blocktune.model.units import unit_name

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "MANIFEST_CRC", "FileRecord", "StoreManifest", "unit_names",
           "manifest_files", "manifest_bytes", "manifest_crc", "shape_mismatches", "manifest_path",
           "read_manifest", "open_manifest"]

FORMAT = "blocktune-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_CRC = "manifest_crc32"  # the manifest's own checksum: a manifest written before #29 has none


def manifest_crc(m: dict[str, Any]) -> int:
    """crc32 of a manifest's fields (its own checksum aside), as canonical JSON: what the
    fields say is checked, not how the file spaces them."""
    body = {k: v for k, v in m.items() if k != MANIFEST_CRC}
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def manifest_bytes(m: dict[str, Any]) -> bytes:
    """The bytes of manifest.json for `m`, with its checksum (checked by `BlockStore.open`)."""
    return json.dumps({**m, MANIFEST_CRC: manifest_crc(m)}, indent=1).encode()


def shape_mismatches(args: ModelArgs, units: dict[str, dict[str, Any]], label: str = "") -> list[str]:
    """Where the tensor records of `units` (unit -> file record) differ from the shapes that
    the model fields `args` give (dim, vocab_size, multiple_of, …): one line per tensor, the
    units it differs in named together (after `label`)."""
    from blocktune.model.llama import stored_shapes  # the modules' own shapes, built on the meta device

    block = stored_shapes(args, unit_name(0))  # every block holds the same shapes
    want = {u: stored_shapes(args, u) if u in ("embed", "head") else block for u in units}
    found: dict[tuple, list[str]] = {}
    for u, rec in units.items():
        got = {k: tuple(m["shape"]) for k, m in rec["tensors"].items()}
        for k in sorted(set(got) | set(want[u])):
            if got.get(k) != want[u].get(k):
                found.setdefault((k, want[u].get(k), got.get(k)), []).append(label + u)
    return [f"{k}: the model fields give {'no such tensor' if w is None else list(w)}, the tensor records "
            f"{'none' if g is None else list(g)} (in {', '.join(us[:3])}{', …' if len(us) > 3 else ''})"
            for (k, w, g), us in found.items()]


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
    prev = m.get("previous", {})  # the step before, kept for a roll-back
    files.update(r["file"] for part in ("units", "state") for r in prev.get(part, {}).values())
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


def manifest_path(path: Path) -> Path:
    """The manifest of the store at `path`, or a clear error where there is none."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        hint = " (it holds params.json: run `blocktune prepare` on it first)" if (
            path / "params.json").exists() else ""
        raise StoreError(f"{path}: not a blocktune store, no {MANIFEST}{hint}")
    return mpath


def read_manifest(mpath: Path) -> tuple[bytes, dict[str, Any]]:
    """manifest.json's bytes and its fields, checked (`check_manifest`), its own checksum aside."""
    try:
        raw = mpath.read_bytes()
        manifest = json.loads(raw)
    except FileNotFoundError:
        raise StoreError(f"{mpath.parent}: not a blocktune store, no {MANIFEST}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{mpath}: corrupt manifest ({exc})") from exc
    check_manifest(manifest, mpath)
    manifest.pop(MANIFEST_CRC, None)  # checked: the in-memory manifest is its fields alone
    return raw, manifest


def check_manifest(m: Any, mpath: Path) -> None:
    """A clear error where `m` (read from `mpath`) is not a manifest this blocktune reads: another
    format or a newer version, a damaged checksum, a malformed field."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise StoreError(f"{mpath}: not a blocktune manifest (format={m.get('format') if isinstance(m, dict) else None!r})")
    version = m.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreError(
            f"{mpath}: store format version {version!r} is newer than this blocktune "
            f"understands ({FORMAT_VERSION}); upgrade blocktune"
        )
    if MANIFEST_CRC in m and m[MANIFEST_CRC] != manifest_crc(m):
        raise ChecksumError(
            f"{mpath}: checksum mismatch (its fields give crc32 {manifest_crc(m)}, it says "
            f"{m[MANIFEST_CRC]!r}); the manifest is damaged. It alone records which file versions "
            "make the model and its settings: restore manifest.json (or the whole store) from a "
            "copy, or prepare the store again")
    try:
        args = ModelArgs(**m["model"])
        torch_name(m["dtype"])
        int(m["step"])
        for n in unit_names(args):
            FileRecord.from_dict(m["units"][n])
        for r in m.get("state", {}).values():
            FileRecord.from_dict(r)
    except Exception as exc:  # any malformed field: one clear error
        raise StoreError(f"{mpath}: malformed manifest ({type(exc).__name__}: {exc})") from exc


def open_manifest(path: str | Path) -> StoreManifest:
    """The committed manifest of the store at `path`, read once and checked: no lock, no pin and
    no torch, for what reads the manifest alone (`blocktune info`)."""
    path = Path(path)
    return StoreManifest(path, read_manifest(manifest_path(path))[1])


class StoreManifest:
    """What a store's committed manifest says: the model, its dtype, the step, each unit's file
    records, the full fine-tune that owns the weights and the base it kept. `BlockStore` is one
    that reads and writes the files too."""

    def __init__(self, path: str | Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self.args = ModelArgs(**manifest["model"])
        self.units = unit_names(self.args)
        self.use_manifest(manifest)

    def use_manifest(self, manifest: dict[str, Any]) -> None:
        """Read `manifest` (checked, or just committed) from now on."""
        self.manifest = manifest
        self._records = {n: FileRecord.from_dict(manifest["units"][n]) for n in self.units}
        self._state = {n: FileRecord.from_dict(r) for n, r in manifest.get("state", {}).items()}

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def torch_dtype_name(self) -> str:
        """The dtype the units are stored in, by torch's name (bfloat16)."""
        return torch_name(self.manifest["dtype"])

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

    def referenced_files(self) -> set[str]:
        return manifest_files(self.manifest)

    # ---- a full fine-tune's bookkeeping ----
    @property
    def keeps_base(self) -> bool:
        """Whether the weights before the store's first full fine-tune are kept (`BlockStore.open_base`)."""
        return "base" in self.manifest

    def base_is_current(self) -> bool:
        """Whether the units are the base model's files: no base is kept, or no step has
        changed a unit since it was."""
        units = self.manifest["units"]
        return self.manifest.get("base", {}).get("units", units) == units

    def holds_tuned(self) -> bool:
        """Whether the units are weights a full fine-tune changed: they differ from the kept base,
        or, with no base kept, a training step was committed to them (`last_step`)."""
        return not self.base_is_current() if self.keeps_base else "last_step" in self.manifest

    def run_record(self) -> dict | None:
        """The full fine-tune that owns the tuned state (`BlockStore.start_run`): its id, run folder
        and first step; None: no run was ever started on the store. Stores tuned before runs had
        ids record the first step alone."""
        run = self.manifest.get("run")
        return dict(run) if isinstance(run, dict) and "first_step" in run else None

    def run_start(self) -> int | None:
        """The step the current full fine-tune started from (`BlockStore.start_run`); None: none recorded."""
        run = self.run_record()
        return None if run is None else int(run["first_step"])

    def last_step(self) -> dict | None:
        """What the commit of the last training step recorded of it (step, loss, tokens, lr)."""
        return self.manifest.get("last_step") or None

    def previous_step(self) -> int | None:
        """The step `BlockStore.roll_back` returns to (kept by a commit with `keep_previous`); None: none."""
        return (self.manifest.get("previous") or {}).get("step")
