"""blocktune's own LoRA adapter file: safetensors with the LoRA config and the model's shape in
the metadata, checksummed. `load_adapter` also reads PEFT's folder (`blocktune.formats.peft`)."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from blocktune.errors import ConfigError, StoreError
from blocktune.model.args import LoraConfig, ModelArgs
from blocktune.store.safefiles import atomic_write

__all__ = ["Adapter", "save_adapter", "load_adapter", "fingerprint"]

_SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
               "ffn_dim_multiplier")
_FAMILY_SHAPE_KEYS = ("explicit_head_dim", "ffn_dim", "qkv_bias", "qk_norm", "tie_embeddings")


def fingerprint(args: ModelArgs) -> dict:
    """The model's shape as an adapter records it (and is checked against)."""
    out = {k: getattr(args, k) for k in _SHAPE_KEYS}
    # the families' fields, where set (an adapter of a Llama-2 store reads as it always did)
    out.update({k: getattr(args, k) for k in _FAMILY_SHAPE_KEYS if getattr(args, k) not in (None, False)})
    return out


@dataclass
class Adapter:
    tensors: dict[str, torch.Tensor]  # layers.N.attention.wq.lora_a, …
    lora: LoraConfig
    model: dict


def _named_crc(tensors: dict[str, torch.Tensor], lora: str, model: str) -> int:
    """crc32 of the LoRA settings, the model fingerprint, the keys, shapes and data (files
    written before it checked the data alone: a damaged key name or alpha passed)."""
    crc = zlib.crc32(f"{lora}|{model}|".encode())
    for k in sorted(tensors):
        crc = zlib.crc32(f"{k}:{list(tensors[k].shape)};".encode(), crc)
        crc = zlib.crc32(tensors[k].numpy().tobytes(), crc)
    return crc


def save_adapter(path: str | Path, tensors: dict[str, torch.Tensor], lora: LoraConfig,
                 args: ModelArgs) -> Path:
    path = Path(path)
    cpu = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    crc = zlib.crc32(b"".join(cpu[k].numpy().tobytes() for k in sorted(cpu)))
    lora_text, model_text = json.dumps(lora.to_dict()), json.dumps(fingerprint(args))
    named = _named_crc(cpu, lora_text, model_text)
    meta = {"format": "blocktune-lora", "lora": lora_text, "model": model_text, "crc32": str(crc),
            "crc32_named": str(named)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, save(cpu, metadata=meta))
    return path


def load_adapter(path: str | Path, args: ModelArgs | None = None) -> Adapter:
    """Read an adapter file (or a PEFT adapter folder), check its checksum and, given `args`,
    that it fits the model."""
    path = Path(path)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        if args is None:
            raise StoreError(f"{path}: a PEFT adapter is read against the store it is for")
        from blocktune.formats.peft import load_peft  # peft.py builds on this module's Adapter

        return load_peft(path, args)
    if path.is_dir():
        raise StoreError(f"{path}: a folder without adapter_config.json; give blocktune's adapter.safetensors "
                         "or a PEFT adapter folder")
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
        named = int(meta["crc32_named"]) if "crc32_named" in meta else None
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"{path}: unreadable adapter file ({type(exc).__name__}: {exc})") from exc
    got = zlib.crc32(b"".join(tensors[k].numpy().tobytes() for k in sorted(tensors)))
    if got != crc or (named is not None and _named_crc(tensors, meta["lora"], meta["model"]) != named):
        raise StoreError(f"{path}: checksum mismatch; the adapter file is damaged")
    if args is not None and model != fingerprint(args):
        raise ConfigError(f"{path}: the adapter was trained for a different model than this store's: "
                          f"{_differences(model, fingerprint(args))}; give the adapter of a run on this model, or "
                          "the store of the model the adapter was trained on")
    return Adapter(tensors, lora, model)


# the model's shape, in words (the fields a fingerprint holds)
_WORDS = {"dim": "hidden size", "n_layers": "layers", "n_heads": "attention heads",
          "n_kv_heads": "key/value heads", "vocab_size": "vocabulary size",
          "multiple_of": "feed-forward width (rounded to a multiple of)",
          "ffn_dim_multiplier": "feed-forward width (multiplier)", "explicit_head_dim": "head size",
          "ffn_dim": "feed-forward width", "qkv_bias": "q/k/v biases", "qk_norm": "q/k norms",
          "tie_embeddings": "embeddings tied to the output"}


def _in_use(model: dict) -> dict:
    """A fingerprint with the values the model uses where a field is unset: as many key/value
    heads as attention heads, a head size of dim / n_heads."""
    out = dict(model)
    if out.get("n_kv_heads") is None:
        out["n_kv_heads"] = out.get("n_heads")
    if out.get("explicit_head_dim") is None and out.get("dim") and out.get("n_heads"):
        out["explicit_head_dim"] = out["dim"] // out["n_heads"]
    return out


def _differences(adapter: dict, store: dict) -> str:
    """'hidden size: the adapter's 64, the store's 128; ...', in the values the models use (None
    where a field left unset has no value to use: which the words say)."""
    def word(v):
        return "none" if v is None else "no" if v is False else "yes" if v is True else v

    used = _in_use(adapter), _in_use(store)
    if any(used[0].get(k) != used[1].get(k) for k in _WORDS):  # else only how the fields were written differs
        adapter, store = used
    keys = [k for k in _WORDS if adapter.get(k) != store.get(k)]
    return "; ".join(f"{_WORDS[k]}: the adapter's {word(adapter.get(k))}, the store's {word(store.get(k))}"
                     for k in keys)
