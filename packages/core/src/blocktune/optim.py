"""Optimizers that step one unit at a time, with their state paged beside the unit.

The arithmetic is torch.optim's single-tensor AdamW and SGD, op for op, so a unit-wise step
equals the step torch.optim would take over the whole model (tested). The state of a unit is
a flat dict of tensors (``exp_avg.<key>``, ``exp_avg_sq.<key>``, ``master.<key>``, ``step``)
so that it can be written to a safetensors file next to the unit.

Master weights: when weights are stored in bf16 or fp16, an fp32 copy of each (``master.<key>``)
lives in the optimizer state; the update is applied to the master and the stored weight is
the master rounded, so updates smaller than a bf16 ulp accumulate instead of vanishing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ConfigError

__all__ = ["OptimizerConfig", "unit_step"]


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-4
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
        """The torch.optim equivalent, for resident parameters (LoRA) and the reference."""
        lr = self.lr if lr is None else lr
        if self.name == "adamw":
            return torch.optim.AdamW(params, lr=lr, betas=self.betas, eps=self.eps,
                                     weight_decay=self.weight_decay, foreach=False)
        return torch.optim.SGD(params, lr=lr, momentum=self.momentum,
                               weight_decay=self.weight_decay, foreach=False)


@torch.no_grad()
def unit_step(
    cfg: OptimizerConfig,
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor] | None,
    lr: float,
    storage_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Update `params` in place from `grads`; return the new state (a flat tensor dict).

    `storage_dtype` is the dtype the weights are kept in on disk: below fp32, the update goes
    to an fp32 master copy and the parameters become the master rounded to `storage_dtype`,
    whatever dtype they compute in, so a result never depends on what stayed resident.
    """
    state = dict(state or {})
    step = int(state["step"].item()) + 1 if "step" in state else 1
    if "step" in state:  # in place: the state read into a buffer stays its own next file
        state["step"].fill_(float(step))
    else:
        state["step"] = torch.tensor(float(step))
    for key, p in params.items():
        g = grads[key]
        use_master = cfg.master_dtype is not None and storage_dtype != torch.float32
        if use_master:
            w = state.get(f"master.{key}")
            if w is None:
                w = p.detach().to(torch.float32).clone()
            g = g.to(torch.float32)
        else:
            w = p
        if cfg.name == "sgd":
            if cfg.weight_decay:
                g = g.add(w, alpha=cfg.weight_decay)
            if cfg.momentum:
                buf = state.get(f"momentum.{key}")
                buf = g.clone() if buf is None else buf.mul_(cfg.momentum).add_(g)
                state[f"momentum.{key}"] = buf
                g = buf
            w.add_(g, alpha=-lr)
        else:
            b1, b2 = cfg.betas
            m = state.get(f"exp_avg.{key}")
            v = state.get(f"exp_avg_sq.{key}")
            if m is None:
                m = torch.zeros_like(w, memory_format=torch.preserve_format)
                v = torch.zeros_like(w, memory_format=torch.preserve_format)
            w.mul_(1 - lr * cfg.weight_decay)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            bias1 = 1 - b1**step
            bias2_sqrt = (1 - b2**step) ** 0.5
            denom = (v.sqrt() / bias2_sqrt).add_(cfg.eps)
            w.addcdiv_(m, denom, value=-(lr / bias1))
            state[f"exp_avg.{key}"], state[f"exp_avg_sq.{key}"] = m, v
        if use_master:
            state[f"master.{key}"] = w
            p.copy_(w.to(storage_dtype))
    return state
