"""GGUF, for llama.cpp and Ollama: one file with the weights (f32, f16 or bf16: nothing is
quantized), the model's metadata and its tokenizer, written through the `gguf` package that
llama.cpp's project publishes.

Conventions are llama.cpp's: tensor names come from gguf's own map of Hugging Face names;
architecture `llama` (Llama 2/3, Mistral) rotates interleaved pairs (the store's Meta layout,
written as is), `qwen2` / `qwen3` rotate halves (HF's layout, permuted on the way out); Llama
3's RoPE scaling is the `rope_freqs` tensor of per-frequency factors; a tied head is left out
(llama.cpp reuses the embeddings). Tokenizers: sentencepiece as `llama` (pieces, scores, types),
a tokenizer.json BPE as `gpt2` (byte-level tokens, merges) with the pre-tokenizer named by its
split pattern. Streams: tensor infos first, then one unit at a time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from blocktune.errors import ConfigError
from blocktune.families import FAMILIES, HALVES
from blocktune.formats.hfnames import hf_key, rotary_heads, to_hf
from blocktune.model.llama import rope_frequencies
from blocktune.model.units import unit_name
from blocktune.store.records import unit_names
from blocktune.store.safefiles import staging_dir
from blocktune.store.store import BlockStore

from .meta import meta_key

__all__ = ["export_gguf"]

# tokenizer.json split patterns llama.cpp knows, by the name its `tokenizer.ggml.pre` takes
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


GGUF_EXTRA = "pip install 'blocktune-export[gguf]'"  # the extra that brings the gguf package


def need_gguf(what: str):
    """The gguf package (llama.cpp's reader and writer), or an error naming the extra to install."""
    try:
        import gguf
    except ImportError:
        raise ConfigError(f"{what} needs the gguf package, in blocktune-export's `gguf` extra: {GGUF_EXTRA}") from None
    return gguf


def _tensor_dtype(dtype: torch.dtype):
    import gguf

    return {torch.float32: (np.float32, None, gguf.LlamaFileType.ALL_F32),
            torch.float16: (np.float16, None, gguf.LlamaFileType.MOSTLY_F16),
            torch.bfloat16: (np.uint16, gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16)}[dtype]


def _as_numpy(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    t = t.detach().to("cpu", dtype).contiguous()
    return t.view(torch.uint16).numpy() if dtype == torch.bfloat16 else t.numpy()


def _rope_factors(args) -> np.ndarray | None:
    """Llama 3's scaling as llama.cpp takes it: per frequency, original / scaled."""
    if not args.rope_scaling or args.rope_scaling.get("rope_type") != "llama3":
        return None
    plain, _ = rope_frequencies(args.head_dim, args.rope_theta)
    scaled, _ = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
    return (plain / scaled).to(torch.float32).numpy()


def _normalizer(path: Path) -> tuple[str, bool]:
    """(normalization rule, remove_extra_whitespaces) of a sentencepiece model file."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto.normalizer_spec.name, proto.normalizer_spec.remove_extra_whitespaces


def _write_tokenizer(w, store: BlockStore, warn) -> None:
    kind = store.manifest.get("tokenizer_kind", "sentencepiece")
    if kind == "sentencepiece":
        _write_sentencepiece(w, store, warn)
    elif kind == "hf":
        _write_bpe(w, store)
    else:
        raise ConfigError(f"{store.path}: a {kind} tokenizer has no GGUF form here; export --format meta")


def _write_sentencepiece(w, store: BlockStore, warn) -> None:
    """A sentencepiece model as llama.cpp's `llama` vocabulary: pieces, scores, types."""
    import gguf
    import sentencepiece as spm

    args = store.args
    sp = spm.SentencePieceProcessor(model_file=str(store.tokenizer_path))
    spec = _normalizer(store.tokenizer_path)
    if spec != ("identity", False):  # Meta's: no normalization, whitespace kept
        warn(f"{store.tokenizer_path}: this sentencepiece model normalizes text ({spec[0]}"
             f"{', removes extra whitespace' if spec[1] else ''}); llama.cpp does not, so it tokenizes "
             "newlines and repeated spaces differently from blocktune and sentencepiece")
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL
                     if sp.is_control(i) else gguf.TokenType.UNUSED if sp.is_unused(i)
                     else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL)
    pad = args.vocab_size - len(tokens)  # rows past the tokenizer (a padded vocabulary)
    tokens += [f"[PAD{i}]".encode() for i in range(pad)]
    scores += [-1000.0] * pad
    types += [gguf.TokenType.UNUSED] * pad
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)


