"""The units a model is cut into, by name: `embed`, `block_00` … (one per transformer layer),
`head`; the one place a unit's name is made and read. No torch: `blocktune info` names a
store's units without it."""

from __future__ import annotations

__all__ = ["unit_name", "layer_of", "unit_prefix"]


def unit_name(layer: int) -> str:
    """The unit that holds transformer layer `layer` (the one place the name format is made)."""
    return f"block_{layer:02d}"


def layer_of(unit: str) -> int | None:
    """The layer index of a block unit's name; None for embed and head (the one place it is read)."""
    return int(unit[len("block_"):]) if unit.startswith("block_") else None


def unit_prefix(unit: str) -> str:
    """The prefix of a unit's keys in the whole model's (Meta) names: `layers.3.`, or '' for
    embed and head, whose keys are already whole-model names."""
    layer = layer_of(unit)
    return "" if layer is None else f"layers.{layer}."
