"""Data-parallel training over torch.distributed (gloo on CPU, nccl on CUDA).

Design:
- Every rank runs the same engine over its own slice of each global batch. Rank r of W takes
  examples [(s·A + m)·W·B + r·B, … + B) for micro-batch m of step s, so W ranks at batch B see
  exactly the examples one rank sees at batch W·B.
- The loss is normalised by the token count of the whole global batch (one all-reduce of a
  scalar per step); gradients are then summed across ranks, so the update is the single-rank
  update.
- LoRA: the adapters' gradients are all-reduced once per optimizer step, as one flat buffer;
  every rank steps identically; rank 0 writes checkpoints.
- Full fine-tune: each unit's gradient is all-reduced as soon as its backward is done, before
  that unit's optimizer step; every rank pages and commits its own copy of the store
  (`--store` may contain `{rank}`), identically. When the device budget holds two units, the
  all-reduce of unit i runs while unit i-1 recomputes and back-propagates (unit i stays pinned
  until its step); with a one-unit budget it runs before the step, unoverlapped.
- Dropout: micro-batch m of rank r draws from stream (seed, step, m·W + r); with W = 1 that is
  the single-process stream, so a run and its resume agree whatever W was.
- A rank that dies closes its sockets: the others fail in their next collective (or after
  `timeout`) with a clear error instead of hanging.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from blocktune.machine.devices import Device
from blocktune.errors import ConfigError

__all__ = ["DistContext", "init_from_env", "SINGLE", "PeerLost", "collective"]

T = TypeVar("T")


class PeerLost(RuntimeError):
    """A collective, or a send or receive, with the other ranks failed: a rank died (its
    sockets closed) or stopped answering for the process group's timeout. The backend's own
    error is the cause."""


def collective(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`call(*args, **kwargs)`, a torch.distributed operation or a wait on one, its failure
    raised as `PeerLost` (running out of device memory stays what it is)."""
    try:
        return call(*args, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:
        raise PeerLost(str(err)) from err


@dataclass
class DistContext:
    """This process's place among the ranks. `rank` and `world` are global; with pipeline
    stages (`blocktune.dist.pipeline`) the world is `stages` x `dp_world` and gradients are summed
    over `group`, the ranks that hold the same stage."""
    rank: int = 0
    world: int = 1
    bytes_reduced: int = field(default=0)
    stages: int = 1
    group: Any = None  # the replica group of this rank's stage (None: the whole world)
    pipe: Any = None  # a `stages.Pipe` to the neighbouring stages (None: one stage)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_world(self) -> int:
        """Data-parallel replicas of each stage (the world, without stages)."""
        return self.world // self.stages

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp_world

    @property
    def stage(self) -> int:
        return self.rank // self.dp_world

    def stage_rank(self, stage: int) -> int:
        """The global rank that holds `stage` for this rank's replica."""
        return stage * self.dp_world + self.dp_rank

    def all_reduce_(self, tensors: list[torch.Tensor]) -> None:
        """Sum `tensors` over this stage's replicas in place, as one flat buffer (one collective)."""
        if self.dp_world == 1 or not tensors:
            return
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        collective(dist.all_reduce, flat, group=self.group)
        self.bytes_reduced += flat.numel() * flat.element_size()
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n

    def all_reduce_async(self, tensors: list[torch.Tensor]):
        """Start summing `tensors` across ranks; the returned callable waits and writes them back."""
        if self.dp_world == 1 or not tensors:
            return lambda: None
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        work = collective(dist.all_reduce, flat, group=self.group, async_op=True)
        self.bytes_reduced += flat.numel() * flat.element_size()

        def finish() -> None:
            collective(work.wait)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

        return finish

    def sum_int(self, value: int, device: Device) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device.torch)
        self.all_reduce_([t])
        return int(t.item())

    def sum_float(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over every rank (stages that do not hold the head pass 0)."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = value.detach().reshape(1).clone()
        collective(dist.all_reduce, t)
        return t.reshape(())

    def gather_ints(self, value: int, device: Device) -> list[int]:
        if not self.enabled:
            return [value]
        import torch.distributed as dist

        out = [torch.zeros(1, dtype=torch.int64, device=device.torch) for _ in range(self.world)]
        collective(dist.all_gather, out, torch.tensor([value], dtype=torch.int64, device=device.torch))
        return [int(t) for t in out]

    def gather_objects(self, value: Any) -> list:
        """Every rank's picklable `value` (tensors go through the CPU), in rank order."""
        if not self.enabled:
            return [value]
        import torch.distributed as dist

        out: list = [None] * self.world
        collective(dist.all_gather_object, out, value)
        return out

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


SINGLE = DistContext()


def init_from_env(device: Device, timeout_s: float = 300.0, stages: int = 1) -> DistContext:
    """Join the process group torchrun (or `--nproc`) described in the environment, if any;
    with `stages`, form each stage's replica group and this rank's pipe to its neighbours."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % stages:
        raise ConfigError(f"--stages {stages} must divide the number of processes ({world}): "
                          f"each stage gets world / stages data-parallel replicas")
    if world <= 1:
        return DistContext()
    import torch.distributed as dist

    from blocktune.dist.pipeline import Pipe

    device.for_local_rank()  # a GPU per process: made current before the group forms
    dist.init_process_group(device.dist_backend, timeout=datetime.timedelta(seconds=timeout_s))
    ctx = DistContext(rank=dist.get_rank(), world=dist.get_world_size(), stages=stages)
    if stages > 1:
        D = ctx.dp_world
        for s in range(stages):  # every rank forms every group, in the same order
            group = dist.new_group([s * D + d for d in range(D)])
            if s == ctx.stage:
                ctx.group = group
        wire = device.torch if device.dist_backend == "nccl" else torch.device("cpu")
        ctx.pipe = Pipe(ctx.stage_rank(ctx.stage - 1) if ctx.stage > 0 else None,
                        ctx.stage_rank(ctx.stage + 1) if ctx.stage < stages - 1 else None, wire)
    return ctx
