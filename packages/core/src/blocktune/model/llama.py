"""The Llama decoder, as Meta's reference code defines it, cut into pageable units.

One spec for every family blocktune reads: Llama 2 and 3.x, Mistral, Qwen2.5 and Qwen3 differ
only in fields of `ModelArgs` (q/k/v biases, q/k RMSNorms, an explicit head size, RoPE scaling,
tied embeddings), each switched on here where Hugging Face's modeling code has it.

The model is three kinds of unit: `Embed` (token embeddings), `Block` (one transformer
layer) and `Head` (final RMSNorm + output projection). `Transformer` strings them together
for in-memory use; the paged engine builds one unit at a time on the `meta` device and
maps stored tensors into it. Nothing here knows about paging, files or devices.

Parameter names inside a unit are Meta's names with the ``layers.{i}.`` prefix removed,
so a unit's state dict *is* a slice of Meta's checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from blocktune.model.args import ModelArgs
from blocktune.model.units import unit_name

__all__ = [
    "RMSNorm",
    "Linear",
    "Attention",
    "FeedForward",
    "Block",
    "Embed",
    "Head",
    "Transformer",
    "KVCache",
    "rope_tables",
]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the compute dtype, as Meta does.
        if x.dtype != torch.float32 and torch.is_grad_enabled() and x.requires_grad:
            normed = _Normed.apply(x, self.eps)
        else:
            xf = x.float()
            normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class _Normed(torch.autograd.Function):
    """x·rsqrt(mean(x²) + eps) in fp32 for an x narrower than fp32, with autograd's arithmetic
    (bit for bit), keeping x in its own dtype for the backward, which widens it again: autograd's
    graph keeps x widened (twice a bf16 block's bytes for each of its two norms). Not for an fp32
    x: there autograd keeps x itself, and sums the two gradients into x with the residual's in its
    own order, where this would sum them first."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, r)
        return xf * r

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, r = ctx.saved_tensors
        xf = x.float()
        # autograd's nodes in its order: MulBackward0 (both sides, the r side summed to its
        # shape), RsqrtBackward0, MeanBackward1, PowBackward0, and the two sums into x
        gr = (g * xf).sum(-1, keepdim=True)
        gm = (-0.5 * gr * r.pow(3)).expand_as(xf) / xf.shape[-1]
        gx = g * r + gm * (2.0 * xf)  # PowBackward0's 2·x¹: x¹ is x, exactly
        return gx.to(x.dtype), None


class Linear(nn.Module):
    """y = xWᵀ (+ b where the family has a bias). LoRA adapters and the recompute's skipped
    product are the engine's wrappers around it (`blocktune.model.lora`, `blocktune.engine.recompute`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # not on the meta device, where the paged engine builds units before mapping weights in:
        # there it does nothing but import torch._dynamo (torch's reference normal_), 1.1 s of
        # every command's start
        if not self.weight.is_meta:
            nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        return y if self.bias is None else y + self.bias


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None,
                     device=None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (head_dim // 2,), factor on cos and sin) of the rotary embedding,
    with Hugging Face's scaling rules: `linear` (position interpolation), `llama3` (Llama 3.1's
    wavelength-banded rescale) and `yarn` (NTK-by-parts, with its attention factor)."""
    exps = torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim
    inv_freq = 1.0 / (theta ** exps)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        old = scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) * ~(wavelen > old / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, factor, scaling, device)
    raise ValueError(f"rope_type {kind!r}")


def _yarn(head_dim: int, theta: float, factor: float, p: dict, device) -> tuple[torch.Tensor, float]:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = p.get("attention_factor")
    if attention is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention = mscale(factor)
    fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1
    old = p["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = correction_dim(fast), correction_dim(slow)
    if p.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - lo) / (hi - lo)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention)


_TRIG_WARM: set[str] = set()  # device types whose cos and sin have run once in this process


def _warm_trig(angles: torch.Tensor) -> None:
    """Run cos and sin once and throw the results away, the first time in a process on the CPU.

    torch 2.13's CPU cos (and sin) gets the first call in a process wrong at random: half of a
    (128, 64) fp32 result (4096 elements, one of two threads' share) came out up to 1.5e-4 off in
    12 of 30 fresh processes, and every call after that was right (2026-12-08, Intel Xeon; with one
    thread, 24 of 24 right; float64 is hit too). A paged run's first block then computed another
    forward than the rest of its run: its step-1 loss differed in 3 of 20 runs of the floor bench."""
    kind = angles.device.type
    if kind == "cpu" and kind not in _TRIG_WARM:
        angles.cos()
        angles.sin()
        _TRIG_WARM.add(kind)


