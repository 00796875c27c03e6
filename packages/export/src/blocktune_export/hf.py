"""Hugging Face's Llama layout: safetensors shards, an index and config.json.

HF names every tensor differently and, for its rotate-half rotary layout, permutes the rows
of wq and wk within each head: Meta rotates interleaved pairs (x0, x1), HF rotates the two
halves of the head. `_to_hf` / `_from_hf` are that permutation and its inverse.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from blocktune.config import ModelArgs
from blocktune.errors import ConfigError, StoreError
from blocktune.store import BlockStore, build_store, staging_dir, unit_names
from safetensors import safe_open
from safetensors.torch import save_file

from .meta import meta_key, unit_of

__all__ = ["export_hf", "import_hf", "HF_NAMES"]

# Meta key (layers.N. removed) -> HF key (model.layers.N. removed)
HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_FROM_HF = {v: k for k, v in HF_NAMES.items()}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_key(meta: str) -> str:
    m = re.match(r"^layers\.(\d+)\.(.+)$", meta)
    return f"model.layers.{m.group(1)}.{HF_NAMES[m.group(2)]}" if m else HF_NAMES[meta]


def meta_of_hf(key: str) -> str:
    m = _HF_LAYER.match(key)
    try:
        return f"layers.{m.group(1)}.{_FROM_HF[m.group(2)]}" if m else _FROM_HF[key]
    except KeyError:
        raise StoreError(f"unknown Hugging Face key {key!r}; not a LlamaForCausalLM checkpoint") from None


def _to_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _from_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _heads(args: ModelArgs, local: str) -> int | None:
    return {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.kv_heads}.get(local)


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
        "num_attention_heads": args.n_heads, "num_hidden_layers": args.n_layers,
        "num_key_value_heads": args.kv_heads, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }


def args_from_hf(cfg: dict, source: str) -> ModelArgs:
    try:
        dim, inter = cfg["hidden_size"], cfg["intermediate_size"]
        base = dict(dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                    vocab_size=cfg["vocab_size"], norm_eps=cfg.get("rms_norm_eps", 1e-5),
                    rope_theta=float(cfg.get("rope_theta", 10000.0)),
                    max_seq_len=cfg.get("max_position_embeddings", 4096))
    except KeyError as exc:
        raise ConfigError(f"{source}: missing {exc} in config.json") from None
    kv = cfg.get("num_key_value_heads", base["n_heads"])
    base["n_kv_heads"] = None if kv == base["n_heads"] else kv
    # Meta's params.json has no FFN width, only the rule that makes it: find the rule's inputs.
    for mult in (256, 4096, 1024, 512, 128, 64, 32):
        for ffm in (None, 1.3, 1.0, 1.5, 2.0):
            a = ModelArgs(**base, multiple_of=mult, ffn_dim_multiplier=ffm)
            if a.hidden_dim == inter:
                return a
    return ModelArgs(**base, multiple_of=inter)  # rounds any width ≤ inter up to exactly inter


def export_hf(store: BlockStore, out: str | Path, adapter=None,
              dtype: torch.dtype = torch.bfloat16, shard_bytes: int = 5 << 30) -> Path:
    from .merge import merged_unit

    with staging_dir(Path(out)) as tmp:
        files: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for unit in unit_names(store.args):
            for k, t in merged_unit(store, unit, adapter).items():
                heads = _heads(store.args, k)
                t = t.to(dtype)
                if heads:
                    t = _to_hf(t, heads)
                nb = t.numel() * t.element_size()
                if size and size + nb > shard_bytes:
                    files.append({})
                    size = 0
                files[-1][hf_key(meta_key(unit, k))] = t.contiguous()
                size += nb
        n = len(files)
        weight_map = {}
        for i, f in enumerate(files):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(f, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in f})
        total = sum(t.numel() * t.element_size() for f in files for t in f.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        (tmp / "config.json").write_text(json.dumps(hf_config(store.args, dtype), indent=1))
        if store.tokenizer_path is not None:
            shutil.copyfile(store.tokenizer_path, tmp / "tokenizer.model")
    return Path(out)


def import_hf(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None,
              progress: Callable[[str], None] | None = None) -> BlockStore:
    src = Path(src)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise StoreError(f"{src}: no config.json; is this a Hugging Face Llama folder?")
    args = args_from_hf(json.loads(cfg_path.read_text()), str(cfg_path))
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (src / "model.safetensors").is_file():
        with safe_open(str(src / "model.safetensors"), framework="pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
        raise StoreError(f"{src}: no model.safetensors or model.safetensors.index.json "
                         "(only the safetensors layout is read, never pickles)")
    missing = sorted({f for f in weight_map.values() if not (src / f).is_file()})
    if missing:
        raise StoreError(f"{src}: shard file(s) {missing} named in the index are missing")
    by_unit: dict[str, list[str]] = {}
    for k in weight_map:
        if k.endswith("rotary_emb.inv_freq"):
            continue
        by_unit.setdefault(unit_of(meta_of_hf(k))[0], []).append(k)
    if set(by_unit) != set(unit_names(args)):
        raise StoreError(f"{src}: tensors do not match config.json's {args.n_layers} layers")

    def units():
        for unit in unit_names(args):
            out = {}
            for k in by_unit[unit]:
                with safe_open(str(src / weight_map[k]), framework="pt") as f:
                    t = f.get_tensor(k)
                local = unit_of(meta_of_hf(k))[1]
                heads = _heads(args, local)
                out[local] = _from_hf(t, heads) if heads else t
            yield unit, out

    gen = units()
    first = next(gen)
    dtype = dtype or next(iter(first[1].values())).dtype

    def chain():
        yield first
        yield from gen

    tok = src / "tokenizer.model"
    return build_store(dst, args, chain(), dtype, tokenizer=tok if tok.is_file() else None,
                       progress=progress, extra={"source": {"format": "hf"}})
