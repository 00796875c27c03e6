"""Hugging Face checkpoints of every family blocktune reads, made by transformers itself.

`make_checkpoint(out, family)` builds a small random model with transformers' own config and
model classes and writes it with `save_pretrained`, beside a tokenizer trained by the
`tokenizers` library on the text the project ships (`corpus_text`): the folder is what a user
downloads from the hub, only smaller. `make_shape_checkpoint` writes a 7B-class shape of a
family (random bf16 weights, keys and shapes from transformers' model on the meta device) shard
by shard, for the memory benchmarks.

transformers and tokenizers are test/bench dependencies only (blocktune itself never imports
transformers).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .corpus import corpus_text, tokenizer_path

__all__ = ["FAMILIES", "SHAPES", "make_checkpoint", "make_shape_checkpoint", "train_hf_tokenizer",
           "train_tiktoken_file",
           "LLAMA3_TEMPLATE", "CHATML_TEMPLATE"]

# Chat templates in the two styles the families use, written for this project: Llama 3's
# header tokens, and ChatML (Qwen). Both render a system prompt, the turns, and a generation prompt.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SMALL = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)

# family -> (transformers config class, its settings beyond _SMALL, tokenizer style)
FAMILIES: dict[str, tuple[str, dict, str]] = {
    # Llama 3.2 1B's distinctive settings: llama3 rope scaling, theta 5e5, tied embeddings, two EOS
    "llama3": ("LlamaConfig", dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64},
        tie_word_embeddings=True, rms_norm_eps=1e-5), "llama3"),
    # Mistral 7B v0.1: a sliding window (longer than any test sequence), sentencepiece tokenizer
    "mistral": ("MistralConfig", dict(sliding_window=128, rope_parameters={"rope_type": "default",
                                                                          "rope_theta": 10000.0}), "sentencepiece"),
    # Qwen2.5: q/k/v biases, tied embeddings (0.5B-3B), no BOS, ChatML; yarn rope scaling as
    # Qwen documents for long context
    "qwen2": ("Qwen2Config", dict(
        tie_word_embeddings=True, rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                                   "original_max_position_embeddings": 64}), "chatml"),
    # Qwen3: head_dim (32) != hidden / heads (16), q/k RMSNorm, untied
    "qwen3": ("Qwen3Config", dict(head_dim=32, rope_parameters={"rope_type": "default",
                                                                "rope_theta": 1000000.0}), "chatml"),
}

# 7B-class shapes, from the published config.json files (and the tokenizer style of each)
SHAPES: dict[str, tuple[str, dict, str]] = {
    "llama-3.1-8b": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=128001), "llama3"),
    "qwen2.5-7b": ("Qwen2Config", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False), "chatml"),
    "mistral-7b": ("MistralConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5,
        sliding_window=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), "sentencepiece"),
    "qwen3-8b": ("Qwen3Config", dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False), "chatml"),
}


def train_hf_tokenizer(out: str | Path, style: str, vocab_size: int = 480) -> Path:
    """A byte-level BPE `tokenizer.json` (+ tokenizer_config.json) trained on the shipped corpus,
    in Llama 3's style (BOS added by the post-processor, header and eot tokens) or Qwen's
    ChatML style (no BOS, <|im_start|>/<|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if style == "llama3":
        special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        bos, eos, template = "<|begin_of_text|>", "<|eot_id|>", LLAMA3_TEMPLATE
    elif style == "chatml":
        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        bos, eos, template = None, "<|im_end|>", CHATML_TEMPLATE
    else:
        raise ValueError(style)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_text().splitlines(), trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
           "pad_token": special[0] if style == "chatml" else None, "add_bos_token": bos is not None,
           "chat_template": template, "model_max_length": 256, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return out / "tokenizer.json"


def _byte_chars() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character for each byte (the GPT-2 mapping: printable
    Latin-1 bytes stand for themselves, the rest are shifted past 255), inverted: char -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def train_tiktoken_file(out: str | Path, vocab_size: int = 480) -> Path:
    """A Meta Llama 3 style `tokenizer.model` (base64 token, rank per line, as tiktoken reads it):
    byte-level BPE trained by `tokenizers` on the shipped corpus, ranks in merge order."""
    import base64

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_text().splitlines(), trainer)
    to_byte = _byte_chars()
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    lines = [f"{base64.b64encode(bytes(to_byte[c] for c in piece)).decode()} {rank}" for piece, rank in vocab]
    out = Path(out)
    out.write_text("\n".join(lines) + "\n")
    return out


def _config(cls_name: str, settings: dict):
    import transformers

    return getattr(transformers, cls_name)(**settings)


def make_checkpoint(out: str | Path, family: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                    **overrides):
    """A small random `family` model saved by transformers' `save_pretrained`, with a tokenizer
    (`overrides`: config fields that replace the family's); returns the transformers model (eval
    mode) it saved."""
    from transformers import AutoModelForCausalLM

    cls_name, settings, style = FAMILIES[family]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if style == "sentencepiece":
        (out / "tokenizer.model").write_bytes(tokenizer_path().read_bytes())
        ids = dict(vocab_size=1024, bos_token_id=1, eos_token_id=2)
    else:
        train_hf_tokenizer(out, style)
        from tokenizers import Tokenizer

        tk = Tokenizer.from_file(str(out / "tokenizer.json"))
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        bos = tk.token_to_id(cfg["bos_token"]) if cfg["bos_token"] else None
        eos = [tk.token_to_id(cfg["eos_token"])]
        if style == "llama3":
            eos.append(tk.token_to_id("<|end_of_text|>"))
        ids = dict(vocab_size=tk.get_vocab_size() + 16, bos_token_id=bos, eos_token_id=eos)
    torch.manual_seed(seed)
    config = _config(cls_name, {**_SMALL, **ids, **settings, **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # norms and biases off their init values, so a wrong mapping shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    return model.eval()


def make_shape_checkpoint(out: str | Path, shape: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                          shard_bytes: int = 4 << 30) -> Path:
    """A 7B-class `shape` as a Hugging Face folder (config.json by transformers, safetensors
    shards with an index, random weights), written one tensor at a time: the keys and shapes are
    those of transformers' model built on the meta device."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    cls_name, settings, style = SHAPES[shape]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if style == "sentencepiece":
        (out / "tokenizer.model").write_bytes(tokenizer_path().read_bytes())
    else:
        train_hf_tokenizer(out, style)  # a small vocabulary: its ids all fall inside the model's
    config = _config(cls_name, settings)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    config.save_pretrained(out)
    gen = torch.Generator().manual_seed(seed)
    plan: list[list[str]] = [[]]
    size = 0
    for k, s in shapes.items():
        nb = dtype.itemsize * int(torch.Size(s).numel())
        if size and size + nb > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(k)
        size += nb
    weight_map, total = {}, 0
    for i, keys in enumerate(plan):
        name = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for k in keys:
            s = shapes[k]
            if k.endswith("norm.weight"):
                tensors[k] = torch.ones(s, dtype=dtype)
            else:
                tensors[k] = (torch.randn(s, generator=gen) * 0.02).to(dtype)
            total += tensors[k].numel() * dtype.itemsize
            weight_map[k] = name
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out
