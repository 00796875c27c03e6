"""Optimizers that step one unit at a time, with their state paged beside the unit.

The arithmetic is torch.optim's: AdamW is torch.optim.AdamW itself run over the unit's tensors
(fused where the build has the kernel), SGD the single-tensor steps op for op, so a unit-wise
step equals the step torch.optim would take over the whole model (tested). The state of a unit is
a flat dict of tensors (``exp_avg.<key>``, ``exp_avg_sq.<key>``, ``master.<key>``, ``step``)
so that it can be written to a safetensors file next to the unit.

Master weights: when weights are stored or computed in bf16 or fp16 (an fp32 store under a
GPU's bf16 compute too), an fp32 copy of each (``master.<key>``) lives in the optimizer state,
with fp32 moments; the update is applied to the master and the weights are the master rounded
(to the store's dtype on disk, to the compute dtype resident), so updates smaller than a bf16
ulp accumulate instead of vanishing. A master starts from the stored weights (`streamed_step`'s
`stored`), not from their rounding to the compute dtype.

A unit's state is 8-12 bytes per parameter (a 7B block: 2.4 GB): more than the unit. The
paged step (`streamed_step`) never holds it whole: it reads the old state a piece at a time,
steps that piece of each tensor (AdamW is elementwise, so pieces step exactly as the whole),
and hands the new pieces to the writer as they are made. The state file is stored piece by
piece (``exp_avg.<key>#<i>``: `STATE_PIECE` elements each, every kind of piece i together),
in the order the step makes them; `whole_state` joins a file back into the flat dict.
"""

from __future__ import annotations

import torch

from blocktune.engine.config import OptimizerConfig  # torch-free, for the CLI's settings
from blocktune.machine.devices import fused_adamw

__all__ = ["OptimizerConfig", "torch_optimizer", "unit_step", "streamed_step", "state_kinds", "whole_state", "STATE_PIECE"]

STATE_PIECE = 1 << 22  # elements of each piece of a state file (16 MiB in fp32)


def torch_optimizer(cfg: OptimizerConfig, params, lr: float | None = None) -> torch.optim.Optimizer:
    """The torch.optim equivalent, for resident parameters (LoRA), the unit-wise step and
    the reference. AdamW is fused where the build has the kernel for the parameters'
    device (CPU: torch >= 2.4), single-tensor otherwise: the same arithmetic everywhere."""
    lr = cfg.lr if lr is None else lr
    params = list(params)
    if cfg.name == "adamw":
        fused = bool(params) and _fused(cfg, params[0].device)
        return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, foreach=False if not fused else None,
                                 fused=fused or None)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, foreach=False)


