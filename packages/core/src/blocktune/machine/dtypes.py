"""The floating-point dtypes blocktune computes and stores in, by their short names (fp32, bf16,
fp16): parsed once from a setting, named again in files and messages. The names need no torch
(`blocktune info` names a store's dtype without it); the dtypes themselves are torch's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from blocktune.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["TORCH_NAMES", "torch_name", "parse_dtype", "dtype_name"]

_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # torch's name -> ours
#: every name a setting or a manifest may give a dtype by (ours and torch's) -> torch's name
TORCH_NAMES = {**{short: name for name, short in _SHORT.items()}, **{name: name for name in _SHORT}}


def torch_name(name: str) -> str:
    """Torch's name of the dtype `name` (fp32 -> float32), or a clear error."""
    try:
        return TORCH_NAMES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; choose one of bf16, fp16, fp32") from None


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    import torch

    return name if isinstance(name, torch.dtype) else getattr(torch, torch_name(name))


def dtype_name(dtype: torch.dtype) -> str:
    return _SHORT[str(dtype).removeprefix("torch.")]
