"""Llama 2, Llama 3.x and CodeLlama: Meta's architecture, HF's LlamaForCausalLM (attention and
MLP biases optional, Meta's FFN rule, Llama 3.1's scaled RoPE in rope_scaling)."""

from blocktune.families.family import INTERLEAVED, Family

LLAMA = Family(
    name="llama",
    hf_architecture="LlamaForCausalLM",
    config_keys=frozenset({"attention_bias", "mlp_bias", "head_dim"}),
    args_fields=("qkv_bias", "o_bias", "mlp_bias"),
    gguf_arch="llama",
    gguf_rotary=INTERLEAVED,
    meta_ffn_rule=True,
)
