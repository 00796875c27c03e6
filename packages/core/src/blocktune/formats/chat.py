"""Chat data: conversations rendered the way the model was taught to read them.

A row ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}``
becomes tokens through a `ChatFormat`: the model's own ``chat_template`` (tokenizer_config.json
or chat_template.jinja), or one the user names with ``--chat-template`` (a jinja file, or a
format by name: `NAMED_FORMATS`), rendered with jinja2 in a sandbox set up as transformers sets
it up (trim_blocks, lstrip_blocks, ``raise_exception``, ``tojson``, ``strftime_now``), so the
text equals ``apply_chat_template``'s. Meta's own formats need no template: Llama 2's
sentencepiece stores get Meta's ``[INST]`` format, Llama 3's tiktoken stores Meta's header
format. A Hugging Face tokenizer without a template is refused, as transformers refuses it: its
model (a base model) was never taught a chat format, and guessing one trains the wrong one.
The loss covers the assistant turns only (their end-of-turn token included, so the model
learns to stop).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

from blocktune.errors import ConfigError, DataError
from blocktune.formats.tokenizer import LLAMA3_CHAT_TEMPLATE

__all__ = ["ChatFormat", "chat_format", "render_chat", "chat_tokens", "check_messages", "prompt_tokens",
           "NAMED_FORMATS"]

ROLES = ("system", "user", "assistant", "tool")

# formats by name, for a model whose tokenizer carries no template (their special tokens must be
# in its vocabulary): ChatML (Qwen, SmolLM), Meta's Llama 3 headers, Meta's Llama 2 [INST]
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
NAMED_FORMATS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "chatml": (CHATML_TEMPLATE, ("<|im_start|>", "<|im_end|>")),
    "llama3": (LLAMA3_CHAT_TEMPLATE, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "llama2": (None, ()),  # Meta's [INST] format, written by code (no special tokens beyond BOS/EOS)
}


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be {{\"role\": one of {list(ROLES)}, "
                            f"\"content\": str}}, got {json.dumps(m)[:80]}")
    return messages


@cache
def _template(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False, ensure_ascii=False: json.dumps(
        x, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


_B_INST, _E_INST = "[INST]", "[/INST]"
_B_SYS, _E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def _inst_turns(messages: list[dict[str, str]]) -> list[tuple[str, str | None]]:
    """Meta's Llama-2 chat format: (user turn with any system prompt folded in, answer) pairs."""
    msgs = list(messages)
    if msgs[0]["role"] == "system":
        if len(msgs) < 2 or msgs[1]["role"] != "user":
            raise DataError("a system message must be followed by a user message")
        msgs = [{"role": "user", "content": _B_SYS + msgs[0]["content"] + _E_SYS + msgs[1]["content"]}] + msgs[2:]
    turns = []
    for i in range(0, len(msgs), 2):
        user = msgs[i]
        answer = msgs[i + 1] if i + 1 < len(msgs) else None
        if user["role"] != "user" or (answer is not None and answer["role"] != "assistant"):
            raise DataError("the Llama-2 chat format needs user and assistant turns alternating, user "
                            "first (it has no tool turns)")
        turns.append((user["content"], answer["content"] if answer else None))
    return turns


