"""GGUF in: `blocktune prepare MODEL.gguf STORE` reads a llama.cpp / Ollama file into a block
store, one unit at a time, dequantized with the `gguf` package (llama.cpp's own reader).

What is read: architectures `llama` (Llama 2/3, Mistral, SmolLM), `qwen2` and `qwen3`; tensors in
F32, F16, BF16 and every type `gguf` dequantizes (Q4_0 … Q8_0, the K-quants, the IQ types); the
model's fields from the `{arch}.*` metadata, any such key not understood refused by name; the
tokenizer from `tokenizer.ggml.*` (a `gpt2` byte-level BPE becomes a tokenizer.json, a `llama`
sentencepiece vocabulary a tokenizer.model) with its chat template. llama.cpp's rotary layout is
undone per architecture: `llama` files hold Meta's interleaved layout (the store's, kept as is),
`qwen2`/`qwen3` HF's halves (permuted back). A quantized file is fine-tuned as its dequantized
weights: they are exact in fp32, the default stored dtype for such a file.
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from blocktune.errors import ConfigError, StoreError
from blocktune.families import FAMILIES, HALVES, by_gguf_arch
from blocktune.formats.hfnames import from_hf, hf_key, rotary_heads
from blocktune.model.args import ModelArgs
from blocktune.model.llama import rope_frequencies, stored_shapes
from blocktune.store.build import build_store
from blocktune.store.records import unit_names
from blocktune.store.store import BlockStore

from .gguf_format import LLAMA3_SPLIT, QWEN2_SPLIT, need_gguf
from .meta import meta_key

__all__ = ["read_gguf", "import_gguf"]


# `{arch}.<key>` metadata blocktune reads; any other `{arch}.*` key changes the model in a way
# it does not compute, and is refused by name
_MODEL_KEYS = {"context_length", "embedding_length", "block_count", "feed_forward_length",
               "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
               "rope.freq_base", "rope.dimension_count", "attention.key_length", "attention.value_length",
               "vocab_size", "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
               "rope.scaling.finetuned"}
# tokenizer keys read, and those that only name tokens blocktune never emits (fill-in-the-middle, …)
_TOKENIZER_KEYS = {"model", "pre", "tokens", "scores", "token_type", "merges", "bos_token_id", "eos_token_id",
                   "unknown_token_id", "padding_token_id", "add_bos_token", "add_eos_token", "add_space_prefix",
                   "eot_token_id", "eom_token_id"}
_TOKENIZER_IGNORED = {"seperator_token_id", "separator_token_id", "cls_token_id", "mask_token_id",
                      "fim_pre_token_id", "fim_suf_token_id", "fim_mid_token_id", "fim_pad_token_id",
                      "fim_rep_token_id", "fim_sep_token_id", "prefix_token_id", "suffix_token_id",
                      "middle_token_id"}

# llama.cpp's pre-tokenizers (`tokenizer.ggml.pre`) as `tokenizers` pre-tokenizer specs: the split
# patterns are the models' own tokenizer.json's (the ones `export --format gguf` names)
_BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


_PRE = {
    "default": [{**_BYTES, "use_regex": True}],
    "gpt-2": [{**_BYTES, "use_regex": True}],
    "smollm": [{"type": "Digits", "individual_digits": True}, {**_BYTES, "use_regex": True}],
    "llama-bpe": [_split(LLAMA3_SPLIT), _BYTES],
    "llama3": [_split(LLAMA3_SPLIT), _BYTES],
    "smaug-bpe": [_split(LLAMA3_SPLIT), _BYTES],
    "qwen2": [_split(QWEN2_SPLIT), _BYTES],
    "deepseek-r1-qwen": [_split(QWEN2_SPLIT), _BYTES],
}
_IGNORE_MERGES = {"llama-bpe", "llama3", "smaug-bpe"}  # llama.cpp's LLAMA3 pre-type: whole words first
_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType


class GGUFFile:
    """One GGUF file's metadata, read through `gguf.GGUFReader` (the tensors stay mapped)."""

    def __init__(self, path: str | Path):
        gguf = need_gguf("reading a GGUF file")
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except (ValueError, OSError, IndexError) as exc:
            raise StoreError(f"{self.path}: not a GGUF file gguf can read ({exc})") from None
        self.arch = self.get("general.architecture")
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default=None):
        f = self.reader.fields.get(key)
        if f is None:
            return default
        value = f.contents()
        return value.item() if isinstance(value, np.generic) else value

    def keys(self) -> list[str]:
        return list(self.reader.fields)

    def model(self, key: str, default=None):
        return self.get(f"{self.arch}.{key}", default)


