"""The trainable LoRA matrices of a paged model, apart from the frozen units they adapt.

`LoraAdapters` draws every block's A and B as peft draws them (A kaiming-uniform from one
generator, blocks in order; B zero), on a meta-device template (the base weights are never
made), keeps them in fp32 whatever the compute dtype (as peft does: a bf16 adapter and its AdamW
state would round away updates below its 8-bit mantissa), names them as the whole model's
modules (`layers.3.attention.wq.lora_a`), and loads a given set with clear errors. The engine
merges a block's matrices into the module it builds for that block; files are
`blocktune.adapters`' business.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .config import LoraConfig, ModelArgs
from .errors import StoreError
from .model import Block, Linear, init_lora_, unit_prefix

__all__ = ["LoraAdapters"]


class LoraAdapters:
    def __init__(self, args: ModelArgs, lora: LoraConfig, blocks: list[str], device: torch.device, seed: int,
                 given: dict[str, torch.Tensor] | None = None):
        self.blocks = list(blocks)
        gen = torch.Generator().manual_seed(seed)
        with torch.device("meta"):
            template = Block(args, lora)
        self.by_unit: dict[str, dict[str, nn.Parameter]] = {}
        for unit in self.blocks:
            block = copy.deepcopy(template)
            for m in block.modules():
                if isinstance(m, Linear) and m.lora_a is not None:
                    m.lora_a = nn.Parameter(torch.empty(m.lora_a.shape))
                    m.lora_b = nn.Parameter(torch.empty(m.lora_b.shape))
            init_lora_(block, gen)
            self.by_unit[unit] = {k: nn.Parameter(v.detach().to(device, torch.float32))
                                  for k, v in block.state_dict().items() if ".lora_" in k}
        if given is not None:
            self.load(given)

    def of(self, unit: str) -> dict[str, nn.Parameter]:
        """One block's matrices, keyed as inside the block (`attention.wq.lora_a`)."""
        return self.by_unit.get(unit, {})

    def state(self) -> dict[str, torch.Tensor]:
        """Every matrix, keyed by the whole model's names (`layers.3.attention.wq.lora_a`)."""
        return {f"{unit_prefix(u)}{k}": p.detach() for u, d in self.by_unit.items() for k, p in d.items()}

    def load(self, flat: dict[str, torch.Tensor]) -> None:
        mine = self.state()
        if set(flat) != set(mine):
            extra, missing = sorted(set(flat) - set(mine))[:3], sorted(set(mine) - set(flat))[:3]
            raise StoreError(f"adapter keys do not match this model and LoRA config "
                             f"(unexpected {extra}, missing {missing})")
        for name, t in flat.items():
            if t.shape != mine[name].shape:
                raise StoreError(f"adapter {name}: shape {tuple(t.shape)} != expected "
                                 f"{tuple(mine[name].shape)} (LoRA rank or model differs)")
        with torch.no_grad():
            for u, d in self.by_unit.items():
                for k, p in d.items():
                    p.copy_(flat[f"{unit_prefix(u)}{k}"])

    def params(self) -> list[nn.Parameter]:
        """In block order (the optimizer's, and the flat all-reduce's, order)."""
        return [p for u in self.blocks for p in self.by_unit[u].values()]
