"""Forward-only passes of the paged model: logits, evaluation loss, and the next token's
logits with a KV cache (generation). Mixed into `Engine`, whose pager and modules they use."""

from __future__ import annotations

import torch

from blocktune.engine.loss import chunked_cross_entropy, count_targets
from blocktune.model.llama import KVCache

__all__ = ["Inference"]


class Inference:
    def _forward_units(self, tokens: torch.Tensor, caches: list[KVCache] | None = None,
                       start: int = 0) -> torch.Tensor:
        """The hidden state after embed and every block (eval mode, no graph); the pager reads
        ahead through the head and, generating (`caches`), on into the next token's pass."""
        h = tokens.to(self.device.torch)
        self.pager.plan(self.units + (self.units[:-1] if caches else []))
        for i in range(len(self.units) - 1):
            mod = self._module(self.units[i], training=False)
            if i == 0:
                h = mod(h).to(self.dtype)
            else:
                h = mod(h, caches[i - 1] if caches else None, start)
            del mod  # before the next get: a module kept past its unit's eviction pins its slot
        return h

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits (B, T, vocab) of the whole model (materialised: for tests and short inputs)."""
        h = self._forward_units(tokens)
        return self._module("head", training=False)(h)

    @torch.no_grad()
    def eval_loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
        """(mean cross-entropy, predicted positions) in eval mode, logits chunked."""
        self._check_lengths([(tokens, targets)])
        n = count_targets(targets)
        if self.dist.stages > 1:
            return self._staged_eval_loss(tokens, targets, n), n
        h = self._forward_units(tokens)
        head = self._module("head", training=False)
        total = chunked_cross_entropy(head, h, targets.to(self.device.torch), max(n, 1),
                                      self.cfg.loss_chunk, backward=False)
        return float(total), n

    def _staged_eval_loss(self, tokens: torch.Tensor, targets: torch.Tensor, n: int) -> float:
        """eval_loss through the pipeline stages: every rank calls it; each runs its own units."""
        last, pipe = len(self.units) - 1, self.dist.pipe
        h = tokens.to(self.device.torch)
        shape = tuple(tokens.shape) + (self.args.dim,)
        if self.lo > 0:
            h = pipe.recv(shape, self.dtype, pipe.prev, self.device.torch)
        self.pager.plan(self.units[self.lo:self.hi])
        for i in range(self.lo, min(self.hi, last)):
            mod = self._module(self.units[i], training=False)
            h = mod(h).to(self.dtype) if i == 0 else mod(h)
            del mod
        total = torch.zeros((), device=self.device.torch)
        if self.hi <= last:
            pipe.send(h, pipe.next)
            pipe.flush()
        else:
            head = self._module("head", training=False)
            total = chunked_cross_entropy(head, h, targets.to(self.device.torch), max(n, 1),
                                          self.cfg.loss_chunk, backward=False)
        return float(self.dist.sum_float(total)) / self.dist.dp_world  # every replica adds its copy

    def new_caches(self, batch: int, max_len: int) -> list[KVCache]:
        a = self.args
        return [KVCache(batch, max_len, a.kv_heads, a.head_dim, self.dtype, self.device.torch)
                for _ in range(a.n_layers)]

    @torch.no_grad()
    def next_logits(self, tokens: torch.Tensor, caches: list[KVCache] | None, start: int):
        """Logits of the last position only, extending `caches` from position `start`."""
        h = self._forward_units(tokens, caches, start)
        head = self._module("head", training=False)
        return head(h[:, -1:, :])[:, -1, :].float()