def _fused(cfg: OptimizerConfig, device: torch.device) -> bool:
    return cfg.name == "adamw" and fused_adamw(device.type)


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

    `storage_dtype` is the dtype the weights are kept in on disk: where it or the parameters'
    (compute) dtype is below fp32, the update goes to an fp32 master copy and the parameters
    become the master rounded to `storage_dtype` (then to their own dtype), so a result never
    depends on what stayed resident.
    State tensors are updated in place where they exist (a state read into a buffer stays its
    own next file).
    """
    state = dict(state or {})
    step = int(state["step"].item()) + 1 if "step" in state else 1
    if "step" in state:
        state["step"].fill_(float(step))
    else:
        state["step"] = torch.tensor(float(step))
    use_master = _uses_master(cfg, storage_dtype, _compute_dtype(params))
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (what is updated, its gradient)
    for key, p in params.items():
        g = grads[key]
        if use_master:
            w = state.get(f"master.{key}")
            if w is None:
                w = p.detach().to(torch.float32).clone()
            targets[key] = (w, g.to(torch.float32))
        else:
            targets[key] = (p, g)
    if cfg.name == "sgd":
        for key, (w, g) in targets.items():
            if cfg.weight_decay:
                g = g.add(w, alpha=cfg.weight_decay)
            if cfg.momentum:
                buf = state.get(f"momentum.{key}")
                buf = g.clone() if buf is None else buf.mul_(cfg.momentum).add_(g)
                state[f"momentum.{key}"] = buf
                g = buf
            w.add_(g, alpha=-lr)
    else:
        for key, (w, _) in targets.items():
            if f"exp_avg.{key}" not in state:
                state[f"exp_avg.{key}"] = torch.zeros_like(w, memory_format=torch.preserve_format)
                state[f"exp_avg_sq.{key}"] = torch.zeros_like(w, memory_format=torch.preserve_format)
        _adamw(cfg, targets, state, lr, step)
    if use_master:
        for key, (w, _) in targets.items():
            state[f"master.{key}"] = w
            params[key].copy_(w.to(storage_dtype))
    return state


def _adamw(cfg: OptimizerConfig, targets: dict[str, tuple[torch.Tensor, torch.Tensor]],
           state: dict[str, torch.Tensor], lr: float, step: int) -> None:
    """One AdamW step of `targets` with the moments in `state`, all in place: torch.optim's
    own AdamW over these tensors (fused where this build and device have the kernel, one pass
    per tensor instead of seven: 5.4 vs 22 ms for a 16x1024 block on 2 cores), so a unit-wise
    step is the step torch.optim takes over the whole model with the same settings."""
    leaves = []
    for w, g in targets.values():
        leaf = w if isinstance(w, torch.nn.Parameter) else torch.nn.Parameter(w)  # shares w's memory
        leaf.grad = g
        leaves.append(leaf)
    opt = cfg.torch_optimizer(leaves, lr=lr)
    on = leaves[0].device if leaves and _fused(cfg, leaves[0].device) else "cpu"  # where AdamW keeps its count
    for leaf, key in zip(leaves, targets):
        opt.state[leaf] = {"step": torch.tensor(float(step - 1), device=on),  # AdamW adds the 1
                           "exp_avg": state[f"exp_avg.{key}"], "exp_avg_sq": state[f"exp_avg_sq.{key}"]}
    opt.step()


def _compute_dtype(params: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype the unit computes in: its floating-point parameters' (fp32 if it has none)."""
    return next((p.dtype for p in params.values() if p.is_floating_point()), torch.float32)


def _uses_master(cfg: OptimizerConfig, storage_dtype: torch.dtype,
                 compute_dtype: torch.dtype = torch.float32) -> bool:
    """fp32 masters wherever the weights are held narrower than fp32: on disk, or resident in
    the compute dtype (an fp32 store computed in bf16 would otherwise step bf16 weights)."""
    narrow = min(storage_dtype.itemsize, compute_dtype.itemsize) < torch.float32.itemsize
    return cfg.master_dtype is not None and narrow


def state_kinds(cfg: OptimizerConfig, storage_dtype: torch.dtype,
                compute_dtype: torch.dtype = torch.float32) -> list[str]:
    """The per-parameter tensors of the optimizer's state, in their file order."""
    kinds = ["master"] if _uses_master(cfg, storage_dtype, compute_dtype) else []
    if cfg.name == "adamw":
        kinds += ["exp_avg", "exp_avg_sq"]
    elif cfg.momentum:
        kinds.append("momentum")
    return kinds


def _pieces(n: int) -> list[tuple[int, int]]:
    return [(s, min(s + STATE_PIECE, n)) for s in range(0, n, STATE_PIECE)] or [(0, 0)]


