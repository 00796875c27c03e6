"""LoRA adapter files: safetensors with the LoRA config and the model's shape in the metadata."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from .config import LoraConfig, ModelArgs
from .errors import StoreError
from .store import atomic_write

__all__ = ["Adapter", "save_adapter", "load_adapter"]

_SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
               "ffn_dim_multiplier")


def _fingerprint(args: ModelArgs) -> dict:
    return {k: getattr(args, k) for k in _SHAPE_KEYS}


@dataclass
class Adapter:
    tensors: dict[str, torch.Tensor]  # layers.N.attention.wq.lora_a, …
    lora: LoraConfig
    model: dict


def save_adapter(path: str | Path, tensors: dict[str, torch.Tensor], lora: LoraConfig,
                 args: ModelArgs) -> Path:
    path = Path(path)
    cpu = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    crc = zlib.crc32(b"".join(cpu[k].numpy().tobytes() for k in sorted(cpu)))
    meta = {"format": "blocktune-lora", "lora": json.dumps(lora.to_dict()),
            "model": json.dumps(_fingerprint(args)), "crc32": str(crc)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, save(cpu, metadata=meta))
    return path


def load_adapter(path: str | Path, args: ModelArgs | None = None) -> Adapter:
    """Read an adapter file, check its checksum and, given `args`, that it fits the model."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: adapter file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != "blocktune-lora":
            raise StoreError(f"{path}: not a blocktune LoRA adapter (no format tag)")
        lora = LoraConfig.from_dict(json.loads(meta["lora"]))
        model = json.loads(meta["model"])
        crc = int(meta["crc32"])
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"{path}: unreadable adapter file ({type(exc).__name__}: {exc})") from exc
    got = zlib.crc32(b"".join(tensors[k].numpy().tobytes() for k in sorted(tensors)))
    if got != crc:
        raise StoreError(f"{path}: checksum mismatch; the adapter file is damaged")
    if args is not None and model != _fingerprint(args):
        diff = {k: (model.get(k), getattr(args, k)) for k in _SHAPE_KEYS if model.get(k) != getattr(args, k)}
        raise StoreError(f"{path}: adapter was trained for a different model "
                         f"(adapter vs store: {diff}); use an adapter made from this store")
    return Adapter(tensors, lora, model)
