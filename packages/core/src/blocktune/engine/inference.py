"""Forward-only passes of the paged model: logits, evaluation loss, and the next token's
logits with a KV cache (generation)."""

from __future__ import annotations

import torch

from blocktune.dist.groups import DistContext
from blocktune.engine.loss import check_batches, chunked_cross_entropy, count_targets
from blocktune.engine.modules import UnitModules
from blocktune.engine.stagelink import StageLink
from blocktune.model.args import ModelArgs
from blocktune.model.llama import KVCache
from blocktune.paging.pager import Pager

__all__ = ["Inference"]


class Inference:
    """Eval-mode passes without a graph over `units` (embed, blocks, head), their modules from
    `modules`; through the pipeline stages (`stage`) where `dist` has several."""

    def __init__(self, args: ModelArgs, units: list[str], modules: UnitModules, pager: Pager,
                 stage: StageLink, dist: DistContext, dtype: torch.dtype, device: torch.device,
                 loss_chunk: int):
        self.args, self.units, self.modules, self.pager = args, units, modules, pager
        self.stage, self.dist, self.dtype, self.device = stage, dist, dtype, device
        self.loss_chunk = loss_chunk

    def _forward_units(self, tokens: torch.Tensor, caches: list[KVCache] | None = None,
                       start: int = 0) -> torch.Tensor:
        """The hidden state after embed and every block (eval mode, no graph); the pager reads
        ahead through the head and, generating (`caches`), on into the next token's pass."""
        h = tokens.to(self.device)
        self.pager.plan(self.units + (self.units[:-1] if caches else []))
        for i in range(len(self.units) - 1):
            mod = self.modules.get(self.units[i], training=False)
            if i == 0:
                h = mod(h).to(self.dtype)
            else:
                h = mod(h, caches[i - 1] if caches else None, start)
            del mod  # before the next get: a module kept past its unit's eviction pins its slot
        return h

    def _head_loss(self, h: torch.Tensor, targets: torch.Tensor, n: int) -> torch.Tensor:
        head = self.modules.get("head", training=False)
        return chunked_cross_entropy(head, h, targets.to(self.device), max(n, 1),
                                     self.loss_chunk, backward=False)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits (B, T, vocab) of the whole model (materialised: for tests and short inputs)."""
        h = self._forward_units(tokens)
        return self.modules.get("head", training=False)(h)

    @torch.no_grad()
    def eval_loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
        """(mean cross-entropy, predicted positions) in eval mode, logits chunked."""
        check_batches(self.args, [(tokens, targets)])
        n = count_targets(targets)
        if self.dist.stages > 1:
            return self._staged_eval_loss(tokens, targets, n), n
        h = self._forward_units(tokens)
        return float(self._head_loss(h, targets, n)), n

    def _staged_eval_loss(self, tokens: torch.Tensor, targets: torch.Tensor, n: int) -> float:
        """eval_loss through the pipeline stages: every rank calls it; each runs its own units."""
        last, lo, hi = len(self.units) - 1, self.stage.lo, self.stage.hi
        h = tokens.to(self.device)
        if lo > 0:
            h = self.stage.receive(tuple(tokens.shape))
        self.pager.plan(self.units[lo:hi])
        for i in range(lo, min(hi, last)):
            mod = self.modules.get(self.units[i], training=False)
            h = mod(h).to(self.dtype) if i == 0 else mod(h)
            del mod
        total = torch.zeros((), device=self.device)
        if hi <= last:
            self.stage.send_on(h)
            self.stage.flush()
        else:
            total = self._head_loss(h, targets, n)
        return float(self.dist.sum_float(total)) / self.dist.dp_world  # every replica adds its copy

    def new_caches(self, batch: int, max_len: int) -> list[KVCache]:
        a = self.args
        return [KVCache(batch, max_len, a.kv_heads, a.head_dim, self.dtype, self.device)
                for _ in range(a.n_layers)]

    @torch.no_grad()
    def next_logits(self, tokens: torch.Tensor, caches: list[KVCache] | None, start: int):
        """Logits of the last position only, extending `caches` from position `start`."""
        h = self._forward_units(tokens, caches, start)
        head = self.modules.get("head", training=False)
        return head(h[:, -1:, :])[:, -1, :].float()