def streamed_step(
    cfg: OptimizerConfig,
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    old: dict[str, torch.Tensor] | None,
    lr: float,
    storage_dtype: torch.dtype = torch.float32,
    to_device=None,
    stored: dict[str, torch.Tensor] | None = None,
    owned: bool = False,
):
    """`unit_step` a piece at a time: returns (the new state file's tensors as
    [(key, dtype, shape)] in file order, an iterator over their data in that order).

    Iterating it steps `params` in place, piece after piece; what it holds at any moment is
    one piece of each kind, old and new. `old` is the previous state file's tensors (mapped:
    only the pieces read are in memory), pieced or whole (files written before pieces were).
    The pieces are computed on the parameters' device; `old`'s are copied there as needed
    (by `to_device`, a writable fp32 copy; default: `Tensor.to`). `stored`: the unit's weights
    as stored (mapped), where a master is first made: it starts from them, not from the
    parameters (which may be them rounded to the compute dtype). `owned`: the tensors of
    `old` and `stored` are the step's own (the last step's pieces kept in RAM, or read for it
    alone): those already fp32 on the parameters' device are stepped in place, not copied.
    """
    step = int(old["step"].item()) + 1 if old is not None and "step" in old else 1
    kinds = state_kinds(cfg, storage_dtype, _compute_dtype(params))
    spec: list[tuple[str, torch.dtype, tuple[int, ...]]] = [("step", torch.float32, ())]
    for key, p in params.items():
        for i, (s, e) in enumerate(_pieces(p.numel())):
            spec += [(f"{kind}.{key}#{i}", torch.float32, (e - s,)) for kind in kinds]

    def old_piece(kind: str, key: str, i: int, s: int, e: int, device) -> torch.Tensor | None:
        t = None if old is None else old.get(f"{kind}.{key}#{i}")
        if t is None and old is not None and f"{kind}.{key}" in old:  # a whole-tensor file
            t = old[f"{kind}.{key}"].reshape(-1)[s:e]
        if t is None and kind == "master" and stored is not None and key in stored:
            t = stored[key].reshape(-1)[s:e]  # the first master: the weights as stored
        if t is None:
            return None
        if owned and t.device == device and t.dtype == torch.float32:
            return t
        return to_device(t) if to_device is not None else t.to(device, torch.float32, copy=True)

    # a narrower gradient's piece is widened to fp32 for the masters' step into one buffer, not
    # into a fresh one a piece (under the lean heap, a mapping faulted in 4 KiB at a time: 3.4 GB
    # a step for the laptop store's bf16 gradients)
    wide: torch.Tensor | None = None

    def widened(g: torch.Tensor) -> torch.Tensor:
        nonlocal wide
        if "master" not in kinds or g.dtype == torch.float32 or not g.is_floating_point():
            return g
        if wide is None or wide.device != g.device:
            wide = torch.empty(STATE_PIECE, dtype=torch.float32, device=g.device)
        return wide[:g.numel()].copy_(g)

    def data():
        yield torch.tensor(float(step))
        for key, p in params.items():
            if not p.is_contiguous():
                raise ValueError(f"{key}: a paged optimizer step needs contiguous parameters")
            flat_p, flat_g = p.view(-1), grads[key].reshape(-1)
            for i, (s, e) in enumerate(_pieces(p.numel())):
                state = {f"{kind}.{key}": t for kind in kinds
                         if (t := old_piece(kind, key, i, s, e, p.device)) is not None}
                if step > 1:
                    state["step"] = torch.tensor(float(step - 1))
                new = unit_step(cfg, {key: flat_p[s:e]}, {key: widened(flat_g[s:e])}, state, lr, storage_dtype)
                for kind in kinds:
                    yield new[f"{kind}.{key}"]

    return spec, data()


def whole_state(flat: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A state file's tensors as `unit_step`'s flat dict: pieces joined into each parameter's
    shape (`shapes`: the unit's tensors); a whole-tensor file is returned as it is."""
    out: dict[str, torch.Tensor] = {}
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, t in flat.items():
        base, sep, index = name.rpartition("#")
        if sep and index.isdigit():
            pieces.setdefault(base, []).append((int(index), t))
        else:
            out[name] = t
    for base, parts in pieces.items():
        key = base.split(".", 1)[1]
        joined = torch.cat([t.reshape(-1) for _, t in sorted(parts, key=lambda it: it[0])])
        out[base] = joined.view(shapes[key])
    return out