def rope_tables(
    head_dim: int, positions: torch.Tensor, theta: float, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of Meta's rotary angles for `positions`, each (T, head_dim // 2), fp32."""
    inv_freq, attention = rope_frequencies(head_dim, theta, scaling, positions.device)
    angles = torch.outer(positions.float(), inv_freq)
    _warm_trig(angles)
    if attention == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * attention, angles.sin() * attention


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H, head_dim). Meta rotates interleaved pairs (x[2i], x[2i+1]) as complex numbers;
    # the same arithmetic in real form runs on every backend (MPS has no complex support).
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, head_dim/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]  # (T, 1, head_dim/2)
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache:
    """Keys and values of one block for generation: (B, max_len, n_kv_heads, head_dim)."""

    def __init__(self, batch: int, max_len: int, n_kv: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.k = torch.zeros(batch, max_len, n_kv, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[1]
        self.k[:, start:end] = k
        self.v[:, start:end] = v
        return self.k[:, :end], self.v[:, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.dropout = args.attn_dropout
        self.wq = Linear(args.dim, self.n_heads * self.head_dim, args.qkv_bias)
        self.wk = Linear(args.dim, self.n_kv * self.head_dim, args.qkv_bias)
        self.wv = Linear(args.dim, self.n_kv * self.head_dim, args.qkv_bias)
        self.wo = Linear(self.n_heads * self.head_dim, args.dim, args.o_bias)
        # Qwen3: RMSNorm over each head's q and k, before the rotation
        self.q_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                start: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start, k, v)  # (B, start+T, n_kv, head_dim)
        # grouped-query attention: each kv head serves n_heads // n_kv query heads, inside the
        # kernel (repeated here, the graph kept them n_heads wide: a third of a kept Llama 3
        # block's attention)
        gqa = self.n_kv != self.n_heads
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim); k, v n_kv heads
        p = self.dropout if self.training else 0.0
        if cache is None or start == 0:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=gqa)
        else:
            # Query i sits at position start+i and sees keys 0..start+i.
            S = k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=start)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, bias = args.hidden_dim, args.mlp_bias
        self.w1 = Linear(args.dim, h, bias)
        self.w2 = Linear(h, args.dim, bias)
        self.w3 = Linear(args.dim, h, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(_SwiGLU.apply(self.w1(x), self.w3(x)))


class _SwiGLU(torch.autograd.Function):
    """silu(a)·b with autograd's arithmetic (bit for bit), keeping a and b for the backward but
    not silu(a), which the backward remakes: autograd's silu and product would keep all three
    (a third of a kept block's activations)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a, b = ctx.saved_tensors
        gb = g * F.silu(a) if ctx.needs_input_grad[1] else None
        ga = torch.ops.aten.silu_backward(g * b, a) if ctx.needs_input_grad[0] else None
        return ga, gb


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.resid_dropout = nn.Dropout(args.resid_dropout)
        self.rope_theta, self.rope_scaling = args.rope_theta, args.rope_scaling
        self.head_dim = args.head_dim

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        # x: (B, T, dim). Rotary tables are cheap next to the block's matmuls: make them here
        # so that a block needs nothing but its input.
        pos = torch.arange(start, start + x.shape[1], device=x.device)
        cos, sin = rope_tables(self.head_dim, pos, self.rope_theta, self.rope_scaling)
        h = x + self.resid_dropout(self.attention(self.attention_norm(x), cos, sin, cache, start))
        return h + self.resid_dropout(self.feed_forward(self.ffn_norm(h)))


class Embed(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        weight = torch.empty(args.vocab_size, args.dim)
        if not weight.is_meta:  # as nn.Embedding draws it (on the meta device: see `Linear`)
            nn.init.normal_(weight)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=weight)
        self.dropout = nn.Dropout(args.embed_dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # (B, T, dim), in the stored dtype where the matrix is kept so: the caller widens it
        return self.dropout(self.tok_embeddings(tokens))


class _SlicedCastLinear(torch.autograd.Function):
    """x·Wᵀ for a weight kept in a narrower dtype than x (a frozen bf16 head under fp32
    compute): W is widened a slice of rows at a time, in the forward and again in the backward,
    so neither keeps a widened copy of it (Llama 3's head: 2.1 GB in fp32). The slices are
    widened into one buffer, reused: each fresh one cost a page fault per 4 KiB (a 7B head's
    two slices, 0.5 GB, in the forward and again in the backward)."""

    ROWS = 16384

    @staticmethod
    def _widened(weight: torch.Tensor, dtype: torch.dtype):
        """(first row, the rows from it widened to `dtype`) for each slice of `weight`."""
        rows = _SlicedCastLinear.ROWS
        room = torch.empty(min(rows, weight.shape[0]), weight.shape[1], dtype=dtype, device=weight.device)
        for s in range(0, weight.shape[0], rows):
            piece = weight[s:s + rows]
            yield s, room[:piece.shape[0]].copy_(piece)

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.cat([F.linear(x, w) for _, w in _SlicedCastLinear._widened(weight, x.dtype)], dim=-1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = sum(g[..., s:s + w.shape[0]].matmul(w) for s, w in _SlicedCastLinear._widened(weight, g.dtype))
        if ctx.needs_input_grad[1]:
            gf, xf = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
            gw = gf.t().mm(xf)
        return gx, gw


class Head(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h)
        w = self.output.weight
        if w.dtype != x.dtype:  # a frozen head kept as stored: widened slice by slice
            return _SlicedCastLinear.apply(x, w)
        return F.linear(x, w)  # (B, T, vocab)


class Transformer(nn.Module):
    """The whole model in memory: the reference the paged engine is tested against."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = Embed(args)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.head = Head(args)
        if args.tie_embeddings:  # one tensor, both uses' gradients summed into it
            self.head.output.weight = self.embed.tok_embeddings.weight

    def units(self) -> list[tuple[str, nn.Module]]:
        return [("embed", self.embed)] + [
            (unit_name(i), b) for i, b in enumerate(self.layers)
        ] + [("head", self.head)]

    def forward(self, tokens: torch.Tensor, caches: list[KVCache] | None = None, start: int = 0) -> torch.Tensor:
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, caches[i] if caches else None, start)
        return self.head(h)


def stored_shapes(args: ModelArgs, unit: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the tensors a unit's file holds, in the module's order (a tied head holds
    its norm only: its projection is the embedding matrix, stored with embed)."""
    with torch.device("meta"):
        mod = Embed(args) if unit == "embed" else Head(args) if unit == "head" else Block(args)
    shapes = {k: tuple(v.shape) for k, v in mod.state_dict().items()}
    if unit == "head" and args.tie_embeddings:
        del shapes["output.weight"]
    return shapes
