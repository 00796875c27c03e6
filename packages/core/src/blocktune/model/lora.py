"""The trainable LoRA matrices of a paged model, apart from the frozen units they adapt.

`LoraLinear` adds an adapter to one of the spec's `Linear`s, y = xWᵀ + b + s·(drop(x)Aᵀ)Bᵀ,
and `add_lora` puts one on every targeted linear of a module, as peft injects its layers (the
base weight keeps its name, the matrices are `<linear>.lora_a` / `.lora_b`).

`LoraAdapters` draws every block's A and B as peft draws them (A kaiming-uniform from one
generator, blocks in order; B zero), on a meta-device template (the base weights are never
made), keeps them in fp32 whatever the compute dtype (as peft does: a bf16 adapter and its AdamW
state would round away updates below its 8-bit mantissa), names them as the whole model's
modules (`layers.3.attention.wq.lora_a`), and loads a given set with clear errors. The engine
merges a block's matrices into the module it builds for that block; files are
`blocktune.formats.adapters`' business.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from blocktune.dist.groups import DistContext
from blocktune.engine.optim import OptimizerConfig
from blocktune.errors import StoreError
from blocktune.model.args import LoraConfig, ModelArgs
from blocktune.model.llama import Block, Linear
from blocktune.model.units import unit_prefix

__all__ = ["LoraLinear", "add_lora", "init_lora_", "LoraAdapters"]


class LoraLinear(Linear):
    """A spec `Linear` (the same weight and bias parameters) with a LoRA adapter beside it."""

    def __init__(self, base: Linear, lora: LoraConfig):
        nn.Module.__init__(self)
        self.weight, self.bias = base.weight, base.bias
        out_features, in_features = base.weight.shape
        dev = base.weight.device
        self.lora_a = nn.Parameter(torch.zeros(lora.rank, in_features, device=dev))
        self.lora_b = nn.Parameter(torch.zeros(out_features, lora.rank, device=dev))
        self.scale = lora.scale
        self.lora_dropout = nn.Dropout(lora.dropout)

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y plus the adapter's term for input x (in the adapters' dtype: fp32 beside bf16 compute)."""
        a, b = self.lora_a, self.lora_b
        if x.device.type == "cpu" and torch.is_grad_enabled():
            p = self.lora_dropout.p if self.lora_dropout.training else 0.0
            return y + _LoraTerm.apply(x, a, b, self.scale, p)
        if a.dtype != x.dtype:
            return y + (F.linear(F.linear(self.lora_dropout(x).to(a.dtype), a), b) * self.scale).to(y.dtype)
        return y + F.linear(F.linear(self.lora_dropout(x), a), b) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_delta(x, super().forward(x))


class _LoraTerm(torch.autograd.Function):
    """s·(drop(x)Aᵀ)Bᵀ on the CPU, with autograd's arithmetic (bit for bit) but less kept for
    the backward. torch's CPU dropout multiplies by a noise tensor of x's dtype, and autograd
    keeps it and the dropped input (fp32 beside bf16 compute, where the adapters are fp32:
    3 x 2 bytes per element of x, per adapter); this keeps x, which the adapters of wq, wk and
    wv share, and the noise as a mask of one byte per element, from which the backward makes
    the same noise again (its temporaries allocated between kept tensors had also left the heap
    a hole per adapter that the next block could not reuse). Not drawn again: the CPU's
    generator fills about 170 M elements a second, and drawing every mask twice cost a SmolLM2
    LoRA step (4 x 256) a fifth of its time. With fp32 adapters beside a bf16 x, the dropped
    input is widened to fp32 in the forward and again in the backward, and the term narrowed
    back to x's dtype, as autograd's graph of `(drop(x).float() @ Aᵀ @ Bᵀ · s).to(x.dtype)` does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, p: float) -> torch.Tensor:
        ctx.scale, ctx.p = scale, p
        xd, mask = x, None
        if p > 0:  # torch's CPU dropout: x * (bernoulli(1 - p) / (1 - p)), the same draws
            noise = _noise(x, p)
            mask = noise.bool()
            xd = noise.mul_(x)
        h = F.linear(xd.to(a.dtype), a)
        del xd
        ctx.save_for_backward(x, a, b, h, mask)
        return F.linear(h, b).mul_(scale).to(x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, a, b, h, mask = ctx.saved_tensors
        noise = None if mask is None else mask.to(x.dtype).div_(1 - ctx.p)  # the forward's values
        # the same products as the graph's MmBackwards, in the adapters' dtype
        g = (g.to(a.dtype) * ctx.scale).reshape(-1, g.shape[-1])
        gh = g.mm(b)
        gb = g.t().mm(h.reshape(-1, h.shape[-1])) if ctx.needs_input_grad[2] else None
        ga = None
        if ctx.needs_input_grad[1]:
            xd = (x if noise is None else x * noise).to(a.dtype)
            ga = gh.t().mm(xd.reshape(-1, xd.shape[-1]))
        gx = None
        if ctx.needs_input_grad[0]:
            gx = gh.mm(a).view(x.shape).to(x.dtype)
            if noise is not None:
                gx = gx.mul_(noise)
        return gx, ga, gb, None, None


def _noise(x: torch.Tensor, p: float) -> torch.Tensor:
    """torch's CPU dropout noise for x, from the default generator: bernoulli(1 - p) / (1 - p)."""
    return torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)


