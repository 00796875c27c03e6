"""The model families blocktune reads, one module each, and their registry: by family name
(HF's model_type, ModelArgs.family), by HF architecture, by llama.cpp's GGUF architecture.

A new family is one new module here (a `Family` record) added to `_ALL`, plus its tests.
"""

from __future__ import annotations

from blocktune.families.family import HALVES, INTERLEAVED, Family
from blocktune.families.llama import LLAMA
from blocktune.families.mistral import MISTRAL
from blocktune.families.qwen2 import QWEN2
from blocktune.families.qwen3 import QWEN3

__all__ = ["Family", "FAMILIES", "ARGS_FIELDS", "CONFIG_KEYS", "INTERLEAVED", "HALVES",
           "by_hf_architecture", "by_gguf_arch", "hf_architectures"]

_ALL = (LLAMA, MISTRAL, QWEN2, QWEN3)  # in this order in messages
FAMILIES: dict[str, Family] = {f.name: f for f in _ALL}

# ModelArgs fields every HF import sets, whatever the family
_HF_FIELDS = ("explicit_head_dim", "ffn_dim", "rope_scaling", "tie_embeddings", "bos_token_id",
              "eos_token_ids", "family")
# the fields in which families differ from Llama 2 (a manifest writes them only where set)
ARGS_FIELDS: frozenset[str] = frozenset(_HF_FIELDS).union(*(f.args_fields for f in _ALL))
# config.json keys some family has and another lacks
CONFIG_KEYS: frozenset[str] = frozenset().union(*(f.config_keys for f in _ALL))


def hf_architectures() -> list[str]:
    """The transformers classes blocktune reads, in the registry's order."""
    return [f.hf_architecture for f in _ALL]


def by_hf_architecture(arch: str) -> Family | None:
    return next((f for f in _ALL if f.hf_architecture == arch), None)


def by_gguf_arch(arch: str) -> tuple[Family, ...]:
    """The families llama.cpp runs as `arch` (llama: Llama and Mistral)."""
    return tuple(f for f in _ALL if f.gguf_arch == arch)
