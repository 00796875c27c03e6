"""The model's shape and its LoRA adapters' settings, as typed dataclasses.

`ModelArgs` is one decoder for every supported family (Llama 2 and 3.x, Mistral, Qwen2.5,
Qwen3): the families differ only in fields of it (grouped-query heads, an explicit head size,
q/k/v biases, q/k norms, RoPE scaling, tied embeddings, a sliding window). Meta's
``params.json`` is read and written by `blocktune.formats.meta` (``ModelArgs.from_params`` and
friends hand over to it); Hugging Face's ``config.json`` by `blocktune_export.hf`. Fields
neither format has (dropout, LoRA) carry defaults and are written only to our own manifest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blocktune.errors import ConfigError
from blocktune.families import ARGS_FIELDS

__all__ = ["ModelArgs", "LoraConfig", "PRESETS", "LORA_TARGETS", "ROPE_TYPES", "lora_targets"]

# RoPE scaling types and the parameters each needs (Hugging Face's names)
ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}
_ROPE_OPTIONAL = {"yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                           "truncate")}

@dataclass(frozen=True)
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: plain multi-head attention (Llama-2 7B, 13B)
    vocab_size: int = 32000
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096  # Llama 2's context; CodeLlama: 16384
    # Dropout is not in Meta's params.json: Llama 2 was trained without it, fine-tunes may add it.
    embed_dropout: float = 0.0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    # ---- the fields that make the other families (defaults: Llama 2) ----
    explicit_head_dim: int | None = None  # Qwen3: not dim // n_heads (q_proj is dim -> heads·head_dim)
    ffn_dim: int | None = None  # the SwiGLU width as given (HF's intermediate_size); None: Meta's rule
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3", "factor": 8.0, ...}
    qkv_bias: bool = False  # Qwen2: biases on q/k/v
    o_bias: bool = False  # Llama's attention_bias puts one on o too
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k, before RoPE
    tie_embeddings: bool = False  # the head's projection is the embedding matrix (one tensor)
    sliding_window: int | None = None  # attention span, where a layer has one (Mistral v0.1)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # generation stops at any of these (and the tokenizer's)
    family: str = "llama"  # the architecture it came as: llama, mistral, qwen2, qwen3

    def __post_init__(self) -> None:
        problems = []
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name}={value!r} must be a positive integer")
        if not problems:
            if self.dim % self.n_heads and self.explicit_head_dim is None:
                problems.append(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
            elif self.head_dim % 2:
                problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
            if self.n_kv_heads is not None and (
                self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads
            ):
                problems.append(
                    f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}"
                )
        for name in ("embed_dropout", "attn_dropout", "resid_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                problems.append(f"{name}={p} must be in [0, 1)")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            problems.append("norm_eps and rope_theta must be positive")
        for name in ("explicit_head_dim", "ffn_dim", "sliding_window"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                problems.append(f"{name}={value!r} must be a positive integer or None")
        if self.explicit_head_dim is not None and self.explicit_head_dim % 2:
            problems.append(f"head_dim={self.explicit_head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None:
            problems += _rope_problems(self.rope_scaling)
        if problems:
            raise ConfigError("invalid model arguments: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width: as given, or computed exactly as Meta's FeedForward does."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def with_dropout(self, p: float) -> ModelArgs:
        return dataclasses.replace(self, embed_dropout=p, attn_dropout=p, resid_dropout=p)

    def replace(self, **changes: Any) -> ModelArgs:
        return dataclasses.replace(self, **changes)

    # ---- parameter counts (used for budgets and bench reports) ----
    def block_params(self) -> int:
        q, kv = self.n_heads * self.head_dim, self.kv_heads * self.head_dim
        attn = self.dim * q * 2 + self.dim * kv * 2
        attn += (q + 2 * kv) * self.qkv_bias + self.dim * self.o_bias + 2 * self.head_dim * self.qk_norm
        ffn = 3 * self.dim * self.hidden_dim + (2 * self.hidden_dim + self.dim) * self.mlp_bias
        return attn + ffn + 2 * self.dim

    def n_params(self) -> int:
        embeddings = (1 if self.tie_embeddings else 2) * self.vocab_size * self.dim
        return embeddings + self.n_layers * self.block_params() + self.dim

    # ---- Meta's params.json: read and written by blocktune.formats.meta ----
    @classmethod
    def from_params(cls, params: dict[str, Any], *, source: str = "params.json") -> ModelArgs:
        from blocktune.formats import meta  # the format builds on this class

        return meta.from_params(params, source=source)

    @staticmethod
    def read_json(path: str | Path) -> dict[str, Any]:
        from blocktune.formats import meta

        return meta.read_json(path)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelArgs:
        from blocktune.formats import meta

        return meta.from_file(path)

    def to_params(self) -> dict[str, Any]:
        from blocktune.formats import meta

        return meta.to_params(self)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's record: every field, the family fields only where they differ from
        Llama 2's defaults (so a Llama-2 store's manifest reads as it always did)."""
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        for f in dataclasses.fields(self):
            if f.name in ARGS_FIELDS and out[f.name] == (list(f.default) if isinstance(f.default, tuple) else f.default):
                del out[f.name]
        return out


