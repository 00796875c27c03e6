"""Tokenizers, behind one interface, with the checks a user's files need.

Three kinds, each through the library its models ship for:

- ``sentencepiece``: Llama 2 and Mistral's ``tokenizer.model``;
- ``hf``: a Hugging Face ``tokenizer.json`` through the `tokenizers` library, with
  ``tokenizer_config.json`` for BOS/EOS, whether BOS is added (Qwen adds none) and the chat
  template (Llama 3.x, Qwen2.5, Qwen3, recent Mistral);
- ``tiktoken``: Meta-layout Llama 3's ``tokenizer.model`` (base64 ranks), through `tiktoken`.

Every kind answers ``encode(text, bos, eos)``, ``decode(ids)``, ``token_id(text)``, ``bos_id``
(None where the model has none), ``eos_ids`` (generation stops at any), ``special_ids``,
``vocab_size`` and ``chat_template`` (None where the tokenizer carries none).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blocktune.errors import ConfigError

__all__ = ["Tokenizer", "HFTokenizer", "TiktokenTokenizer", "load_tokenizer", "detect_kind",
           "TOKENIZER_KINDS", "TOKENIZERS", "HF_TOKENIZER_FILES"]

TOKENIZER_KINDS = ("sentencepiece", "hf", "tiktoken")
# the files of a Hugging Face tokenizer (and generation settings) kept beside a store
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "chat_template.jinja", "chat_template.json", "generation_config.json")


class Tokenizer:
    """Llama 2's sentencepiece model."""

    kind = "sentencepiece"

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"{self.path}: tokenizer.model not found")
        self.sp = spm.SentencePieceProcessor()
        try:  # from bytes: a path sentencepiece cannot encode (a non-UTF-8 byte) reads as well
            self.sp.Load(model_proto=self.path.read_bytes())
        except (OSError, RuntimeError) as exc:
            raise ConfigError(f"{self.path}: not a sentencepiece model ({exc})") from exc
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.eos_ids = frozenset([self.eos_id])
        self.chat_template: str | None = None
        self.special_ids = frozenset(i for i in (self.bos_id, self.eos_id) if i >= 0)

    def token_id(self, text: str) -> int | None:
        """The id of the piece `text`, None where the vocabulary lacks it."""
        i = self.sp.piece_to_id(text)
        return i if self.sp.id_to_piece(i) == text else None

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, without BOS and EOS. An id past the tokenizer's pieces (a model whose
        vocabulary is padded beyond its tokenizer's can sample one) has no text and is left out,
        as Hugging Face's tokenizers leave it (sentencepiece raised IndexError: a traceback out of
        `blocktune generate`)."""
        n = self.sp.vocab_size()
        return self.sp.decode([i for i in ids if 0 <= i < n and i not in (self.bos_id, self.eos_id)])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A `tokenizer.json` (the `tokenizers` library), as transformers' fast tokenizer uses it."""

    kind = "hf"

    def __init__(self, folder: str | Path, eos_ids: tuple[int, ...] = ()):
        from tokenizers import Tokenizer as RustTokenizer

        self.folder = Path(folder)
        path = self.folder / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found")
        try:
            self.tk = RustTokenizer.from_file(str(path))
        except Exception as exc:  # the library raises plain Exceptions for a bad file
            raise ConfigError(f"{path}: not a tokenizers file ({exc})") from exc
        cfg_path = self.folder / "tokenizer_config.json"
        cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
        self.config = cfg

        def token_id(key: str) -> int | None:
            text = _token_text(cfg.get(key))
            if text is None:
                return None
            tid = self.tk.token_to_id(text)
            if tid is None:
                raise ConfigError(f"{cfg_path}: {key} {text!r} is not a token of {path.name}")
            return tid

        self.bos_id = token_id("bos_token")
        self.eos_id = token_id("eos_token")
        self.pad_id = token_id("pad_token")
        # whether encoding adds BOS: the config says so, or the post-processor does it
        probe = self.tk.encode("", add_special_tokens=True).ids
        added = probe[:1] if probe else []
        if "add_bos_token" in cfg:
            self.add_bos = bool(cfg["add_bos_token"]) and self.bos_id is not None
        else:
            self.add_bos = self.bos_id is not None and added == [self.bos_id]
        self.add_eos = bool(cfg.get("add_eos_token", False)) and self.eos_id is not None
        self.eos_ids = frozenset(i for i in (self.eos_id, *eos_ids) if i is not None)
        self.chat_template = _chat_template(self.folder, cfg)
        self.special_ids = frozenset(i for i, t in self.tk.get_added_tokens_decoder().items() if t.special)

    def token_id(self, text: str) -> int | None:
        """The id of the token `text` (a special token's text too), None where there is none."""
        return self.tk.token_to_id(text)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """`bos`/`eos`: add them where this model's tokenizer does (Qwen adds no BOS)."""
        ids = self.tk.encode(text, add_special_tokens=False).ids
        head = [self.bos_id] if bos and self.add_bos else []
        tail = [self.eos_id] if eos and self.eos_id is not None else []
        return head + ids + tail

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` as it stands (special tokens in it parsed, nothing added) and each
        token's (start, end) character offsets."""
        enc = self.tk.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=True)

    def token_text(self, key: str) -> str | None:
        return _token_text(self.config.get(key))


def _chat_template(folder: Path, cfg: dict[str, Any]) -> str | None:
    """The chat template where transformers keeps it: chat_template.jinja (transformers 5),
    chat_template.json, or tokenizer_config.json's `chat_template`."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return _read_json(folder / "chat_template.json").get("chat_template")
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):  # named templates: the default one
        tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
    return tpl


# Meta's Llama 3 tokenizer (as llama-models 0.3 defines it): the split pattern and special tokens
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                   "<|image|>"]
# Meta's chat format for Llama 3 (ChatFormat: a header per message, <|eot_id|> after each)
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
_LLAMA3_RESERVED = 256


class TiktokenTokenizer:
    """Meta-layout Llama 3: `tokenizer.model` holds base64 BPE ranks, read by `tiktoken`."""

    kind = "tiktoken"

    def __init__(self, path: str | Path):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        self.path = Path(path)
        try:
            ranks = load_tiktoken_bpe(str(self.path))
        except Exception as exc:
            raise ConfigError(f"{self.path}: not a tiktoken BPE file ({exc})") from exc
        n = len(ranks)
        special = _LLAMA3_SPECIAL + [f"<|reserved_special_token_{2 + i}|>"
                                     for i in range(_LLAMA3_RESERVED - len(_LLAMA3_SPECIAL))]
        self.special = {t: n + i for i, t in enumerate(special)}
        self.enc = tiktoken.Encoding(self.path.name, pat_str=_LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self.special)
        self.bos_id = self.special["<|begin_of_text|>"]
        self.eos_id = self.special["<|end_of_text|>"]
        self.eos_ids = frozenset({self.eos_id, self.special["<|eot_id|>"], self.special["<|eom_id|>"]})
        self.chat_template = LLAMA3_CHAT_TEMPLATE
        self.special_ids = frozenset(self.special.values())

    def token_id(self, text: str) -> int | None:
        """The id of the special token `text`, or of the one-token text `text`; None otherwise."""
        if text in self.special:
            return self.special[text]
        ids = self.enc.encode(text, disallowed_special=())
        return ids[0] if len(ids) == 1 else None

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.enc.encode(text, disallowed_special=())
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` with its special tokens parsed, and each token's character span."""
        ids = self.enc.encode(text, allowed_special="all")
        _, starts = self.enc.decode_with_offsets(ids)
        return ids, list(zip(starts, starts[1:] + [len(text)]))

    def token_text(self, key: str) -> str | None:
        return {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}.get(key)

    def decode(self, ids: list[int]) -> str:
        specials = set(self.special.values())
        return self.enc.decode([i for i in ids if i not in specials])


