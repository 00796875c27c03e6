"""Pipeline stages: several machines, each paging only its share of the units.

Layout. `--stages S` over W = S·D processes: rank r is stage r // D, replica r % D. Stage s
holds a contiguous range of units (stage 0 the embeddings, the last the norm and head), cut so
that the stages' stored bytes are as even as contiguity allows (`split_by_bytes`). Each rank
opens the store (shared, or its own copy) and pages only its own range: its disk reads fall
with S, and where its share fits in RAM the disk leaves the step.

Schedule (`Engine._order`). Each unit is read once per pass, as on one machine. A stage whose
units all fit in its budget keeps them resident and takes each micro-batch through all of them
before the next, passing it on at once (`Pipe.send` is asynchronous): stage s works on
micro-batch m while s+1 works on m-1, GPipe's fill and drain. A stage whose units do not fit is
block-major (every micro-batch through a unit while it is resident): then the stages overlap by
one unit only and work one after another, and what stages buy is IO, each rank reading 1/S of
the model. The time each rank waits on its neighbours is `pipeline_wait_s_by_rank` in the
metrics. Backward is the same in reverse with the gradients of the boundary activations.

Same answer. What crosses a boundary is the activation (compute dtype) and, with it, each
micro-batch's RNG state after the units before it, so every dropout mask is the one a single
process draws, whatever S and D (D enters only as data parallel does: stream m·D + replica).
The loss is summed over every rank (stages without the head add 0); gradients are all-reduced
within a stage's replica group only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from blocktune.dist.groups import collective
from blocktune.errors import ConfigError

__all__ = ["split_by_bytes", "Pipe"]


def split_by_bytes(sizes: list[int], stages: int) -> list[tuple[int, int]]:
    """Contiguous ranges [lo, hi) of the units, one per stage, minimising the largest stage's
    bytes (exact: dynamic programming over the cut points; ties go to the earliest cuts)."""
    n = len(sizes)
    if stages < 1:
        raise ConfigError(f"stages={stages}: give at least 1")
    if stages > n:
        raise ConfigError(f"stages={stages} is more than the model's {n} units (embed, blocks, head): "
                          f"give at most {n}")
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    inf = float("inf")
    # best[k][j]: the smallest possible largest stage when the first j units make k stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for j in range(k, n - (stages - k) + 1):
            for i in range(k - 1, j):
                worst = max(best[k - 1][i], prefix[j] - prefix[i])
                if worst < best[k][j]:
                    best[k][j], cut[k][j] = worst, i
    bounds, j = [], n
    for k in range(stages, 0, -1):
        i = cut[k][j]
        bounds.append((i, j))
        j = i
    return bounds[::-1]


@dataclass
class Pipe:
    """Point-to-point sends and receives to the neighbouring stages of this rank's replica."""
    prev: int | None  # global rank of the stage before (None on stage 0)
    next: int | None  # global rank of the stage after (None on the last)
    wire: torch.device  # where tensors travel from: the GPU for nccl, the CPU for gloo
    wait_seconds: float = 0.0  # time spent blocked in a receive: the pipeline's bubble
    _pending: list = field(default_factory=list)

    def send(self, t: torch.Tensor, to: int) -> None:
        import torch.distributed as dist

        buf = t.detach().to(self.wire).contiguous()
        self._pending.append((buf, collective(dist.isend, buf, to)))

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, device: torch.device) -> torch.Tensor:
        import torch.distributed as dist

        buf = torch.empty(shape, dtype=dtype, device=self.wire)
        t0 = time.perf_counter()
        collective(dist.recv, buf, src)
        self.wait_seconds += time.perf_counter() - t0
        return buf.to(device)

    def send_rng(self, state: tuple, to: int) -> None:
        """A device's RNG state (`Device.get_rng_state`: the CPU's, and the accelerator's or None)."""
        self.send(torch.cat([t.reshape(-1) for t in state if t is not None]), to)

    def recv_rng(self, like: tuple, src: int) -> tuple:
        """An RNG state shaped like `like` (this rank's own: the same device type as the sender's)."""
        n = sum(t.numel() for t in like if t is not None)
        flat = self.recv((n,), torch.uint8, src, torch.device("cpu"))
        out, at = [], 0
        for t in like:
            out.append(None if t is None else flat[at:at + t.numel()].clone())
            at += 0 if t is None else t.numel()
        return tuple(out)

    def flush(self) -> None:
        """Wait for every send to complete (their buffers are kept alive until then)."""
        for _, work in self._pending:
            collective(work.wait)
        self._pending.clear()
