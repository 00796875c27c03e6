"""Mistral: Llama's decoder with grouped-query heads and, in v0.1, a sliding attention window
over every layer; llama.cpp runs it as `llama`."""

from blocktune.families.family import INTERLEAVED, Family

MISTRAL = Family(
    name="mistral",
    hf_architecture="MistralForCausalLM",
    config_keys=frozenset({"sliding_window", "head_dim"}),
    args_fields=("sliding_window",),
    gguf_arch="llama",
    gguf_rotary=INTERLEAVED,
)