def _write_bpe(w, store: BlockStore) -> None:
    """A tokenizer.json byte-level BPE as llama.cpp's `gpt2` vocabulary: tokens, types, merges,
    the pre-tokenizer by llama.cpp's name, the special ids and the chat template."""
    import gguf
    from blocktune.formats.tokenizer import HFTokenizer

    args = store.args
    tok = HFTokenizer(store.path, args.eos_token_ids)
    spec = json.loads((store.path / "tokenizer.json").read_text())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ConfigError(f"{store.path}/tokenizer.json: a {model.get('type')} model; GGUF export writes "
                          "byte-level BPE (Llama 3, Qwen) and sentencepiece tokenizers")
    vocab = tok.tk.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    added = {a["id"] for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(args.vocab_size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED
                         if i in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(spec))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        w.add_eos_token_id(tok.eos_id)
        # generation's other stop tokens (Llama 3's end_of_text beside eot_id): llama.cpp's
        # end-of-turn and end-of-message slots
        others = [i for i in args.eos_token_ids if i != tok.eos_id]
        for add, i in zip((w.add_eot_token_id, w.add_eom_token_id), others):
            add(i)
    if tok.pad_id is not None:
        w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(tok.add_bos)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def _pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for the tokenizer.json pre-tokenizer, told by its split pattern."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    if [s.get("type") for s in steps] == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # GPT-2's split after each digit on its own (SmolLM)
    for s in steps:
        if s.get("type") == "Split":
            pattern = s.get("pattern", {}).get("Regex")
            if pattern == LLAMA3_SPLIT:
                return "llama-bpe"
            if pattern == QWEN2_SPLIT:
                return "qwen2"
            raise ConfigError(f"tokenizer.json: split pattern {pattern!r} is not one llama.cpp names here")
        if s.get("type") == "ByteLevel" and s.get("use_regex", True):
            return "gpt-2"
    raise ConfigError("tokenizer.json: no byte-level pre-tokenizer llama.cpp would know")


def _write_metadata(w, store: BlockStore, ftype) -> None:
    """The model's metadata, under llama.cpp's keys (`{arch}.context_length`, ...)."""
    import gguf

    args = store.args
    for add, value in ((w.add_name, store.manifest.get("source", {}).get("name") or store.path.name),
                       (w.add_file_type, ftype), (w.add_vocab_size, args.vocab_size),
                       (w.add_context_length, args.max_seq_len), (w.add_embedding_length, args.dim),
                       (w.add_block_count, args.n_layers), (w.add_feed_forward_length, args.hidden_dim),
                       (w.add_head_count, args.n_heads), (w.add_head_count_kv, args.kv_heads),
                       (w.add_key_length, args.head_dim), (w.add_value_length, args.head_dim),
                       (w.add_rope_dimension_count, args.head_dim), (w.add_rope_freq_base, args.rope_theta),
                       (w.add_layer_norm_rms_eps, args.norm_eps)):
        add(value)
    if args.rope_scaling and args.rope_scaling["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(args.rope_scaling["factor"]))


def _architecture(store: BlockStore):
    """The store's family, as llama.cpp has it (refused where it has no GGUF form)."""
    family = FAMILIES.get(store.args.family)
    if family is None or family.gguf_arch is None:
        raise ConfigError(f"{store.path}: family {store.args.family!r} has no GGUF architecture here")
    return family


def _namer(args, arch: str):
    """(unit, key) -> the GGUF tensor name, through gguf's own map of Hugging Face names."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], args.n_layers)

    def gguf_name(unit: str, key: str) -> str:
        hf = hf_key(meta_key(unit, key))
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"{hf}: gguf's tensor map for {arch} has no name for it")
        return name

    return gguf_name


def export_gguf(store: BlockStore, out: str | Path, adapter=None, dtype: torch.dtype = torch.bfloat16,
                warn=lambda msg: print(f"warning: {msg}", file=sys.stderr)) -> Path:
    """`out` is a folder; the model goes to `out/model.gguf` (LoRA merged if given)."""
    gguf = need_gguf("export --format gguf")

    from .merge import merged_unit

    args = store.args
    family = _architecture(store)
    if store.tokenizer_path is None:
        raise ConfigError(f"{store.path}: the store has no tokenizer; llama.cpp needs one in the GGUF file")
    if args.rope_scaling and args.rope_scaling.get("rope_type") not in ("llama3", "linear"):
        raise ConfigError(f"{store.path}: rope_type {args.rope_scaling['rope_type']!r} is not written to GGUF "
                          "here (llama.cpp's own YaRN differs in details); export --format hf and convert")
    arch = family.gguf_arch
    np_dtype, raw, ftype = _tensor_dtype(dtype)
    gguf_name = _namer(args, arch)
    halves = family.gguf_rotary == HALVES  # qwen2/qwen3 rotate halves: HF's layout

    with staging_dir(Path(out)) as tmp:
        path = tmp / "model.gguf"
        w = gguf.GGUFWriter(str(path), arch)
        _write_metadata(w, store, ftype)
        _write_tokenizer(w, store, warn)
        factors = _rope_factors(args)
        for unit in unit_names(args):
            for key, info in store.record(unit).tensors.items():
                shape = info["shape"]
                one_d = len(shape) == 1
                t_dtype, t_raw = (np.float32, None) if one_d else (np_dtype, raw)
                nbytes = int(np.prod(shape)) * np.dtype(t_dtype).itemsize
                w.add_tensor_info(gguf_name(unit, key), shape, np.dtype(t_dtype), nbytes, t_raw)
        if factors is not None:
            w.add_tensor_info("rope_freqs.weight", factors.shape, factors.dtype, factors.nbytes)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for unit in unit_names(args):
            tensors = merged_unit(store, unit, adapter)
            for key in store.record(unit).tensors:
                t = tensors[key]
                heads = rotary_heads(args, key)
                if halves and heads:
                    t = to_hf(t, heads)
                one_d = t.dim() == 1  # norms and biases stay f32, as llama.cpp's converter keeps them
                w.write_tensor_data(_as_numpy(t, torch.float32 if one_d else dtype))
            del tensors
        if factors is not None:
            w.write_tensor_data(factors)
        w.close()
    return Path(out)


def export_gguf_lora(store: BlockStore, out: str | Path, adapter, dtype: torch.dtype = torch.float32) -> Path:
    """`out/adapter.gguf`: a LoRA adapter as llama.cpp loads it beside its base model (`--lora`,
    Ollama's ADAPTER), in the layout llama.cpp's convert_lora_to_gguf.py writes: general.type
    `adapter`, adapter.type `lora`, adapter.lora.alpha, and `<base tensor>.lora_a` (rank x in) and
    `.lora_b` (out x rank) for each adapted weight, B's rows in the base file's rotary layout."""
    gguf = need_gguf("export --format gguf-lora")

    args, family = store.args, _architecture(store)
    gguf_name = _namer(args, family.gguf_arch)
    halves = family.gguf_rotary == HALVES
    np_dtype, raw, _ = _tensor_dtype(dtype)
    with staging_dir(Path(out)) as tmp:
        w = gguf.GGUFWriter(str(tmp / "adapter.gguf"), family.gguf_arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.lora.alpha))
        for key in sorted(adapter.tensors):  # layers.N.attention.wq.lora_a
            module, part = key.rsplit(".", 1)
            layer, local = int(module.split(".")[1]), module.split(".", 2)[2]
            unit = unit_name(layer)
            t = adapter.tensors[key]
            heads = rotary_heads(args, f"{local}.weight")
            if part == "lora_b" and halves and heads:
                t = to_hf(t, heads)
            w.add_tensor(f"{gguf_name(unit, local + '.weight')}.{part}", _as_numpy(t, dtype), raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(out)
