"""What one model family is, as data: the names other tools give it and the few ways its
decoder differs from Llama 2's. One frozen record per family; `blocktune.families` holds them."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Family", "INTERLEAVED", "HALVES"]

INTERLEAVED = "interleaved"  # rotary pairs (x0, x1): Meta's layout, the store's
HALVES = "halves"  # rotary over the two halves of a head: HF's layout


@dataclass(frozen=True)
class Family:
    name: str  # HF's model_type, and ModelArgs.family
    hf_architecture: str  # config.json's "architectures" entry (the transformers class)
    # config.json keys its transformers class has, of those some family lacks (a key of
    # another family, set, is refused by name)
    config_keys: frozenset[str]
    # ModelArgs fields its checkpoints set beyond those every HF import sets (families.ARGS_FIELDS)
    args_fields: tuple[str, ...]
    gguf_arch: str | None  # llama.cpp's architecture; None: no GGUF export
    gguf_rotary: str = INTERLEAVED  # the rotary layout llama.cpp's architecture computes
    qkv_bias: bool = False  # q/k/v always carry biases and o none, whatever attention_bias says (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head of q and k, before RoPE (Qwen3)
    # the SwiGLU width follows Meta's params.json rule (multiple_of, ffn_dim_multiplier): an
    # import finds the rule's inputs, so the store exports back to Meta's layout
    meta_ffn_rule: bool = False

    def __post_init__(self) -> None:
        if self.gguf_rotary not in (INTERLEAVED, HALVES):
            raise ValueError(f"family {self.name}: gguf_rotary {self.gguf_rotary!r} is neither "
                             f"{INTERLEAVED!r} nor {HALVES!r}")