def add_lora(module: nn.Module, lora: LoraConfig) -> nn.Module:
    """Replace, in place, every `Linear` named in `lora.targets` (wq, w2, ...) by a `LoraLinear`
    around it; returns `module`. Module order is kept (initialisation draws in that order)."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if name in lora.targets and type(child) is Linear:
                setattr(parent, name, LoraLinear(child, lora))
    return module


def _draw_a_(a: torch.Tensor, generator: torch.Generator | None) -> None:
    bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform with a=sqrt(5)
    with torch.no_grad():
        a.uniform_(-bound, bound, generator=generator)


def init_lora_(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """PEFT's initialisation: A ~ kaiming-uniform(a=√5), B = 0, so training starts at the base model."""
    for m in module.modules():
        if isinstance(m, LoraLinear):
            _draw_a_(m.lora_a, generator)
            with torch.no_grad():
                m.lora_b.zero_()


class LoraAdapters:
    def __init__(self, args: ModelArgs, lora: LoraConfig, blocks: list[str], device: torch.device, seed: int,
                 given: dict[str, torch.Tensor] | None = None, optimizer: OptimizerConfig | None = None,
                 keep: list[str] | None = None):
        """`keep`: the blocks this process trains (a pipeline stage's), of `blocks`, all of
        which are drawn so that a stage's adapters are the single process's."""
        keep = list(blocks) if keep is None else list(keep)
        self.blocks = [b for b in blocks if b in keep]
        self.others = [b for b in blocks if b not in keep]
        self.opt_cfg, self.device = optimizer or OptimizerConfig(), device
        self._opt: torch.optim.Optimizer | None = None
        gen = torch.Generator().manual_seed(seed)
        with torch.device("meta"):  # only the adapters' shapes: the base weights are never made
            template = Block(args)
        shapes = {f"{name}.lora_{ab}": shape
                  for name, m in template.named_modules() if name.rsplit(".", 1)[-1] in lora.targets
                  for ab, shape in (("a", (lora.rank, m.weight.shape[1])), ("b", (m.weight.shape[0], lora.rank)))}
        self.by_unit: dict[str, dict[str, nn.Parameter]] = {}
        # where this process's matrices start in the whole model's (the optimizer's) order
        self.offset = len(shapes) * blocks.index(self.blocks[0]) if self.blocks else 0
        for unit in blocks:
            drawn = {}
            for key, shape in shapes.items():  # module order, A then B: init_lora_'s draws
                t = torch.zeros(shape, dtype=torch.float32)
                if key.endswith("lora_a"):
                    _draw_a_(t, gen)
                drawn[key] = nn.Parameter(t.to(device))
            if unit in keep:
                self.by_unit[unit] = drawn
        if given is not None:
            self.load(given)

    def of(self, unit: str) -> dict[str, nn.Parameter]:
        """One block's matrices, keyed as inside the block (`attention.wq.lora_a`)."""
        return self.by_unit.get(unit, {})

    def state(self) -> dict[str, torch.Tensor]:
        """Every matrix, keyed by the whole model's names (`layers.3.attention.wq.lora_a`)."""
        return {f"{unit_prefix(u)}{k}": p.detach() for u, d in self.by_unit.items() for k, p in d.items()}

    def load(self, flat: dict[str, torch.Tensor]) -> None:
        """Set every matrix from `flat` (whole-model names; a stage takes its own blocks')."""
        mine = self.state()
        others = tuple(unit_prefix(u) for u in self.others)  # another stage's blocks
        if others:
            flat = {k: v for k, v in flat.items() if not k.startswith(others)}
        if set(flat) != set(mine):
            extra, missing = sorted(set(flat) - set(mine))[:3], sorted(set(mine) - set(flat))[:3]
            raise StoreError(f"adapter keys do not match this model and LoRA config "
                             f"(unexpected {extra}, missing {missing})")
        for name, t in flat.items():
            if t.shape != mine[name].shape:
                raise StoreError(f"adapter {name}: shape {tuple(t.shape)} != expected "
                                 f"{tuple(mine[name].shape)} (LoRA rank or model differs)")
        with torch.no_grad():
            for u, d in self.by_unit.items():
                for k, p in d.items():
                    p.copy_(flat[f"{unit_prefix(u)}{k}"])

    def params(self) -> list[nn.Parameter]:
        """In block order (the optimizer's, and the flat all-reduce's, order)."""
        return [p for u in self.blocks for p in self.by_unit[u].values()]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._opt is None:
            self._opt = self.opt_cfg.torch_optimizer(self.params())
        return self._opt

    def step(self, lr: float, max_grad_norm: float | None, dist: DistContext) -> None:
        """One optimizer step over every adapter: gradients summed over the ranks first (one flat
        all-reduce), clipped to `max_grad_norm` by their global norm if given."""
        params = self.params()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        dist.all_reduce_([p.grad for p in params])
        if max_grad_norm and dist.stages > 1:  # the global norm: every stage's share of it
            sq = torch.stack([torch.linalg.vector_norm(p.grad) for p in params]).square().sum() if params \
                else torch.zeros((), device=self.device)
            total = dist.sum_float(sq).div(dist.dp_world).sqrt()  # replicas hold equal gradients
            coef = torch.clamp(max_grad_norm / (total + 1e-6), max=1.0)
            for p in params:
                p.grad.mul_(coef)
        elif max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=False)
        if not params:  # a pipeline stage without blocks (embed or head only): nothing to step
            return
        self.optimizer.param_groups[0]["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state(self) -> dict:
        """The optimizer's state_dict (an empty one for a stage without blocks)."""
        if not self.blocks:
            return {"state": {}, "param_groups": [{"params": []}]}
        return self.optimizer.state_dict()