TOKENIZERS = {"sentencepiece": Tokenizer, "hf": HFTokenizer, "tiktoken": TiktokenTokenizer}  # kind -> class


def detect_kind(path: Path) -> str:
    """sentencepiece or tiktoken, for a file named tokenizer.model (a protobuf vs base64 lines)."""
    head = path.read_bytes()[:256]
    try:
        first = head.decode("ascii").splitlines()[0].split()
        import base64

        base64.b64decode(first[0], validate=True)
        int(first[1])
        return "tiktoken"
    except (UnicodeDecodeError, IndexError, ValueError):
        return "sentencepiece"


def load_tokenizer(store) -> Tokenizer | HFTokenizer | TiktokenTokenizer:
    """The store's tokenizer (checked against the checksums it recorded), or a clear error."""
    path = store.tokenizer_path
    if path is None:
        raise ConfigError(f"{store.path}: the store has no tokenizer (prepare it from a folder that "
                          "holds tokenizer.model or tokenizer.json)")
    kind = store.manifest.get("tokenizer_kind", "sentencepiece")
    if kind == "hf":
        for name in HF_TOKENIZER_FILES:
            if (store.path / name).exists():
                store.check_small_file(name)
        return HFTokenizer(store.path, store.args.eos_token_ids)
    if kind == "tiktoken":
        return TiktokenTokenizer(path)
    if kind != "sentencepiece":
        raise ConfigError(f"{store.path}: tokenizer kind {kind!r} unknown (a newer blocktune's store?)")
    return Tokenizer(path)
