"""What a store's manifest records: its format, the unit names, and one record per file
(name, size, crc32, each tensor's dtype and shape)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from blocktune.model.args import ModelArgs
from blocktune.model.llama import unit_name

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "FileRecord", "unit_names", "manifest_files"]

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
