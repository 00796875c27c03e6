"""The engine's side of a pipeline stage (`blocktune.dist.pipeline`): which units are this
rank's, and what crosses its boundaries."""

from __future__ import annotations

import torch

from blocktune.dist.groups import DistContext
from blocktune.dist.pipeline import split_by_bytes
from blocktune.engine.order import wants_dx
from blocktune.errors import ConfigError
from blocktune.store.store import BlockStore

__all__ = ["StageLink", "stage_range"]


def stage_range(store: BlockStore, dist: DistContext) -> tuple[int, int]:
    """This rank's units [lo, hi): all of them, or its pipeline stage's (`blocktune.dist.pipeline`)."""
    if dist.stages == 1:
        return 0, len(store.units)
    if store.tied:
        raise ConfigError(f"{store.path}: tied embeddings share one matrix between the first "
                          "and the last stage; --stages does not split such a model yet (use "
                          "data parallel: --nproc without --stages)")
    return split_by_bytes([store.unit_bytes(u) for u in store.units], dist.stages)[dist.stage]


class StageLink:
    """A rank's units [lo, hi) of the store's, and the activations, RNG states and gradients
    that cross to the stages before and after it (nothing crosses without stages)."""

    def __init__(self, dist: DistContext, store: BlockStore, full: bool, dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.dist, self.dim, self.dtype, self.device = dist, dim, dtype, device
        self.lo, self.hi = stage_range(store, dist)
        # the stage before trains something below it: it wants the gradient w.r.t. our input
        self.sends_grad = self.lo > 0 and wants_dx(self.lo, full)

    def arrive(self, xs: list[torch.Tensor], cursors: list, m: int) -> None:
        """On a stage after the first: micro-batch m's activation and RNG state from the stage before."""
        if self.lo == 0:
            return
        pipe, (B, T) = self.dist.pipe, xs[m].shape[:2]
        xs[m] = pipe.recv((B, T, self.dim), self.dtype, pipe.prev, self.device)
        cursors[m] = pipe.recv_rng(cursors[m], pipe.prev)

    def receive(self, shape: tuple[int, int]) -> torch.Tensor:
        """(batch, seq) positions' activation from the stage before (no RNG state: eval mode)."""
        pipe = self.dist.pipe
        return pipe.recv(shape + (self.dim,), self.dtype, pipe.prev, self.device)

    def send_on(self, x: torch.Tensor, cursor=None) -> None:
        """An activation (and, training, the RNG state after it) to the next stage."""
        pipe = self.dist.pipe
        pipe.send(x, pipe.next)
        if cursor is not None:
            pipe.send_rng(cursor, pipe.next)

    def grad_from_next(self, shape: tuple[int, int]) -> torch.Tensor:
        """The gradient w.r.t. this stage's output for (batch, seq) positions, from the next stage."""
        pipe = self.dist.pipe
        return pipe.recv(shape + (self.dim,), self.dtype, pipe.next, self.device)

    def pass_back(self, grads: list, m: int) -> None:
        """On a stage after the first: micro-batch m's gradient w.r.t. this stage's input, to the
        stage before (when that one trains anything below it)."""
        if self.sends_grad:
            self.dist.pipe.send(grads[m], self.dist.pipe.prev)

    def flush(self) -> None:
        """Wait for what this rank has sent (a no-op without stages)."""
        if self.dist.pipe is not None:
            self.dist.pipe.flush()
