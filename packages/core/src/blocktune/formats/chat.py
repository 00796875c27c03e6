"""Chat data: conversations rendered the way the model was taught to read them.

A row ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` becomes
tokens through the model's own ``chat_template`` (tokenizer_config.json or chat_template.jinja),
rendered with jinja2 in a sandbox set up as transformers sets it up (trim_blocks,
lstrip_blocks, ``raise_exception``, ``tojson``, ``strftime_now``), so the text equals
``apply_chat_template``'s. Models without a template (Llama 2 chat, sentencepiece) get Meta's
``[INST]`` format. The loss covers the assistant turns only (their end-of-turn token included,
so the model learns to stop).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cache
from typing import Any

from blocktune.errors import DataError

__all__ = ["render_chat", "chat_tokens", "check_messages", "prompt_tokens"]

ROLES = ("system", "user", "assistant")


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


def render_chat(tok, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The conversation as the model's chat template writes it."""
    from jinja2.exceptions import TemplateError

    try:
        return _template(tok.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=tok.token_text("bos_token") or "", eos_token=tok.token_text("eos_token") or "")
    except TemplateError as exc:
        raise DataError(f"the model's chat template refused this conversation: {exc}") from None


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
            raise DataError("the Llama-2 chat format needs user and assistant turns alternating, user first")
        turns.append((user["content"], answer["content"] if answer else None))
    return turns


def chat_tokens(tok, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """(token ids, per token: whether it is part of an assistant turn, i.e. trained on)."""
    if getattr(tok, "chat_template", None) and hasattr(tok, "encode_with_offsets"):
        full = render_chat(tok, messages)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = render_chat(tok, messages[:k], add_generation_prompt=True)
            through = render_chat(tok, messages[:k + 1])
            if not (full.startswith(through) and through.startswith(before)):
                raise DataError("the chat template does not render a conversation as the prefix of "
                                "its continuation; the assistant turns cannot be located for the loss")
            spans.append((len(before), len(through)))
        ids, offsets = tok.encode_with_offsets(full)
        mask = [any(a <= s < b for a, b in spans) for s, _ in offsets]
        return ids, mask
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


def prompt_tokens(tok, messages: list[dict[str, str]]) -> list[int]:
    """The tokens that ask the model for its next assistant turn (`generate --chat`)."""
    if getattr(tok, "chat_template", None) and hasattr(tok, "encode_with_offsets"):
        return tok.encode_with_offsets(render_chat(tok, messages, add_generation_prompt=True))[0]
    ids: list[int] = []
    for user, answer in _inst_turns(messages):
        ids += tok.encode(f"{_B_INST} {user.strip()} {_E_INST}", bos=True)
        if answer is not None:
            ids += tok.encode(f" {answer.strip()}", bos=False, eos=True)
    return ids
