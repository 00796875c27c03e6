"""The engine's side of a pipeline stage (`blocktune.dist.pipeline`): which units are this
rank's, and what crosses its boundaries."""

from __future__ import annotations

import torch

from blocktune.dist.pipeline import split_by_bytes
from blocktune.errors import ConfigError

__all__ = ["StageSteps"]


class StageSteps:
    """The engine's side of a stage: which units are its own, and what crosses its boundaries.
    Mixed into `Engine` (its units, store, dist, dtype and device)."""

    def _stage_range(self) -> tuple[int, int]:
        """This rank's units [lo, hi): all of them, or its pipeline stage's (`blocktune.dist.pipeline`)."""
        if self.dist.stages == 1:
            return 0, len(self.units)
        if self.store.tied:
            raise ConfigError(f"{self.store.path}: tied embeddings share one matrix between the first "
                              "and the last stage; --stages does not split such a model yet (use "
                              "data parallel: --nproc without --stages)")
        return split_by_bytes([self.store.unit_bytes(u) for u in self.units], self.dist.stages)[self.dist.stage]

    def _arrive(self, xs: list[torch.Tensor], cursors: list, m: int) -> None:
        """On a stage after the first: micro-batch m's activation and RNG state from the stage before."""
        if self.lo == 0:
            return
        pipe, (B, T) = self.dist.pipe, xs[m].shape[:2]
        xs[m] = pipe.recv((B, T, self.args.dim), self.dtype, pipe.prev, self.device.torch)
        cursors[m] = pipe.recv_rng(cursors[m], pipe.prev)

    def _pass_back(self, grads: list, m: int) -> None:
        """On a stage after the first: micro-batch m's gradient w.r.t. this stage's input, to the
        stage before (when that one trains anything below it)."""
        if self.lo > 0 and self._wants_dx(self.lo):
            self.dist.pipe.send(grads[m], self.dist.pipe.prev)
