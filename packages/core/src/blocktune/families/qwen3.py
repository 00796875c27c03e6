"""Qwen3: an explicit head size, RMSNorm over each head of q and k before RoPE, optional
attention biases, Qwen's per-layer sliding window."""

from blocktune.families.family import HALVES, Family

QWEN3 = Family(
    name="qwen3",
    hf_architecture="Qwen3ForCausalLM",
    config_keys=frozenset({"sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
                           "head_dim", "attention_bias"}),
    args_fields=("qkv_bias", "o_bias", "qk_norm", "sliding_window"),
    gguf_arch="qwen3",
    gguf_rotary=HALVES,
    qk_norm=True,
)
