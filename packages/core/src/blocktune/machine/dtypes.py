"""The floating-point dtypes blocktune computes and stores in, by their short names (fp32, bf16,
fp16): parsed once from a setting, named again in files and messages."""

from __future__ import annotations

import torch

from blocktune.errors import ConfigError

__all__ = ["DTYPES", "parse_dtype", "dtype_name"]

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; choose one of bf16, fp16, fp32") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
