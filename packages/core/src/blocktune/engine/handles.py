"""Kept graphs that do not pin their unit: saved weights become handles the pager resolves."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from blocktune.paging.pager import Pager

__all__ = ["WeightHandles"]


class WeightHandles:
    """saved_tensors_hooks for one unit: a weight that autograd saves for the backward is
    replaced by a handle (its key, and how the saved tensor views it) and fetched back from the
    pager when the backward needs it, so a kept graph does not pin the unit's weights in memory.
    Tensors in `held` (the unit's trained adapters: their module holds them anyway) are kept as
    they are and not counted. Everything else saved (activations) is kept as is, and its bytes
    are counted once (q, k and v's adapters save one input three times; the attention's output
    is saved again as wo's input, a view of the same bytes)."""

    def __init__(self, pager: Pager, unit: str, held: Iterable[torch.Tensor] = ()):
        self.pager, self.unit = pager, unit
        # storage -> (a key in it, that key's offset). Units read from one file buffer share one
        # storage; a handle's offset is relative to the key it names, so any key will do.
        self.weights = {t.untyped_storage().data_ptr(): (k, t.storage_offset())
                        for k, t in pager.get(unit).items()}
        self.held = {t.untyped_storage().data_ptr() for t in held} - self.weights.keys()
        self.activation_bytes = 0
        # (address, bytes) of the activations counted (the graph holds them: no address is reused)
        self._counted: set[tuple[int, int]] = set()

    def pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else None
        found = self.weights.get(ptr)
        if found is None:
            return t if ptr in self.held else self._activation(t)
        key, base_offset = found
        return (key, tuple(t.shape), t.stride(), t.storage_offset() - base_offset)

    def _activation(self, t: torch.Tensor):
        """What the graph keeps for an activation `t`: itself, its bytes counted once."""
        span = (t.data_ptr(), t.numel() * t.element_size())
        if span not in self._counted:
            self._counted.add(span)
            self.activation_bytes += span[1]
        return t

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        key, shape, stride, offset = packed
        base = self.pager.get(self.unit)[key]
        return base.as_strided(shape, stride, base.storage_offset() + offset)