def _rope_problems(scaling: dict[str, Any]) -> list[str]:
    kind = scaling.get("rope_type")
    if kind not in ROPE_TYPES:
        return [f"rope_type {kind!r} is not supported (supported: {sorted(ROPE_TYPES)})"]
    need = ROPE_TYPES[kind]
    missing = [k for k in need if scaling.get(k) is None]
    unknown = sorted(set(scaling) - set(need) - set(_ROPE_OPTIONAL.get(kind, ())) - {"rope_type"})
    out = []
    if missing:
        out.append(f"rope_type {kind!r} needs {missing}")
    if unknown:
        out.append(f"rope_type {kind!r}: unknown parameter(s) {unknown}")
    return out


# Named presets. Numbers from the params.json files Meta ships.
PRESETS: dict[str, ModelArgs] = {
    # params.json of llama-2-7b
    "llama-2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, multiple_of=256, norm_eps=1e-5),
    # params.json of llama-2-13b
    "llama-2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, multiple_of=256, norm_eps=1e-5),
    # params.json of llama-2-70b
    "llama-2-70b": ModelArgs(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
        ffn_dim_multiplier=1.3, norm_eps=1e-5,
    ),
    # params.json of CodeLlama-7b: rope_theta 1e6, vocab 32016, 16k context
    "codellama-7b": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, multiple_of=256, norm_eps=1e-5,
        rope_theta=1_000_000.0, vocab_size=32016, max_seq_len=16384,
    ),
}

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# the same modules by Hugging Face's (and peft's target_modules) names
LORA_HF_TARGETS = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
                   "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def lora_targets(given: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """LoRA targets as the store names its modules (wq, ..., w3), from Meta's names, Hugging
    Face's (q_proj, ..., down_proj) or peft's "all-linear" (every linear layer of a block: the
    seven); duplicates dropped, in the order given. Unknown names are refused with the valid ones."""
    names = [given] if isinstance(given, str) else list(given)
    out: list[str] = []
    for name in names:
        found = LORA_TARGETS if name == "all-linear" else (LORA_HF_TARGETS.get(name, name),)
        out += [t for t in found if t not in out]
    bad = [t for t in names if t != "all-linear" and LORA_HF_TARGETS.get(t, t) not in LORA_TARGETS]
    if bad:
        raise ConfigError(f"unknown LoRA target(s) {bad}; choose from {list(LORA_TARGETS)} (Meta's names), "
                          f"{list(LORA_HF_TARGETS)} (Hugging Face's) or \"all-linear\" (all seven)")
    return tuple(out)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA's settings. These defaults are the CLI's too (RunConfig takes them from here)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", lora_targets(self.targets))  # Meta's names, whatever was given
        if not self.targets:
            raise ConfigError("LoRA needs at least one target module")
        if self.rank <= 0:
            raise ConfigError(f"LoRA rank={self.rank} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout={self.dropout} must be in [0, 1)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraConfig:
        return cls(**{**d, "targets": tuple(d.get("targets", cls.targets))})
