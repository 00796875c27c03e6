"""Kept graphs that do not pin their unit: saved weights become handles the pager resolves."""

from __future__ import annotations

import torch

from blocktune.paging.pager import Pager

__all__ = ["WeightHandles"]


class WeightHandles:
    """saved_tensors_hooks for one unit: a weight that autograd saves for the backward is
    replaced by a handle (its key, and how the saved tensor views it) and fetched back from the
    pager when the backward needs it, so a kept graph does not pin the unit's weights in memory.
    Everything else saved (activations) is kept as is, and its bytes are counted."""

    def __init__(self, pager: Pager, unit: str):
        self.pager, self.unit = pager, unit
        # storage -> (a key in it, that key's offset). Units read from one file buffer share one
        # storage; a handle's offset is relative to the key it names, so any key will do.
        self.weights = {t.untyped_storage().data_ptr(): (k, t.storage_offset())
                        for k, t in pager.get(unit).items()}
        self.activation_bytes = 0

    def pack(self, t: torch.Tensor):
        found = self.weights.get(t.untyped_storage().data_ptr()) if t.device.type != "meta" else None
        if found is None:
            self.activation_bytes += t.numel() * t.element_size()
            return t
        key, base_offset = found
        return (key, tuple(t.shape), t.stride(), t.storage_offset() - base_offset)

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        key, shape, stride, offset = packed
        base = self.pager.get(self.unit)[key]
        return base.as_strided(shape, stride, base.storage_offset() + offset)
