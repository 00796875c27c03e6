"""What a store's manifest records: its format, the unit names, one record per file (name,
size, crc32, each tensor's dtype and shape), and a crc32 of itself (`manifest_bytes`)."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any

from blocktune.model.args import ModelArgs
from blocktune.model.llama import stored_shapes, unit_name

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "MANIFEST_CRC", "FileRecord", "unit_names", "manifest_files",
           "manifest_bytes", "manifest_crc", "shape_mismatches"]

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