class ChatFormat:
    """How one model writes a conversation: a jinja `template` rendered as transformers renders
    it, or (template None) Meta's Llama-2 [INST] format. `name` says which, in messages."""

    def __init__(self, tok, template: str | None, name: str):
        if template is not None and not hasattr(tok, "encode_with_offsets"):
            raise ConfigError(f"{name}: a jinja chat template needs a tokenizer.json or tiktoken store to "
                              "locate the assistant turns; this sentencepiece store takes --chat-template llama2")
        self.tok, self.template, self.name = tok, template, name

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as the template writes it."""
        from jinja2.exceptions import TemplateError

        if self.template is None:
            raise ConfigError(f"{self.name}: Meta's [INST] format is written as tokens, not text")
        try:
            text = _template(self.template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.tok.token_text("bos_token") or "", eos_token=self.tok.token_text("eos_token") or "")
        except TemplateError as exc:
            raise DataError(f"the chat template ({self.name}) refused this conversation: {exc}") from None
        if any(m["role"] == "tool" and m["content"] not in text for m in messages):
            raise DataError(f"a tool turn, and the chat template ({self.name}) has no tool role (it "
                            "leaves the turn out); give one that has with --chat-template FILE")
        return text

    def tokens(self, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
        """(token ids, per token: whether it is part of an assistant turn, i.e. trained on)."""
        if self.template is None:
            return _inst_tokens(self.tok, messages)
        full = self.render(messages)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:k], add_generation_prompt=True)
            through = self.render(messages[:k + 1])
            if not (full.startswith(through) and through.startswith(before)):
                raise DataError(f"the chat template ({self.name}) does not render a conversation as the "
                                "prefix of its continuation; the assistant turns cannot be located for the loss")
            spans.append((len(before), len(through)))
        ids, offsets = self.tok.encode_with_offsets(full)
        mask = [any(a <= s < b for a, b in spans) for s, _ in offsets]
        return ids, mask

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The tokens that ask the model for its next assistant turn (`generate --chat`)."""
        if self.template is None:
            return _inst_tokens(self.tok, messages)[0]
        return self.tok.encode_with_offsets(self.render(messages, add_generation_prompt=True))[0]

    def stop_ids(self) -> frozenset[int]:
        """Generation stops at the tokenizer's EOS and at the special token that ends an
        assistant turn in this template (<|im_end|> where a base model's EOS is <|endoftext|>)."""
        if self.template is None:
            return frozenset(self.tok.eos_ids)
        turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        text = self.render(turn)
        tail = text[text.rindex("Hello") + len("Hello"):]
        ids = self.tok.encode_with_offsets(tail)[0]
        special = [i for i in ids if i in self.tok.special_ids]
        return frozenset(self.tok.eos_ids) | frozenset(special[:1])


def _inst_tokens(tok, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    mask: list[bool] = []
    for user, answer in _inst_turns(messages):
        p = tok.encode(f"{_B_INST} {user.strip()} {_E_INST}", bos=True)
        ids += p
        mask += [False] * len(p)
        if answer is not None:
            r = tok.encode(f" {answer.strip()}", bos=False, eos=True)
            ids += r
            mask += [True] * len(r)
    return ids, mask


def _named(tok, name: str) -> ChatFormat:
    template, needs = NAMED_FORMATS[name]
    missing = [t for t in needs if tok.token_id(t) is None]
    if missing:
        raise ConfigError(f"--chat-template {name}: its tokens {missing} are not in this model's vocabulary; "
                          "give the model's own format as a jinja file (--chat-template FILE)")
    return ChatFormat(tok, template, name)


def chat_format(tok, option: str = "") -> ChatFormat:
    """The chat format: `option` (--chat-template: a name in NAMED_FORMATS or a jinja file), else
    the tokenizer's own template, else Meta's [INST] for a sentencepiece (Llama 2) store; a
    Hugging Face tokenizer without one is refused with the fix."""
    if option in NAMED_FORMATS:
        return _named(tok, option)
    if option:
        path = Path(option)
        if not path.is_file():
            raise ConfigError(f"--chat-template {option!r}: neither a file nor a format name "
                              f"({', '.join(NAMED_FORMATS)})")
        try:
            return ChatFormat(tok, path.read_text(encoding="utf-8"), str(path))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--chat-template {path}: not readable as text ({exc})") from None
    if tok.chat_template:
        return ChatFormat(tok, tok.chat_template, "the model's chat template")
    if tok.kind == "sentencepiece":
        return ChatFormat(tok, None, "Meta's Llama 2 [INST] format")
    raise ConfigError(
        "chat rows need a chat format, and this model's tokenizer has no chat_template (a base model? "
        "transformers' apply_chat_template refuses it too); give one with --chat-template FILE (a jinja "
        f"template, as tokenizer_config.json holds it) or by name: {', '.join(NAMED_FORMATS)}")


def render_chat(tok, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The conversation as the model's chat template writes it."""
    return chat_format(tok).render(messages, add_generation_prompt)


def chat_tokens(tok, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """(token ids, trained-on mask) in the model's own chat format (`ChatFormat.tokens`)."""
    return chat_format(tok).tokens(messages)


def prompt_tokens(tok, messages: list[dict[str, str]]) -> list[int]:
    """The tokens that ask the model for its next assistant turn, in its own chat format."""
    return chat_format(tok).prompt(messages)