def _check_keys(g: GGUFFile) -> None:
    unknown = [k for k in g.keys() if k.startswith(f"{g.arch}.") and k[len(g.arch) + 1:] not in _MODEL_KEYS]
    unknown += [k for k in g.keys() if k.startswith("tokenizer.ggml.")
                and k[len("tokenizer.ggml."):] not in _TOKENIZER_KEYS | _TOKENIZER_IGNORED]
    if g.model("expert_count", 0):
        unknown.append(f"{g.arch}.expert_count")
    if unknown:
        raise ConfigError(f"{g.path}: metadata key(s) {sorted(set(unknown))} change the model in a way blocktune "
                          "does not compute; it reads the keys of llama, qwen2 and qwen3 dense models")


def _rope_scaling(g: GGUFFile, head_dim: int, theta: float) -> dict | None:
    kind = g.model("rope.scaling.type", "none")
    if kind in ("none", None) and "rope_freqs.weight" not in g.tensors:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(g.model("rope.scaling.factor"))}
    if kind not in ("none", None):  # yarn: llama.cpp's differs from transformers' in details
        raise ConfigError(f"{g.path}: {g.arch}.rope.scaling.type {kind!r} is not computed here (linear and "
                          "Llama 3's rope_freqs are); prepare the model's Hugging Face folder instead")
    # Llama 3.1+: llama.cpp stores Meta's rule as per-frequency factors (original / scaled)
    factors = torch.from_numpy(np.array(g.tensors["rope_freqs.weight"].data, dtype=np.float64))
    scaling = _llama3_rule(factors, head_dim, theta, int(g.model("rope.scaling.original_context_length", 8192)))
    if scaling is None:
        raise ConfigError(f"{g.path}: rope_freqs are not Llama 3's scaling rule for any setting of it; "
                          "blocktune computes that rule only")
    return scaling


def _llama3_rule(factors: torch.Tensor, head_dim: int, theta: float, original: int) -> dict | None:
    """Llama 3 rope settings that give these per-frequency factors, or None. The rule depends on
    (low, high, original) only through the band of wavelengths it smooths over, so where the file
    does not say `original` the settings are solved from the frequencies inside the band (a line in
    1/wavelength), or placed between the two outer bands when none falls inside."""
    plain = rope_frequencies(head_dim, theta)[0].double()
    x = plain / (2 * torch.pi)  # 1 / wavelength
    factor = float(factors.max())
    rule = {"rope_type": "llama3", "factor": factor}
    tries = [(1.0, 4.0, float(original))]  # Meta's low and high, the file's original length
    mid = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    smooth = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor) if factor > 1 else factors[mid] * 0
    if int(mid.sum()) >= 2:  # smooth = a·x + b, a = original / (high - low), b = -low / (high - low)
        a, b = np.polyfit(x[mid].numpy(), smooth.numpy(), 1)
        tries.append((float(-b * original / a), float((1 - b) * original / a), float(original)))
    elif int(mid.sum()) == 1:
        tries.append((1.0, 4.0, float((smooth[0] * 3 + 1) / x[mid][0])))
    elif factor > 1:
        w_plain, w_scaled = float(1 / x[factors <= 1 + 1e-6].min()), float(1 / x[factors > 1 + 1e-6].max())
        high = max(1.0 + 1e-3, min(4.0, 0.999 * w_scaled / w_plain))
        tries.append((1.0, high, (high * w_plain * w_scaled) ** 0.5))
    for low, high, orig in tries:
        s = {**rule, "low_freq_factor": low, "high_freq_factor": high, "original_max_position_embeddings": orig}
        if torch.allclose(plain / rope_frequencies(head_dim, theta, s)[0].double(), factors, rtol=1e-5, atol=1e-6):
            return s
    return None


