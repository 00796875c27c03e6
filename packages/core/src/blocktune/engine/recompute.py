"""What a block's recompute for the backward may leave out.

A recompute needs the graph, not the output: the forward pass already passed the output on.
Past w2's product nothing in the backward reads a value (a LoRA term and the residual add,
dropout's saved mask), so while `skip_unread_product(block)` is active w2's base matmul, about a
fifth of the block's arithmetic, is skipped and the block's output is garbage that is only good
for `backward`. torch's activation checkpointing skips the same through its early stop, so the
paged engine does the in-memory reference's arithmetic. The spec (`blocktune.model.llama`) knows
nothing of this: the engine swaps w2 for a wrapper and back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from blocktune.model.llama import Block, Linear
from blocktune.model.lora import LoraLinear

__all__ = ["skip_unread_product"]


class _GradOnlyProduct(torch.autograd.Function):
    """xWᵀ for a graph whose output value is never read, only differentiated through: the
    forward skips the product (the result is uninitialised memory of the right shape) and the
    backward is F.linear's, gx = g·W and gW = gᵀ·x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight = ctx.saved_tensors
        gx = g.matmul(weight) if ctx.needs_input_grad[0] else None
        gw = (g.reshape(-1, g.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))
              if ctx.needs_input_grad[1] else None)
        return gx, gw


class _GradOnly(nn.Module):
    """`inner` (a Linear, with or without an adapter) whose base product is `_GradOnlyProduct`."""

    def __init__(self, inner: Linear):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin = self.inner
        y = _GradOnlyProduct.apply(x, lin.weight)
        if lin.bias is not None:
            y = y + lin.bias
        return lin.add_delta(x, y) if isinstance(lin, LoraLinear) else y


@contextmanager
def skip_unread_product(block: Block) -> Iterator[None]:
    ff = block.feed_forward
    w2 = ff.w2
    ff.w2 = _GradOnly(w2)
    try:
        yield
    finally:
        ff.w2 = w2
