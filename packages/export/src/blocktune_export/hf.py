"""Hugging Face folders of the Llama family (Llama 2/3.x, Mistral, Qwen2.5, Qwen3):
config.json, safetensors shards (with an index where there are several), tokenizer files.

`args_from_hf` reads every config.json key or refuses it by name: a setting blocktune does not
compute is never dropped. A store prepared from HF keeps the folder's config.json verbatim
(`source-config.json`) and its tokenizer files, and exports them back.

HF names every tensor differently and, for its rotate-half rotary layout, permutes the rows
of wq and wk within each head: Meta rotates interleaved pairs (x0, x1), HF rotates the two
halves of the head: `blocktune.formats.hfnames.to_hf` / `from_hf` are that permutation and its inverse.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from blocktune.errors import ConfigError, StoreError
from blocktune.families import CONFIG_KEYS, FAMILIES, hf_architectures
from blocktune.formats.hfnames import (
    HF_NAMES,
    from_hf,
    hf_key,
    meta_of_hf,
    rotary_heads,
    to_hf,
)
from blocktune.formats.tokenizer import HF_TOKENIZER_FILES
from blocktune.model.args import ROPE_TYPES, ModelArgs
from blocktune.model.llama import stored_shapes
from blocktune.store.build import build_store
from blocktune.store.fileio import read_header
from blocktune.store.records import unit_names
from blocktune.store.safefiles import staging_dir, usual_mode
from blocktune.store.store import BlockStore
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .meta import meta_key, unit_of

__all__ = ["export_hf", "import_hf", "HF_NAMES"]

SOURCE_CONFIG = "source-config.json"  # the config.json a store was prepared from, kept verbatim


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    """config.json for a store that did not come from one (Meta layout, synthetic)."""
    family = FAMILIES[args.family]
    cfg = {
        "architectures": [family.hf_architecture], "model_type": args.family,
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
        "num_attention_heads": args.n_heads, "num_hidden_layers": args.n_layers,
        "num_key_value_heads": args.kv_heads, "head_dim": args.head_dim, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "rope_scaling": args.rope_scaling, "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len, "hidden_act": "silu",
        "tie_word_embeddings": args.tie_embeddings,
        "bos_token_id": 1 if args.bos_token_id is None else args.bos_token_id,
        "eos_token_id": (list(args.eos_token_ids) if len(args.eos_token_ids) > 1 else
                         args.eos_token_ids[0] if args.eos_token_ids else 2),
        "torch_dtype": str(dtype).replace("torch.", ""),
    }
    for key, value in (("attention_bias", args.o_bias), ("mlp_bias", args.mlp_bias),
                       ("sliding_window", args.sliding_window)):
        if key in family.config_keys:  # the family's transformers class has it
            cfg[key] = value
    return cfg


# config.json keys that change nothing in the arithmetic of a forward or backward pass
_IGNORED = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version",
            "initializer_range", "use_cache", "pad_token_id", "_name_or_path", "pretraining_tp",
            "return_dict", "output_attentions", "output_hidden_states", "torchscript", "use_bfloat16",
            "tokenizer_class", "is_decoder", "is_encoder_decoder", "add_cross_attention",
            "chunk_size_feed_forward", "id2label", "label2id", "problem_type", "keys_to_ignore_at_inference",
            "max_window_layers", "use_sliding_window", "layer_types"}
_READ = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "max_position_embeddings",
         "hidden_act", "rope_theta", "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias",
         "tie_word_embeddings", "sliding_window", "bos_token_id", "eos_token_id", "attention_dropout"}


def _rope(cfg: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, scaling) from the hub's `rope_theta` + `rope_scaling` or transformers 5's
    `rope_parameters` (which holds rope_theta)."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    if params is not None and scaling is not None and params != scaling:
        raise ConfigError(f"{source}: both rope_parameters and rope_scaling are set, and differ")
    raw = dict(params if params is not None else scaling or {})
    theta = raw.pop("rope_theta", None)
    if theta is None:
        theta = cfg.get("rope_theta", 10000.0)
    elif "rope_theta" in cfg and float(cfg["rope_theta"]) != float(theta):
        raise ConfigError(f"{source}: rope_theta {cfg['rope_theta']} and rope_parameters' "
                          f"rope_theta {theta} differ")
    if "type" in raw:  # the older spelling
        raw["rope_type"] = raw.pop("type")
    kind = raw.get("rope_type", "default")
    if kind == "default":
        extra = sorted(set(raw) - {"rope_type"})
        if extra:
            raise ConfigError(f"{source}: rope_type 'default' with parameter(s) {extra}: not understood")
        return float(theta), None
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{source}: rope_type {kind!r} is not supported (blocktune computes "
                          f"{sorted(ROPE_TYPES)}); refusing rather than training a different model")
    return float(theta), raw


def _sliding(cfg: dict, keys: frozenset[str], n_layers: int) -> int | None:
    """The attention window: over every layer where the family's config has only
    sliding_window (Mistral), over some layers where it says which (Qwen's layer_types,
    use_sliding_window and max_window_layers)."""
    window = cfg.get("sliding_window")
    if window is None or "sliding_window" not in keys:
        return None
    if "max_window_layers" not in keys:
        return int(window)
    types = cfg.get("layer_types")
    if types is not None:
        return int(window) if "sliding_attention" in types else None
    if cfg.get("use_sliding_window") and cfg.get("max_window_layers", n_layers) < n_layers:
        return int(window)
    return None


def args_from_hf(cfg: dict, source: str, generation: dict | None = None) -> ModelArgs:
    """ModelArgs from a config.json; every key is understood or refused by name."""
    arch = cfg.get("architectures") or []
    family = cfg.get("model_type")
    fam = FAMILIES.get(family)
    if fam is None or (arch and arch != [fam.hf_architecture]):
        raise ConfigError(f"{source}: architecture {arch or family!r} is not supported; blocktune "
                          f"reads {', '.join(hf_architectures())}")
    if "quantization_config" in cfg:
        raise ConfigError(f"{source}: a quantized checkpoint (quantization_config); blocktune "
                          "fine-tunes exact weights: use the unquantized release")
    allowed = _IGNORED | _READ
    unknown = sorted(k for k in set(cfg) - allowed)
    foreign = sorted(k for k in set(cfg) & (CONFIG_KEYS - fam.config_keys) if cfg[k] not in (None, False))
    if unknown or foreign:
        raise ConfigError(f"{source}: config field(s) {unknown + foreign} not understood for "
                          f"{fam.hf_architecture}; blocktune refuses rather than drop a setting")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r}: blocktune computes SwiGLU with silu only")
    try:
        dim, inter, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
        n_layers, vocab = cfg["num_hidden_layers"], cfg["vocab_size"]
    except KeyError as exc:
        raise ConfigError(f"{source}: missing {exc} in config.json") from None
    theta, scaling = _rope(cfg, source)
    head_dim = cfg.get("head_dim") or dim // heads
    kv = cfg.get("num_key_value_heads") or heads
    eos = cfg.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if generation:
        geos = generation.get("eos_token_id")
        eos_ids += [i for i in ([geos] if isinstance(geos, int) else geos or []) if i not in eos_ids]
    bias = bool(cfg.get("attention_bias", False))
    base = dict(
        dim=dim, n_layers=n_layers, n_heads=heads, vocab_size=vocab, n_kv_heads=None if kv == heads else kv,
        norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=cfg.get("max_position_embeddings", 4096),
        explicit_head_dim=head_dim if head_dim * heads != dim else None,
        qkv_bias=fam.qkv_bias or bias, o_bias=False if fam.qkv_bias else bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=fam.qk_norm,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=_sliding(cfg, fam.config_keys, n_layers),
        bos_token_id=cfg.get("bos_token_id"), eos_token_ids=tuple(eos_ids), family=family,
        attn_dropout=float(cfg.get("attention_dropout", 0.0)))
    if fam.meta_ffn_rule and base["explicit_head_dim"] is None:
        # Meta's params.json has no FFN width, only the rule that makes it: find the rule's
        # inputs, so the store exports back to Meta's layout with Meta's numbers
        for mult in (256, 4096, 1024, 512, 128, 64, 32):
            for ffm in (None, 1.3, 1.0, 1.5, 2.0):
                a = ModelArgs(**base, multiple_of=mult, ffn_dim_multiplier=ffm)
                if a.hidden_dim == inter:
                    return a
    return ModelArgs(**base, ffn_dim=inter)


def _export_config(store: BlockStore, dtype: torch.dtype) -> dict:
    if (store.path / SOURCE_CONFIG).is_file():  # prepared from HF: its own config.json back
        store.check_small_file(SOURCE_CONFIG)
        cfg = json.loads((store.path / SOURCE_CONFIG).read_text())
        key = "dtype" if "dtype" in cfg or "torch_dtype" not in cfg else "torch_dtype"
        cfg[key] = str(dtype).replace("torch.", "")
        return cfg
    return hf_config(store.args, dtype)


def _planned_tensors(store: BlockStore) -> list[tuple[str, str, list[int]]]:
    """(unit, key, shape) of every tensor the export writes, in order (a tied head's projection
    is the embedding matrix: written once, as model.embed_tokens.weight)."""
    out = []
    for unit in unit_names(store.args):
        for k, info in store.record(unit).tensors.items():
            out.append((unit, k, info["shape"]))
    return out


def export_hf(store: BlockStore, out: str | Path, adapter=None,
              dtype: torch.dtype = torch.bfloat16, shard_bytes: int = 5 << 30) -> Path:
    """The store as a Hugging Face folder: config.json, safetensors shards of at most
    `shard_bytes` with an index, the tokenizer files. Streams: one unit is read (and merged)
    at a time and each shard is written as soon as it is complete."""
    from .merge import merged_unit

    item = torch.empty((), dtype=dtype).element_size()
    plan: list[list[tuple[str, str]]] = [[]]
    size = 0
    for unit, k, shape in _planned_tensors(store):
        nb = item * math.prod(shape)
        if size and size + nb > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append((unit, k))
        size += nb
    n = len(plan)
    shard_of = {uk: i for i, shard in enumerate(plan) for uk in shard}
    with staging_dir(Path(out)) as tmp:
        weight_map, total = {}, 0
        current: dict[str, torch.Tensor] = {}
        shard = 0

        def flush() -> None:
            nonlocal current, total
            name = f"model-{shard + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
            save_file(current, str(tmp / name), metadata={"format": "pt"})
            usual_mode(tmp / name)
            weight_map.update({k: name for k in current})
            total += sum(t.numel() * t.element_size() for t in current.values())
            current = {}

        for unit in unit_names(store.args):
            tensors = merged_unit(store, unit, adapter)
            for k in store.record(unit).tensors:
                if shard_of[(unit, k)] != shard:
                    flush()
                    shard = shard_of[(unit, k)]
                t = tensors[k].to(dtype)
                heads = rotary_heads(store.args, k)
                if heads:
                    t = to_hf(t, heads)
                current[hf_key(meta_key(unit, k))] = t.contiguous()
            del tensors
        flush()
        if n > 1:
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(_export_config(store, dtype), indent=2, sort_keys=True) + "\n")
        if store.tokenizer_path is not None:
            names = [store.manifest["tokenizer"]] + [
                f for f in store.manifest.get("extra_files", []) if f in HF_TOKENIZER_FILES]
            for name in names:
                store.check_small_file(name)
                shutil.copyfile(store.path / name, tmp / name)
    return Path(out)


def _check_shapes(args: ModelArgs, unit: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    want = stored_shapes(args, unit)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if want != got:
        diff = [f"{hf_key(meta_key(unit, k))}: {got.get(k, 'missing')} vs config.json's "
                f"{want.get(k, 'none')}" for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)]
        raise StoreError(f"{source}: tensors do not match config.json: " + "; ".join(diff[:4]))


def _weight_map(src: Path) -> dict[str, str]:
    """Tensor name -> its safetensors file, each file a plain name inside `src` (an index that
    points elsewhere is refused, never followed)."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise StoreError(f"{index}: not a safetensors index ({exc!r})") from None
    elif (src / "model.safetensors").is_file():
        weight_map = {k: "model.safetensors" for k in read_header(src / "model.safetensors") if k != "__metadata__"}
    else:
        raise StoreError(f"{src}: no model.safetensors or model.safetensors.index.json "
                         "(only the safetensors layout is read, never pickles)")
    outside = sorted({f for f in weight_map.values() if not isinstance(f, str) or Path(f).name != f})
    if outside:
        raise StoreError(f"{index}: names file(s) {outside[:3]} that are not in {src}; an index names the "
                         "shard files beside it")
    missing = sorted({f for f in weight_map.values() if not (src / f).is_file()})
    if missing:
        raise StoreError(f"{src}: shard file(s) {missing} named in the index are missing")
    for name in sorted(set(weight_map.values())):  # each header checked before the library reads it
        held = read_header(src / name)
        absent = sorted(k for k, f in weight_map.items() if f == name and k not in held)
        if absent:
            raise StoreError(f"{src / name}: does not hold {absent[:3]}, which {index.name} places in it")
    return weight_map


