"""Datasets: plain text (packed into windows), JSONL prompt/response pairs (prompt masked) and
JSONL chats (`{"messages": [...]}`, rendered with the model's chat template, loss on the
assistant turns only: `blocktune.formats.chat`).

The order of examples is a pure function of (seed, global example index), so a resumed run
sees exactly the batches the uninterrupted run would have seen, with no sampler state to save.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from blocktune.engine.loss import IGNORE_INDEX
from blocktune.errors import DataError
from blocktune.formats.chat import chat_tokens, check_messages
from blocktune.formats.tokenizer import Tokenizer

__all__ = ["Example", "Dataset", "load_dataset", "read_text", "eval_windows"]


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 (bad byte 0x{raw[exc.start]:02x} at byte {exc.start}, "
                        f"line {line}); convert it, e.g. `iconv -f latin1 -t utf-8`") from None


@dataclass
class Example:
    tokens: torch.Tensor  # (T,) inputs
    targets: torch.Tensor  # (T,) next tokens, IGNORE_INDEX where no loss


class Dataset:
    def __init__(self, examples: list[Example], source: str):
        if not examples:
            raise DataError(f"{source}: no training examples (is the file empty or shorter "
                            "than one sequence? lower --seq-len or add text)")
        self.examples = examples
        self.source = source

    def __len__(self) -> int:
        return len(self.examples)

    def index(self, seed: int, g: int) -> int:
        """The example at global position `g`: epoch-wise permutations of a fixed seed."""
        n = len(self.examples)
        epoch, pos = divmod(g, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        return int(perm[pos])

    def batch(self, seed: int, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        ex = [self.examples[self.index(seed, first + b)] for b in range(size)]
        return torch.stack([e.tokens for e in ex]), torch.stack([e.targets for e in ex])


def _windows(ids: list[int], seq_len: int, stride: int) -> list[Example]:
    out = []
    for s in range(0, len(ids) - seq_len, stride):
        w = torch.tensor(ids[s:s + seq_len + 1], dtype=torch.long)
        out.append(Example(w[:-1], w[1:]))
    return out


def eval_windows(tok: Tokenizer, text: str, seq_len: int) -> list[Example]:
    """`blocktune eval`'s windows: BOS + text, no EOS, consecutive non-overlapping T+1 windows."""
    return _windows(tok.encode(text, bos=True, eos=False), seq_len, seq_len + 1)


def _example(ids: list[int], trained: list[bool], seq_len: int, pad_id: int, where: str) -> Example:
    """Inputs ids[:-1] and targets ids[1:] (masked where `trained` is False), cut to seq_len and
    padded (the padding is masked)."""
    ids, trained = ids[: seq_len + 1], trained[: seq_len + 1]
    if not any(trained[1:]):
        raise DataError(f"{where}: no trained token within --seq-len {seq_len} (the prompt fills it); "
                        "raise --seq-len or shorten the prompt")
    pad = seq_len + 1 - len(ids)
    inputs = torch.tensor(ids[:-1] + [pad_id] * pad, dtype=torch.long)
    targets = torch.tensor([t if m else IGNORE_INDEX for t, m in zip(ids[1:], trained[1:])]
                           + [IGNORE_INDEX] * pad, dtype=torch.long)
    return Example(inputs, targets)


def _jsonl(path: Path, text: str, tok: Tokenizer, seq_len: int) -> list[Example]:
    out = []
    pad_id = tok.eos_id if tok.eos_id is not None else 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not JSON ({exc})") from None
        if isinstance(row, dict) and "messages" in row:
            ids, trained = chat_tokens(tok, check_messages(row["messages"], where))
            out.append(_example(ids, trained, seq_len, pad_id, where))
            continue
        try:
            prompt, response = row["prompt"], row["response"]
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise TypeError("prompt and response must be strings")
        except (KeyError, TypeError) as exc:
            raise DataError(f"{where}: expected {{\"prompt\": str, \"response\": str}} or "
                            f"{{\"messages\": [...]}} ({exc})") from None
        p = tok.encode(prompt, bos=True)
        r = tok.encode(response, bos=False, eos=True)
        if len(p) >= seq_len + 1:
            raise DataError(f"{where}: the prompt alone has {len(p)} tokens, no room for the "
                            f"response within --seq-len {seq_len}")
        # the loss covers response tokens only
        out.append(_example(p + r, [False] * len(p) + [True] * len(r), seq_len, pad_id, where))
    return out


def load_dataset(path: str | Path, tok: Tokenizer, seq_len: int, max_seq_len: int,
                 val_ratio: float = 0.1) -> tuple[Dataset, Dataset | None]:
    """(train, validation) from a .txt file (split by characters) or a .jsonl file (by rows)."""
    path = Path(path)
    if seq_len > max_seq_len:
        raise DataError(f"--seq-len {seq_len} exceeds the model's context of {max_seq_len} tokens")
    if seq_len < 2:
        raise DataError(f"--seq-len {seq_len} is too short; use at least 2")
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: the dataset file is empty")
    if path.suffix == ".jsonl":
        rows = _jsonl(path, text, tok, seq_len)
        n_val = int(len(rows) * val_ratio)
        val = Dataset(rows[len(rows) - n_val:], f"{path} (validation)") if n_val else None
        return Dataset(rows[: len(rows) - n_val], str(path)), val
    cut = int(len(text) * (1 - val_ratio))
    ids = tok.encode(text[:cut])
    train = _windows(ids, seq_len, seq_len)
    if not train:
        raise DataError(f"{path}: its training part is {len(ids)} tokens, fewer than one sequence "
                        f"of {seq_len + 1}; lower --seq-len or add text")
    val_ex = _windows(tok.encode(text[cut:]), seq_len, seq_len) if val_ratio > 0 else []
    return Dataset(train, str(path)), (Dataset(val_ex, f"{path} (validation)") if val_ex else None)
