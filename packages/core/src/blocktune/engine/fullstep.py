"""A full fine-tune's step of one unit, run as the unit's backward completes: its gradient
summed over the data-parallel replicas (overlapped with the next unit's backward where the
budget holds two units), the optimizer step and the write-back (`Pager.step_and_write`), and
the tied embeddings' shared matrix."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from blocktune.dist.groups import DistContext
from blocktune.engine.modules import UnitModules
from blocktune.engine.optim import OptimizerConfig
from blocktune.paging.pager import Pager

__all__ = ["FullStep"]


class FullStep:
    """Steps the units of a full fine-tune one at a time, in the backward's order. `tied`: the
    head's projection is the embeddings' matrix, stepped once, with embed, on both gradients."""

    def __init__(self, modules: UnitModules, pager: Pager, optimizer: OptimizerConfig,
                 dist: DistContext, tied: bool):
        self.modules, self.pager, self.optimizer, self.dist, self.tied = modules, pager, optimizer, dist, tied
        self._tied_grad: torch.Tensor | None = None  # the head's gradient of the matrix, for embed

    def detach_weights(self, unit: str, mod: nn.Module) -> nn.Module:
        """Full fine-tune, kept graph: its AccumulateGrad nodes hold `mod`'s parameters, which
        would pin the unit's weights until the backward. Point them at a 0-byte placeholder of
        the same shape (the backward points them back at whatever the pager then holds), and
        keep the module out of the cache, where it would be reused with the placeholders."""
        self.modules.forget(unit)
        for p in mod.parameters():
            p.data = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)
        return mod

    def reduce_then_step(self, unit: str, mod: nn.Module, lr: float, step: int,
                         pending: Callable[[], None] | None) -> Callable[[], None] | None:
        """Data parallel: sum this unit's gradient over the ranks, then step it. When the budget
        holds two units, the all-reduce is started now and the step runs after the next unit's
        backward (returned as `pending`); otherwise both happen now."""
        if pending is not None:
            pending()
        if not self.dist.enabled:
            self.step(unit, mod, lr, step)
            return None
        grads = [p.grad for p in mod.parameters()]
        if not self.pager.holds_two_units:
            self.dist.all_reduce_(grads)
            self.step(unit, mod, lr, step)
            return None
        finish = self.dist.all_reduce_async(grads)
        self.pager.pin(unit)

        def complete() -> None:
            finish()
            self.step(unit, mod, lr, step)
            self.pager.unpin(unit)

        return complete

    def step(self, unit: str, mod: nn.Module, lr: float, step: int) -> None:
        """The optimizer step of `unit` (its gradients in `mod`), written back by the pager."""
        params = dict(mod.named_parameters())
        grads = {k: p.grad for k, p in params.items()}
        if self.tied and unit == "head":  # the embeddings' matrix: stepped with embed
            self._tied_grad = grads.pop("output.weight")
            params.pop("output.weight").grad = None
        elif self.tied and unit == "embed" and self._tied_grad is not None:
            grads["tok_embeddings.weight"] = grads["tok_embeddings.weight"] + self._tied_grad
            self._tied_grad = None
        self.pager.step_and_write(unit, {k: p.data for k, p in params.items()}, grads, self.optimizer,
                                  lr, step + 1)
        for p in params.values():
            p.grad = None
        if self.tied and unit == "embed":
            self.pager.drop("head")  # it holds its own copy of the matrix from before this step
