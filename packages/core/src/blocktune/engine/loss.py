"""The training loss: cross-entropy over next tokens, IGNORE_INDEX where no loss is taken
(padding, prompts of chat rows), computed a chunk of positions at a time so that the whole
vocabulary's logits never exist at once; and the checks a batch passes first."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blocktune.errors import ConfigError
from blocktune.model.args import ModelArgs

__all__ = ["IGNORE_INDEX", "chunked_cross_entropy", "logit_buffers", "count_targets", "check_window", "check_batches",
           "loss_chunk"]

IGNORE_INDEX = -100
CHUNK_LOGITS = 32 << 20  # bytes of one chunk's fp32 logits, by default


def loss_chunk(vocab_size: int, asked: int | None = None, head_trains: bool = False) -> int:
    """Positions per chunk of the loss: `asked`, or where the head is frozen (LoRA, inference) as
    many as keep one chunk's fp32 logits within 32 MiB, in multiples of 64 from 128 to 2048
    (SmolLM2's 49,152 words 128 positions, Llama 2's 32,000 256, Llama 3's 128,256 128). The
    loss's buffers are held while every kept block's activations are (the forward is over, its
    backward not begun), so they add to the step's peak: SmolLM2's LoRA step at 4 x 256 peaked at
    2.38 GB with 2048 positions against 2.08 GB with 256, at the same speed; in bf16, 1.64-1.65 GB
    with 128 against 1.71-1.75 GB with 320, within this machine's noise of the same speed. A head that trains
    (a full fine-tune) keeps 2048: its weight's gradient is summed over the chunks, a vocab x dim
    product and add each (Llama 3's head: 2.1 GB in fp32)."""
    if asked is not None:
        return asked
    if head_trains:
        return 2048
    return max(128, min(2048, CHUNK_LOGITS // (4 * vocab_size) // 64 * 64))


def writes_in_place(device_type: str) -> bool:
    """Whether the loss writes a chunk's log-softmax and its gradient over the buffers they come
    from (`_chunk_loss_in_place`): on the CPU, whose kernels finish reading a row before writing it."""
    return device_type == "cpu"


def logit_buffers(device_type: str) -> int:
    """How many fp32 tensors of one chunk's logits (chunk x vocab) the loss holds at once, beyond
    the head's own output in the compute dtype: two where it writes in place, three elsewhere (the
    log-softmax, its gradient and the logits' gradient; the logits go once their log-softmax is
    made). What `working_set` counts."""
    return 2 if writes_in_place(device_type) else 3


def chunked_cross_entropy(
    head: nn.Module, h: torch.Tensor, targets: torch.Tensor, denom: int, chunk: int,
    backward: bool,
) -> torch.Tensor:
    """Σ cross-entropy / denom over (B, T) positions, `chunk` positions of logits at a time.

    With `backward`, each chunk's gradient is accumulated into h.grad and the head's
    parameters right away, so only one chunk's logits exist at any moment.
    """
    flat_h = h.reshape(-1, h.shape[-1])
    flat_t = targets.reshape(-1)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, flat_t.numel(), chunk):
        t = flat_t[s:s + chunk]
        if not bool((t != IGNORE_INDEX).any()):  # note: a host sync; skips masked chunks
            continue
        logits = head(flat_h[s:s + chunk]).float()
        if writes_in_place(logits.device.type):
            total += _chunk_loss_in_place(logits, t, denom, backward)
            continue
        loss = F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum") / denom
        del logits  # nothing saves them: they go once their log-softmax is made
        if backward:
            loss.backward()
        total += loss.detach()
    return total


def _chunk_loss_in_place(logits: torch.Tensor, t: torch.Tensor, denom: int, backward: bool) -> torch.Tensor:
    """F.cross_entropy(logits, t, reduction="sum") / denom and, with `backward`, its backward
    from `logits` on: the kernels autograd runs, bit for bit, but the log-softmax is written over
    the logits and its gradient over the loss's, so a chunk holds two (chunk x vocab) buffers,
    not four (0.4 GB of SmolLM2's 49k vocabulary at 1,024 positions). On the CPU, whose kernels
    finish reading a row before writing it."""
    with torch.no_grad():
        lsm = logits.detach()  # nothing saves the logits (a linear saves its input): free to overwrite
        torch._log_softmax(lsm, -1, False, out=lsm)
        loss, total_weight = torch.ops.aten.nll_loss_forward(lsm, t, None, 2, IGNORE_INDEX)  # 2: sum
        loss = loss / denom
        if not backward:
            return loss
        grad = torch.ops.aten.nll_loss_backward(torch.ones((), device=lsm.device) / denom, lsm, t, None, 2,
                                                IGNORE_INDEX, total_weight)
        torch._log_softmax_backward_data(grad, lsm, -1, lsm.dtype, out=grad)
        del lsm
    logits.backward(grad)
    return loss


def check_window(args: ModelArgs, length: int) -> None:
    """Attention here spans the whole sequence: past a sliding window that is a different model."""
    if args.sliding_window is not None and length > args.sliding_window:
        raise ConfigError(f"sequence length {length} exceeds the model's sliding_window "
                          f"{args.sliding_window} (config.json); blocktune attends to the whole "
                          f"sequence, so keep --seq-len (and prompt + new tokens) within {args.sliding_window}")


def count_targets(targets: torch.Tensor) -> int:
    return int((targets != IGNORE_INDEX).sum())


def check_batches(args: ModelArgs, batches) -> None:
    """(tokens, targets) pairs: both (batch, seq_len), no longer than the model and its window allow."""
    for tok, tgt in batches:
        if tok.shape != tgt.shape or tok.dim() != 2:
            raise ConfigError(f"tokens {tuple(tok.shape)} and targets {tuple(tgt.shape)} "
                              "must both be (batch, seq_len)")
        if tok.shape[1] > args.max_seq_len:
            raise ConfigError(f"sequence length {tok.shape[1]} exceeds the model's "
                              f"max_seq_len {args.max_seq_len}; lower --seq-len")
        check_window(args, tok.shape[1])
