"""Datasets: plain text (packed into windows) and rows (`blocktune.run.rows`: prompt/response
pairs with the prompt masked; chats, alpaca and ShareGPT rows rendered in the model's chat
format, `blocktune.formats.chat`, with the loss on the assistant turns only; texts).

A row longer than --seq-len is cut to it; the cuts are counted (`Dataset.cut_rows`,
`Dataset.cut_tokens`) and the run says how many rows and tokens it lost.

The order of examples is a pure function of (seed, global example index), so a resumed run
sees exactly the batches the uninterrupted run would have seen, with no sampler state to save.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from blocktune.engine.loss import IGNORE_INDEX
from blocktune.errors import ConfigError, DataError
from blocktune.formats.chat import ChatFormat, chat_format
from blocktune.formats.tokenizer import Tokenizer
from blocktune.run.rows import Row, read_rows, read_text

__all__ = ["Example", "Dataset", "RowEncoder", "load_dataset", "read_text", "eval_windows", "eval_examples"]

# characters a token may take, generously (the longest pieces of real vocabularies are runs of
# 16-32 spaces or dashes): a row's text past (seq_len + 1) times this cannot reach the example
# and is not tokenized, so a 200 MB response costs what its first tokens do
CHARS_PER_TOKEN = 64


@dataclass
class Example:
    tokens: torch.Tensor  # (T,) inputs
    targets: torch.Tensor  # (T,) next tokens, IGNORE_INDEX where no loss


class Dataset:
    def __init__(self, examples: list[Example], source: str, cut_rows: int = 0, cut_tokens: int = 0):
        if not examples:
            raise DataError(f"{source}: no training examples (is the file empty or shorter "
                            "than one sequence? lower --seq-len or add text)")
        self.examples = examples
        self.source = source
        self.cut_rows, self.cut_tokens = cut_rows, cut_tokens  # rows longer than --seq-len, tokens lost

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


class RowEncoder:
    """Rows into examples of one length: tokens cut to seq_len + 1 and padded (the padding and
    the prompts masked). Counts the rows it cut and the tokens they lost; finds the chat format
    at the first chat row (a model without one is refused only when chats are given)."""

    def __init__(self, tok, seq_len: int, chat_template: str = ""):
        self.tok, self.seq_len, self.chat_template = tok, seq_len, chat_template
        self.pad_id = tok.eos_id if tok.eos_id is not None else 0
        self.cut_rows = self.cut_tokens = 0
        self.dropped: list[str] = []  # rows whose prompt alone fills --seq-len
        self.shapes: Counter[str] = Counter()
        self._chat: ChatFormat | None = None

    def chat(self, where: str) -> ChatFormat:
        if self._chat is None:
            try:
                self._chat = chat_format(self.tok, self.chat_template)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        return self._chat

    def example(self, row: Row) -> Example | None:
        """The row's example; None (counted in `dropped`) where --seq-len leaves it nothing to train on."""
        self.shapes[row.shape] += 1
        row = self._bounded(row)
        if row.messages is not None:
            try:
                ids, trained = self.chat(row.where).tokens(row.messages)
            except DataError as exc:  # the format's refusal of this conversation: which row
                raise DataError(f"{row.where}: {exc}") from None
            if not any(trained):
                raise DataError(f"{row.where}: the conversation has no assistant turn to train on")
        elif row.prompt is not None:
            p = self.tok.encode(row.prompt, bos=True)
            r = self.tok.encode(row.response, bos=False, eos=True)
            ids, trained = p + r, [False] * len(p) + [True] * len(r)  # the loss covers the response only
        else:
            ids = self.tok.encode(row.text, bos=True, eos=True)
            trained = [True] * len(ids)
        return self._fit(ids, trained, row.where)

    def _bounded(self, row: Row) -> Row:
        """The row with each of its texts cut to the characters --seq-len can use
        (`CHARS_PER_TOKEN` a token); what is cut counts as cut by `_fit`."""
        limit = (self.seq_len + 1) * CHARS_PER_TOKEN

        def clip(text):
            return text[:limit] if isinstance(text, str) and len(text) > limit else text

        messages = row.messages and [{**m, "content": clip(m["content"])} if "content" in m else m
                                     for m in row.messages]
        return dataclasses.replace(row, messages=messages, prompt=clip(row.prompt),
                                   response=clip(row.response), text=clip(row.text))

    def _fit(self, ids: list[int], trained: list[bool], where: str) -> Example | None:
        """Inputs ids[:-1] and targets ids[1:] (masked where `trained` is False), cut to seq_len and
        padded (the padding is masked)."""
        keep = self.seq_len + 1
        if not any(trained[1:keep]):  # the prompt alone fills --seq-len
            self.dropped.append(where)
            return None
        if len(ids) > keep:
            self.cut_rows += 1
            self.cut_tokens += len(ids) - keep
        ids, trained = ids[:keep], trained[:keep]
        pad = keep - len(ids)
        inputs = torch.tensor(ids[:-1] + [self.pad_id] * pad, dtype=torch.long)
        targets = torch.tensor([t if m else IGNORE_INDEX for t, m in zip(ids[1:], trained[1:])]
                               + [IGNORE_INDEX] * pad, dtype=torch.long)
        return Example(inputs, targets)

    def encode(self, rows: list[Row], source: str, log) -> list[Example]:
        """Every row's example; `log` hears what was read and what --seq-len cut or left out."""
        examples = [e for e in map(self.example, rows) if e is not None]
        shapes = ", ".join(f"{n} {s}" for s, n in self.shapes.most_common())
        text = f"{source}: {len(rows)} rows ({shapes})"
        if self.cut_rows:
            text += (f"; {self.cut_rows} longer than --seq-len {self.seq_len} were cut, losing "
                     f"{self.cut_tokens} tokens (raise --seq-len to keep them)")
        if self.dropped:
            text += (f"; {len(self.dropped)} left out, their prompt alone filling --seq-len {self.seq_len} "
                     f"({', '.join(self.dropped[:3])}{', ...' if len(self.dropped) > 3 else ''})")
        if not examples:
            raise DataError(f"{text}: no row left; raise --seq-len or shorten the prompts")
        log(f"data: {text}")
        return examples


