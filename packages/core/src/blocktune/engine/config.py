"""The engine's settings: method, device and dtype, byte budgets, how units are read."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from blocktune.errors import ConfigError
from blocktune.model.args import LoraConfig
from blocktune.settings import AUTO

if TYPE_CHECKING:
    import torch

__all__ = ["EngineConfig", "OptimizerConfig", "FROZEN_READS", "check_frozen_reads"]


FROZEN_READS = ("auto", "mapped", "direct")


def check_frozen_reads(value: str) -> str:
    if value not in FROZEN_READS:
        raise ConfigError(f"frozen_reads={value!r}: choose {', '.join(FROZEN_READS[:-1])} or {FROZEN_READS[-1]}")
    return value


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer's settings (its arithmetic: `blocktune.engine.optim`, which torch runs; this
    module stays free of torch, so that the CLI's settings and --help start without it)."""

    name: str = "adamw"  # adamw | sgd
    lr: float = 2e-4  # the CLI's default too (RunConfig takes it from here)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only
    master_dtype: str | None = "fp32"  # fp32 master copies when storage is lower precision

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer {self.name!r} is not supported; choose adamw or sgd")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ConfigError(f"learning rate {self.lr} must be a finite number >= 0")
        object.__setattr__(self, "betas", tuple(self.betas))

    def torch_optimizer(self, params, lr: float | None = None) -> torch.optim.Optimizer:
        """The torch.optim equivalent, for resident parameters (LoRA), the unit-wise step and
        the reference (`blocktune.engine.optim.torch_optimizer`)."""
        from blocktune.engine.optim import torch_optimizer

        return torch_optimizer(self, params, lr)


@dataclass(frozen=True)
class EngineConfig:
    method: str = "lora"  # lora | full
    lora: LoraConfig | None = field(default_factory=LoraConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    device: str = "auto"
    # None: the device's default (fp32 on CPU, bf16 on GPUs); "auto": bf16 on a CPU whose bf16
    # instructions outrun fp32 (blocktune.machine.cpubf16), else the default; or fp32, bf16, fp16
    compute_dtype: str | None = None
    # Budgets in bytes (parsed: RunConfig, blocktune.settings), None (no limit) or "auto" (from the machine's free memory: blocktune.paging.budgets)
    device_budget: int | str | None = AUTO  # units resident on the device
    host_budget: int | str | None = AUTO  # unit files kept in (pinned) RAM for an accelerator;
    # on the CPU, host RAM is the device: the smaller of the two budgets bounds residency
    activation_budget: int | str | None = AUTO  # stashed block inputs in RAM before spilling
    # the batch `auto` plans for: (micro-batch size, tokens per sequence, micro-batches per step)
    batch_hint: tuple[int, int, int] = (1, 512, 1)
    loss_chunk: int | None = None  # positions per chunk of the cross-entropy (None: `loss.loss_chunk`'s)
    seed: int = 0
    replay_rng: bool = True  # off only to prove the replay test can fail
    prefetch: bool = True
    verify: str = "once"  # crc32 of each file version: "always" on every read, "once" per process, "never"
    read_only: bool = False  # inference only (generate, eval): units are never written
    lean_memory: bool = False  # return freed host memory to the OS between units (slower; less RSS)
    max_dirty: int | None = 512 << 20  # full fine-tune: written-but-unsynced bytes before an early fsync
    # Bytes of autograd activations kept from the first forward instead of recomputing the
    # unit in the backward (weights in the graph become handles the pager resolves).
    # 0: always recompute; None: keep every unit's; "auto": what RAM holds beside every unit
    # resident (blocktune.paging.budgets). Units past the budget are recomputed.
    keep_budget: int | str | None = 0
    # Disk for the activations of units past keep_budget (CPU): written in the forward and read
    # back for the backward instead of recomputed (blocktune.paging.spill). 0: recompute them;
    # None: no limit but the disk's; "auto": what they need (at most half the disk's free space).
    spill_budget: int | str | None = 0
    # CPU, frozen units (LoRA, inference): "mapped" reads them through the page cache, "direct"
    # with O_DIRECT into reused buffers (for a store bigger than RAM); "auto" picks direct when
    # the store is more than 80% of the memory available (MemAvailable, or a cgroup's limit).
    frozen_reads: str = "auto"
    # CPU, frozen units paged through RAM from a store wider than the compute dtype (an fp32 store
    # computed in bf16): a copy narrowed to the compute dtype, made once beside the store and
    # removed at `close`, is read instead (half the bytes, no conversion at every read)
    narrow_frozen: bool = False
    # CPU, a full fine-tune paged through RAM from a store wider than the compute dtype (fp32
    # masters computed in bf16): the units are read from such a copy, which each step's
    # write-back keeps up to date beside the store (the step's parameters, written as well)
    narrow_steps: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise ConfigError(f"method {self.method!r} is not supported; choose lora or full")
        if self.method == "lora" and self.lora is None:
            raise ConfigError("method 'lora' needs a LoRA configuration")
        check_frozen_reads(self.frozen_reads)
        for name in ("device_budget", "host_budget", "activation_budget", "keep_budget", "spill_budget"):
            value = getattr(self, name)
            if not (value is None or value == AUTO
                    or isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ConfigError(f"{name}={value!r}: give bytes (an int: blocktune.settings.parse_bytes reads "
                                  "'2GiB'), None for no limit, or 'auto'")
        if self.loss_chunk is not None and self.loss_chunk <= 0:
            raise ConfigError(f"loss_chunk={self.loss_chunk} must be positive")
