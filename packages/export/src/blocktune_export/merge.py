"""LoRA merge: W' = W + scale · B·A, computed in fp32, for export."""

from __future__ import annotations

import torch
from blocktune.formats.adapters import Adapter
from blocktune.model.units import layer_of
from blocktune.store.store import BlockStore

__all__ = ["merged_unit"]


def merged_unit(store: BlockStore, unit: str, adapter: Adapter | None) -> dict[str, torch.Tensor]:
    """One unit's weights with `adapter` folded in (fp32 where merged, stored dtype otherwise).
    The unit's file is mapped (read-only): unmerged tensors are views of the page cache."""
    tensors = store.read_unit(unit, map_file=True)
    layer = layer_of(unit)
    if adapter is None or layer is None:
        return tensors
    out = dict(tensors)
    for key in tensors:
        if not key.endswith(".weight"):
            continue
        stem = key[: -len(".weight")]
        a = adapter.tensors.get(f"layers.{layer}.{stem}.lora_a")
        if a is None:
            continue
        b = adapter.tensors[f"layers.{layer}.{stem}.lora_b"]
        delta = (b.float() @ a.float()) * adapter.lora.scale
        out[key] = tensors[key].float() + delta
    return out
