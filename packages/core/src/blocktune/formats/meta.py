"""Meta's params.json (the file that ships next to consolidated.00.pth), read into `ModelArgs`
and written from it; Meta's checkpoint shards are `blocktune_export.meta`'s."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from blocktune.errors import ConfigError
from blocktune.model.args import ModelArgs

__all__ = ["from_params", "read_json", "from_file", "to_params", "meta_scaled_rope"]

# Keys of Meta's params.json, in the order Meta writes them.
_META_KEYS = (
    "dim",
    "multiple_of",
    "ffn_dim_multiplier",
    "n_heads",
    "n_kv_heads",
    "n_layers",
    "norm_eps",
    "rope_theta",
    "vocab_size",
)


def meta_scaled_rope(factor: float | None = None) -> dict[str, Any]:
    """Meta's `use_scaled_rope` as HF's llama3 rope type (llama-models: factor 8 unless the
    params give rope_scaling_factor, low/high frequency factors 1 and 4, 8192 original positions)."""
    return {"rope_type": "llama3", "factor": float(factor or 8.0), "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def from_params(params: dict[str, Any], *, source: str = "params.json") -> ModelArgs:
    known = {f.name for f in dataclasses.fields(ModelArgs)} | {"use_scaled_rope", "rope_scaling_factor"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {unknown}; expected a subset of {sorted(known)}"
        )
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing:
        raise ConfigError(f"{source}: missing required key(s) {missing}")
    values = dict(params)
    # Llama 3.1+: Meta's wavelength-banded RoPE rescale (llama-models' apply_scaling)
    scaled = values.pop("use_scaled_rope", False)
    factor = values.pop("rope_scaling_factor", None)
    if scaled:
        values["rope_scaling"] = meta_scaled_rope(factor)
    elif factor is not None:
        raise ConfigError(f"{source}: rope_scaling_factor without use_scaled_rope")
    if values.get("vocab_size", 0) == -1:
        raise ConfigError(
            f"{source}: vocab_size is -1; read it from tokenizer.model "
            "(blocktune prepare does this) before building the model"
        )
    try:
        return ModelArgs(**values)
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def read_json(path: str | Path) -> dict[str, Any]:
    """The raw content of a params.json, with clear errors for a malformed file."""
    path = Path(path)
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); is this Meta's params.json?") from exc
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(params).__name__}")
    return params


def from_file(path: str | Path) -> ModelArgs:
    return from_params(read_json(path), source=str(path))


def to_params(args: ModelArgs) -> dict[str, Any]:
    """Meta's params.json content (dropout and max_seq_len are ours, left out)."""
    out: dict[str, Any] = {}
    for key in _META_KEYS:
        value = getattr(args, key)
        if key in ("n_kv_heads", "ffn_dim_multiplier") and value is None:
            continue
        if key == "rope_theta" and value == 10000.0:  # Llama 2's default: its params.json has no key
            continue
        out[key] = value
    if args.rope_scaling is not None and args.rope_scaling == meta_scaled_rope(args.rope_scaling.get("factor")):
        out["use_scaled_rope"] = True
        if args.rope_scaling["factor"] != 8.0:
            out["rope_scaling_factor"] = args.rope_scaling["factor"]
    return out
