"""Qwen2 and Qwen2.5: biases on q, k and v (never on o), tied embeddings in the small sizes, a
sliding window on some layers only (use_sliding_window, max_window_layers, layer_types)."""

from blocktune.families.family import HALVES, Family

QWEN2 = Family(
    name="qwen2",
    hf_architecture="Qwen2ForCausalLM",
    config_keys=frozenset({"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"}),
    args_fields=("qkv_bias", "sliding_window"),
    gguf_arch="qwen2",
    gguf_rotary=HALVES,
    qkv_bias=True,
)