def import_hf(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None,
              progress: Callable[[str], None] | None = None) -> BlockStore:
    src = Path(src)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise StoreError(f"{src}: no config.json; is this a Hugging Face model folder?")
    raw_cfg = cfg_path.read_bytes()
    try:
        cfg = json.loads(raw_cfg)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{cfg_path}: not valid JSON ({exc})") from None
    gen_path = src / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else None
    args = args_from_hf(cfg, str(cfg_path), generation)
    weight_map = _weight_map(src)
    if args.n_layers > len(weight_map):  # before unit names are made for it (a hostile config)
        raise StoreError(f"{cfg_path}: num_hidden_layers {args.n_layers} but the checkpoint holds "
                         f"{len(weight_map)} tensors in all")
    by_unit: dict[str, list[str]] = {}
    for k in weight_map:
        if k.endswith("rotary_emb.inv_freq"):
            continue
        if k == "lm_head.weight" and args.tie_embeddings:
            continue  # tied: transformers reads the embeddings for it, and so do we
        by_unit.setdefault(unit_of(meta_of_hf(k, str(src)))[0], []).append(k)
    if set(by_unit) - {"head"} != set(unit_names(args)) - {"head"}:
        raise StoreError(f"{src}: tensors do not match config.json's {args.n_layers} layers")

    def units():
        for unit in unit_names(args):
            out = {}
            for k in by_unit.get(unit, []):
                try:
                    with safe_open(str(src / weight_map[k]), framework="pt") as f:
                        t = f.get_tensor(k)
                except SafetensorError as exc:  # the library's message names no file
                    raise StoreError(f"{src / weight_map[k]}: cannot read tensor {k} ({exc})") from exc
                local = unit_of(meta_of_hf(k))[1]
                heads = rotary_heads(args, local)
                out[local] = from_hf(t, heads) if heads else t
            _check_shapes(args, unit, out, str(src))
            yield unit, out

    gen = units()
    first = next(gen)
    dtype = dtype or next(iter(first[1].values())).dtype

    def chain():
        yield first
        yield from gen

    files = {SOURCE_CONFIG: raw_cfg}
    if (src / "tokenizer.json").is_file():
        tok, kind = src, "hf"
    elif (src / "tokenizer.model").is_file():
        tok, kind = src / "tokenizer.model", None
        if gen_path.is_file():
            files["generation_config.json"] = gen_path.read_bytes()
    else:
        tok, kind = None, None
    return build_store(dst, args, chain(), dtype, tokenizer=tok, tokenizer_kind=kind,
                       progress=progress, extra={"source": {"format": "hf"}}, files=files)
