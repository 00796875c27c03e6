"""The chunked training loss: autograd's cross-entropy, bit for bit, in fewer vocabulary-wide buffers."""

import pytest
import torch
import torch.nn.functional as F
from blocktune.engine.loss import IGNORE_INDEX, chunked_cross_entropy
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


class _NewBuffers(TorchDispatchMode):
    """Counts the operators' outputs of `nbytes` that are new storage (not written over an input)."""

    def __init__(self, nbytes: int):
        super().__init__()
        self.nbytes, self.count = nbytes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {a.untyped_storage().data_ptr() for a in [*args, *(kwargs or {}).values()] if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() == self.nbytes \
                    and t.untyped_storage().data_ptr() not in ins:
                self.count += 1
        return out


@pytest.mark.parametrize("trainable", [False, True])
def test_chunked_loss_is_cross_entropy_in_two_buffers_per_chunk(trainable):
    torch.manual_seed(0)
    n, dim, vocab, chunk = 40, 24, 300, 16
    head = nn.Linear(dim, vocab, bias=False).requires_grad_(trainable)
    h0 = torch.randn(n, dim)
    t = torch.randint(0, vocab, (n,))
    t[3] = t[20:36] = IGNORE_INDEX  # a masked position, and a whole chunk masked (skipped)

    def run(loss_fn):
        head.zero_grad(set_to_none=True)
        h = h0.clone().requires_grad_(True)
        with _NewBuffers(chunk * vocab * 4) as count:
            loss = loss_fn(h)
        return [loss, h.grad] + ([head.weight.grad] if trainable else []), count.count

    def plain(h):  # autograd's graph, chunk by chunk, as the loss was first written
        total = torch.zeros(())
        for s in range(0, n, chunk):
            if (t[s:s + chunk] != IGNORE_INDEX).any():
                loss = F.cross_entropy(head(h[s:s + chunk]), t[s:s + chunk], ignore_index=IGNORE_INDEX,
                                       reduction="sum") / 37
                loss.backward()
                total += loss.detach()
        return total

    mine, new_mine = run(lambda h: chunked_cross_entropy(head, h, t, 37, chunk, True))
    ref, new_ref = run(plain)
    assert all(torch.equal(a, b) for a, b in zip(mine, ref))
    assert new_ref == 4 * 2  # two chunks of logits, log-softmax, its gradient, the logits' gradient
    assert new_mine == 2 * 2  # two chunks of logits and one gradient
    no_grad, _ = run(lambda h: chunked_cross_entropy(head, h, t, 37, chunk, False))
    assert torch.equal(no_grad[0], mine[0])