def _f32(value: float) -> float:
    """A float32 of the metadata as the decimal it was written from (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


def model_args(g: GGUFFile) -> ModelArgs:
    """The model's fields from the `{arch}.*` metadata and the tensors present."""
    if not by_gguf_arch(g.arch):
        known = sorted({f.gguf_arch for f in FAMILIES.values()})
        raise ConfigError(f"{g.path}: architecture {g.arch!r}; blocktune reads {known}")
    _check_keys(g)
    family = by_gguf_arch(g.arch)[0].name  # llama.cpp runs Mistral as llama: so does the store
    dim, heads = int(g.model("embedding_length")), int(g.model("attention.head_count"))
    head_dim = int(g.model("attention.key_length", dim // heads))
    for key in ("attention.value_length", "rope.dimension_count"):
        if int(g.model(key, head_dim)) != head_dim:
            raise ConfigError(f"{g.path}: {g.arch}.{key} = {g.model(key)} differs from the head size {head_dim} "
                              "(partial rotary or another value size); blocktune computes neither")
    theta = _f32(g.model("rope.freq_base", 10000.0))
    vocab = int(g.tensors["token_embd.weight"].shape[-1])
    kv = int(g.model("attention.head_count_kv", heads))
    eos = [g.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                              "tokenizer.ggml.eom_token_id") if g.get(k) is not None]
    return ModelArgs(
        dim=dim, n_layers=int(g.model("block_count")), n_heads=heads, n_kv_heads=kv if kv != heads else None,
        vocab_size=vocab, norm_eps=_f32(g.model("attention.layer_norm_rms_epsilon")), rope_theta=theta,
        max_seq_len=int(g.model("context_length", 4096)), ffn_dim=int(g.model("feed_forward_length")),
        explicit_head_dim=head_dim if head_dim != dim // heads or dim % heads else None,
        rope_scaling=_rope_scaling(g, head_dim, theta),
        qkv_bias="blk.0.attn_q.bias" in g.tensors, o_bias="blk.0.attn_output.bias" in g.tensors,
        mlp_bias="blk.0.ffn_up.bias" in g.tensors, qk_norm="blk.0.attn_q_norm.weight" in g.tensors,
        tie_embeddings="output.weight" not in g.tensors, bos_token_id=g.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos)), family=family)


def _gguf_names(args: ModelArgs, arch: str) -> dict[str, tuple[str, str]]:
    """GGUF tensor name -> (unit, key in the unit), through gguf's own map of HF names."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], args.n_layers)
    out = {}
    for unit in unit_names(args):
        for key in stored_shapes(args, unit):
            hf = hf_key(meta_key(unit, key))
            name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ConfigError(f"{hf}: gguf's tensor map for {arch} has no name for it")
            out[name] = (unit, key)
    return out


def _dequantize(g: GGUFFile, name: str) -> torch.Tensor:
    import gguf

    t = g.tensors[name]
    shape = [int(d) for d in reversed(t.shape)]  # GGUF lists dimensions fastest first
    kind = t.tensor_type
    if kind == gguf.GGMLQuantizationType.F32:
        out = torch.from_numpy(np.array(t.data, dtype=np.float32))
    elif kind == gguf.GGMLQuantizationType.F16:
        out = torch.from_numpy(np.array(t.data, dtype=np.float16))
    elif kind == gguf.GGMLQuantizationType.BF16:
        out = torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16)
    else:
        try:
            out = torch.from_numpy(gguf.quants.dequantize(t.data, kind))
        except NotImplementedError:
            raise ConfigError(f"{g.path}: tensor {name} is of type {kind.name}, which the gguf package cannot "
                              "dequantize; requantize the file (llama-quantize) to Q8_0, a K-quant or F16") from None
    return out.reshape(shape)


def tensor_types(g: GGUFFile) -> dict[str, int]:
    return dict(collections.Counter(t.tensor_type.name for t in g.reader.tensors))


def read_gguf(path: str | Path) -> tuple[ModelArgs, Callable[[], Iterator[tuple[str, dict]]], GGUFFile]:
    """The model's fields, a generator of its units (one dequantized unit at a time, in the
    store's layout) and the open file."""
    g = GGUFFile(path)
    args = model_args(g)
    names = _gguf_names(args, g.arch)
    halves = by_gguf_arch(g.arch)[0].gguf_rotary == HALVES
    extra = sorted(set(g.tensors) - set(names) - {"rope_freqs.weight", "output.weight"})
    missing = sorted(n for n in names if n not in g.tensors)
    if extra or missing:
        raise StoreError(f"{path}: tensors do not match its metadata: "
                         + "; ".join(filter(None, [extra and f"not read: {extra[:4]}", missing and f"missing: {missing[:4]}"])))
    by_unit: dict[str, list[str]] = collections.defaultdict(list)
    for name, (unit, _) in names.items():
        by_unit[unit].append(name)

    def units() -> Iterator[tuple[str, dict]]:
        for unit in unit_names(args):
            out = {}
            for name in by_unit[unit]:
                key = names[name][1]
                t = _dequantize(g, name)
                heads = rotary_heads(args, key)
                out[key] = from_hf(t, heads) if halves and heads else t
            want = stored_shapes(args, unit)
            got = {k: tuple(v.shape) for k, v in out.items()}
            if got != want:
                raise StoreError(f"{path}: unit {unit} has shapes {got}, its metadata says {want}")
            yield unit, out

    return args, units, g


