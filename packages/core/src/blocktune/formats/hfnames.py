"""Hugging Face's names and rotary layout, beside Meta's (the store's).

HF names every tensor differently and, for its rotate-half rotary layout, permutes the rows of
q and k (weights, biases, and Qwen3's per-head norms) within each head: Meta rotates
interleaved pairs (x0, x1), HF rotates the two halves of the head. `to_hf` / `from_hf` are that
permutation and its inverse. Used by the HF checkpoint format (blocktune_export.hf) and by PEFT
adapters (blocktune.formats.peft), whose lora_B rows are outputs of q_proj and k_proj.
"""

from __future__ import annotations

import re

import torch

from blocktune.errors import StoreError
from blocktune.families import hf_architectures
from blocktune.model.args import ModelArgs

__all__ = ["HF_NAMES", "HF_MODULES", "hf_key", "meta_of_hf", "to_hf", "from_hf", "rotary_heads"]

# Meta's module name (in a unit) -> HF's (in model.layers.N)
HF_MODULES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
              "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
              "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
              "feed_forward.w3": "mlp.up_proj"}
# Meta key (layers.N. removed) -> HF key (model.layers.N. removed)
HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    **{f"{m}.{p}": f"{h}.{p}" for m, h in HF_MODULES.items() for p in ("weight", "bias")},
}
_FROM_HF = {v: k for k, v in HF_NAMES.items()}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_key(meta: str) -> str:
    m = re.match(r"^layers\.(\d+)\.(.+)$", meta)
    return f"model.layers.{m.group(1)}.{HF_NAMES[m.group(2)]}" if m else HF_NAMES[meta]


def meta_of_hf(key: str, source: str = "the checkpoint") -> str:
    m = _HF_LAYER.match(key)
    try:
        return f"layers.{m.group(1)}.{_FROM_HF[m.group(2)]}" if m else _FROM_HF[key]
    except KeyError:
        raise StoreError(f"{source}: unknown Hugging Face key {key!r}; blocktune reads "
                         f"{', '.join(hf_architectures())} checkpoints") from None


def to_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta's interleaved rotary pairs -> HF's rotate-half order, within each of `heads` heads
    (the rows of a weight, the entries of a bias or a per-head norm)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def from_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rotary_heads(args: ModelArgs, local: str) -> int | None:
    """How many heads the rows of a tensor (by its key inside a unit) hold, where the rotary
    layout permutes them; None where it does not."""
    if local.startswith("attention.wq."):
        return args.n_heads
    if local.startswith("attention.wk."):
        return args.kv_heads
    if local in ("attention.q_norm.weight", "attention.k_norm.weight"):
        return 1
    return None