def _check_lengths(seq_len: int, max_seq_len: int) -> None:
    if seq_len > max_seq_len:
        raise DataError(f"--seq-len {seq_len} exceeds the model's context of {max_seq_len} tokens")
    if seq_len < 2:
        raise DataError(f"--seq-len {seq_len} is too short; use at least 2")


def load_dataset(path: str | Path, tok: Tokenizer, seq_len: int, max_seq_len: int,
                 val_ratio: float = 0.1, chat_template: str = "",
                 log=lambda s: None) -> tuple[Dataset, Dataset | None]:
    """(train, validation) from a text file (split by characters) or a file of rows (split by
    rows, the last ones validate). `log` hears what was read and what --seq-len cut."""
    path = Path(path)
    _check_lengths(seq_len, max_seq_len)
    rows = read_rows(path)
    if isinstance(rows, str):
        return _text_dataset(path, rows, tok, seq_len, val_ratio)
    enc = RowEncoder(tok, seq_len, chat_template)
    examples = enc.encode(rows, str(path), log)
    n_val = int(len(examples) * val_ratio)
    val = Dataset(examples[len(examples) - n_val:], f"{path} (validation)") if n_val else None
    return Dataset(examples[: len(examples) - n_val], str(path), enc.cut_rows, enc.cut_tokens), val


def _text_dataset(path: Path, text: str, tok: Tokenizer, seq_len: int,
                  val_ratio: float) -> tuple[Dataset, Dataset | None]:
    cut = int(len(text) * (1 - val_ratio))
    ids = tok.encode(text[:cut])
    train = _windows(ids, seq_len, seq_len)
    if not train:
        raise DataError(f"{path}: its training part is {len(ids)} tokens, fewer than one sequence "
                        f"of {seq_len + 1}; lower --seq-len or add text")
    val_ex = _windows(tok.encode(text[cut:]), seq_len, seq_len) if val_ratio > 0 else []
    return Dataset(train, str(path)), (Dataset(val_ex, f"{path} (validation)") if val_ex else None)


def eval_examples(path: str | Path, tok, seq_len: int, max_seq_len: int, chat_template: str = "",
                  log=lambda s: None) -> list[Example]:
    """`blocktune eval`'s examples: a text file's windows (`eval_windows`), or every row of a file
    of rows encoded as finetune encodes it (a chat scored on its assistant tokens only)."""
    _check_lengths(seq_len, max_seq_len)
    rows = read_rows(path)
    if isinstance(rows, str):
        windows = eval_windows(tok, rows, seq_len)
        if not windows:
            raise DataError(f"{path}: shorter than one window of {seq_len + 1} tokens")
        return windows
    return RowEncoder(tok, seq_len, chat_template).encode(rows, str(path), log)
