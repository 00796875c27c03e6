"""Each unit as an `nn.Module`: built on the meta device from one template per kind of unit, its
tensors mapped in from the pager, and cached while they stay the same (`forget` ends that)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from blocktune.machine.hostmem import LeanHeap
from blocktune.model.args import LoraConfig, ModelArgs
from blocktune.model.llama import Block, Embed, Head
from blocktune.model.lora import LoraAdapters, add_lora
from blocktune.paging.pager import Pager

__all__ = ["UnitModules"]


class UnitModules:
    """The modules of the units `pager` holds, with the LoRA `adapters` (if any) in place and,
    with LoRA, only the adapters trainable. `heap`: hands freed heap back to the OS between
    units (lean memory on the CPU)."""

    def __init__(self, args: ModelArgs, pager: Pager, adapters: LoraAdapters | None,
                 lora: LoraConfig | None, heap: LeanHeap | None = None):
        self.args, self.pager, self.adapters, self.lora = args, pager, adapters, lora
        self.heap = heap
        self._built: dict[str, tuple[dict, nn.Module]] = {}  # unit -> (its tensors, its module)
        self._templates: dict[str, nn.Module] = {}  # one meta-device module per kind of unit
        # a mapped unit's file stays mapped, and a module that computes from that memory may stay
        # too; one that holds converted copies (a bf16 store computed in fp32) would keep every
        # unit's copy alive past its eviction, outside the budget
        if not pager.mapped or pager.store.dtype != pager.dtype:
            pager.on_evict.append(self.forget)

    def get(self, unit: str, training: bool) -> nn.Module:
        """`unit`'s module over the tensors the pager holds for it now, in train or eval mode."""
        resident = self.tensors(unit)
        cached = self._built.get(unit)
        if cached is not None and cached[0].keys() == resident.keys() and all(
                cached[0][k] is t for k, t in resident.items()):  # the same tensors: the module fits
            return cached[1].train(training)
        mod = copy.deepcopy(self._template(unit))
        tensors = dict(resident)
        if self.adapters is not None:
            tensors.update(self.adapters.of(unit))
        mod.load_state_dict(tensors, assign=True, strict=True)
        if self.lora is not None:
            for name, p in mod.named_parameters():
                if ".lora_" not in name:
                    p.requires_grad_(False)
        # kept while the unit is resident (the pager drops it on eviction, so a module never
        # holds the weights of a unit the budget has let go), or, mapped, while the file is
        self._built[unit] = (resident, mod)
        return mod.train(training)

    def tensors(self, unit: str, graph_kept: bool = False) -> dict[str, torch.Tensor]:
        """`unit`'s tensors, resident, the heap's freed memory handed back first where it is
        lean (`graph_kept`: for the backward through the graph the forward kept, which names them)."""
        if self.heap is not None:
            self.heap.between_units(graph_kept)
        return self.pager.get(unit)

    def forget(self, unit: str) -> None:
        """The one way a cached module goes: its unit was evicted, or its module must not be
        reused (a kept graph's, its weights swapped for placeholders)."""
        self._built.pop(unit, None)

    def close(self) -> None:
        for unit in list(self._built):
            self.forget(unit)

    def _template(self, unit: str) -> nn.Module:
        kind = unit if unit in ("embed", "head") else "block"
        if kind not in self._templates:
            with torch.device("meta"):  # constructing runs the initialisers: ms per block, so once
                self._templates[kind] = (Embed(self.args) if kind == "embed" else Head(self.args)
                                         if kind == "head" else self._block())
        return self._templates[kind]

    def _block(self) -> nn.Module:
        block = Block(self.args)
        return block if self.lora is None else add_lora(block, self.lora)
