"""Text generation over the paged model, with a KV cache: each new token is one pass over the units."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from blocktune.engine.engine import Engine
from blocktune.engine.loss import check_window
from blocktune.errors import ConfigError

__all__ = ["SamplingConfig", "generate_tokens", "sample_next"]


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_new_tokens < 0:
            raise ConfigError("sampling needs temperature >= 0, 0 < top_p <= 1, top_k >= 0, "
                              "max_new_tokens >= 0")


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator) -> torch.Tensor:
    """logits (B, vocab) fp32 -> next tokens (B,)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if cfg.top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > cfg.top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


def generate_tokens(engine: Engine, prompt: list[int], cfg: SamplingConfig,
                    eos_id: int | Iterable[int] | None = None, use_cache: bool = True) -> Iterator[int]:
    """Yield new tokens one at a time (batch of one prompt). Generation stops at `eos_id` (one
    id or several: Llama 3's <|eot_id|> and <|end_of_text|>) and at the model's own EOS ids."""
    limit = engine.args.max_seq_len
    if len(prompt) >= limit:
        raise ConfigError(f"prompt has {len(prompt)} tokens; the model's context is {limit}")
    total = min(limit, len(prompt) + cfg.max_new_tokens)
    check_window(engine.args, total)
    stops = set(engine.args.eos_token_ids)
    stops |= {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
    gen = torch.Generator().manual_seed(cfg.seed)
    tokens = list(prompt)
    caches = engine.new_caches(1, total) if use_cache else None
    start = 0
    while len(tokens) < total:
        if use_cache:
            inp = torch.tensor([tokens[start:]], dtype=torch.long)
            logits = engine.next_logits(inp, caches, start)
            start = len(tokens)
        else:
            logits = engine.next_logits(torch.tensor([tokens], dtype=torch.long), None, 0)
        nxt = int(sample_next(logits, cfg, gen)[0])
        tokens.append(nxt)
        yield nxt
        if cfg.stop_at_eos and nxt in stops:
            return


def stream_text(tokenizer, prompt: list[int], token_iter: Iterator[int],
                emit: Callable[[str], None]) -> list[int]:
    """Decode incrementally: emit only the new suffix of the decoded text. Decoding with the
    prompt in front keeps word boundaries right (sentencepiece drops a leading space)."""
    out: list[int] = []
    shown = tokenizer.decode(prompt)
    for t in token_iter:
        out.append(t)
        text = tokenizer.decode(prompt + out)
        if text.startswith(shown):
            emit(text[len(shown):])
            shown = text
    return out