def _bpe_tokenizer(g: GGUFFile, folder: Path) -> None:
    """tokenizer.json (+ tokenizer_config.json) of a `gpt2` byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    pre = g.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE:
        raise ConfigError(f"{g.path}: tokenizer.ggml.pre {pre!r} is not a pre-tokenizer blocktune knows "
                          f"({sorted(_PRE)}); it would split text differently from llama.cpp")
    tokens = g.get("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in g.get("tokenizer.ggml.merges", [])]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=pre in _IGNORE_MERGES)
    tk = Tokenizer(bpe)
    spec = json.loads(tk.to_str())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": _PRE[pre]}
    tk = Tokenizer.from_str(json.dumps(spec))
    tk.decoder = decoders.ByteLevel()
    types = g.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, k in zip(tokens, types) if k == _CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])
    tk.save(str(folder / "tokenizer.json"))


def _spm_tokenizer(g: GGUFFile, folder: Path) -> None:
    """tokenizer.model of a `llama` (sentencepiece) vocabulary: pieces, scores and types."""
    from sentencepiece import sentencepiece_model_pb2

    tokens, scores = g.get("tokenizer.ggml.tokens"), g.get("tokenizer.ggml.scores")
    types = g.get("tokenizer.ggml.token_type")
    if scores is None or types is None:
        raise ConfigError(f"{g.path}: a sentencepiece vocabulary without tokenizer.ggml.scores or token_type")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = any(k == 6 for k in types)
    proto.trainer_spec.vocab_size = len(tokens)
    for key, field, default in (("unknown_token_id", "unk_id", 0), ("bos_token_id", "bos_id", 1),
                                ("eos_token_id", "eos_id", 2)):
        setattr(proto.trainer_spec, field, int(g.get(f"tokenizer.ggml.{key}", default)))
    proto.trainer_spec.pad_id = int(g.get("tokenizer.ggml.padding_token_id", -1))
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = bool(g.get("tokenizer.ggml.add_space_prefix", True))
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for t, s, k in zip(tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = t, float(s), int(k)
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())


def write_tokenizer(g: GGUFFile, folder: Path) -> tuple[Path, str | None]:
    """The file's tokenizer in a form the store keeps: (path, tokenizer kind for build_store)."""
    model = g.get("tokenizer.ggml.model")
    if model is None:
        raise ConfigError(f"{g.path}: no tokenizer.ggml.model; the file carries no tokenizer")
    tokens = g.get("tokenizer.ggml.tokens")

    def token(key: str) -> str | None:
        i = g.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    if model == "llama":
        _spm_tokenizer(g, folder)
        return folder / "tokenizer.model", None
    if model != "gpt2":
        raise ConfigError(f"{g.path}: tokenizer.ggml.model {model!r}; blocktune reads gpt2 (byte-level BPE) "
                          "and llama (sentencepiece)")
    _bpe_tokenizer(g, folder)
    config = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
              "pad_token": token("padding_token_id"), "unk_token": token("unknown_token_id"),
              "add_bos_token": bool(g.get("tokenizer.ggml.add_bos_token", False)),
              "add_eos_token": bool(g.get("tokenizer.ggml.add_eos_token", False))}
    template = g.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return folder, "hf"


def import_gguf(src: str | Path | tuple, dst: str | Path, dtype: torch.dtype | None = None,
                progress: Callable[[str], None] | None = None,
                note: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> BlockStore:
    """A store from a GGUF file (a path, or what `read_gguf` returned for it), streamed: one
    dequantized unit in memory at a time."""
    args, units, g = src if isinstance(src, tuple) else read_gguf(src)
    types = tensor_types(g)
    quantized = sorted(set(types) - {"F32", "F16", "BF16"})
    if dtype is None:
        wide = collections.Counter(t.tensor_type.name for t in g.reader.tensors if len(t.shape) > 1)
        dtype = torch.float32 if quantized else {"F16": torch.float16, "BF16": torch.bfloat16}.get(
            wide.most_common(1)[0][0], torch.float32)
    if quantized:
        note(f"{g.path.name}: quantized ({', '.join(quantized)}); blocktune fine-tunes its dequantized weights, "
             f"stored in {str(dtype).replace('torch.', '')}" + (" (exact)" if dtype == torch.float32 else ""))
    source = {"format": "gguf", "file": g.path.name, "name": g.get("general.name"), "architecture": g.arch,
              "tensor_types": types}
    with tempfile.TemporaryDirectory(prefix="blocktune-gguf-tok-") as tmp:
        tok, kind = write_tokenizer(g, Path(tmp))
        if kind is None and g.get("tokenizer.chat_template"):
            note(f"{g.path.name}: its chat template is not kept with a sentencepiece tokenizer here")
        return build_store(dst, args, units(), dtype, tokenizer=tok, tokenizer_kind=kind, progress=progress,
                           extra={"source": source})
