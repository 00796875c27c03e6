"""Data files into rows, read by extension and content: the shapes of data that TRL's
`SFTTrainer` and torchtune's dataset builders take.

A file is one of
- ``.txt`` (also ``.text``, ``.md``): plain text, packed into windows by `blocktune.run.data`;
- ``.jsonl``, a ``.json`` array, ``.parquet`` or a folder written by `datasets`' ``save_to_disk``:
  rows, each one of the shapes in `ROW_SHAPES`.

Each row becomes a `Row`: a prompt and its response, a chat (``messages``), or a text. Anything
else (a ``.csv``, a JSON object, a row of unknown keys) is refused, naming the file, the row
and the formats understood; nothing is read as text by default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blocktune.errors import DataError
from blocktune.formats.chat import check_messages

__all__ = ["Row", "read_rows", "read_text", "TEXT_SUFFIXES", "ROW_SHAPES", "FORMATS"]

TEXT_SUFFIXES = (".txt", ".text", ".md")
ROW_SHAPES = ('{"prompt", "response"} (or "completion")', '{"messages": [{"role", "content"}]}',
              'alpaca {"instruction", "input", "output"}', 'ShareGPT {"conversations": [{"from", "value"}]}',
              '{"text"}')
FORMATS = (f"{'/'.join(TEXT_SUFFIXES)} (text); .jsonl, a .json array, .parquet or a `datasets` folder "
           f"(save_to_disk) of rows: {', '.join(ROW_SHAPES)}")
DATA_EXTRA = "pip install 'blocktune-core[data]'"
# ShareGPT's speakers (torchtune's ShareGPTToMessages, plus the chat roles themselves)
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool"}


@dataclass(frozen=True)
class Row:
    """One training example as the file gives it: exactly one of `messages`, `prompt` (with
    `response`) or `text` is set. `where` names it in errors (file:line, or file[row])."""

    where: str
    shape: str  # the name of the row's format, for the data summary
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    response: str | None = None
    text: str | None = None


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


def _strings(row: dict, where: str, *keys: str) -> list[str]:
    bad = [k for k in keys if not isinstance(row.get(k), str)]
    if bad:
        raise DataError(f"{where}: {', '.join(repr(k) for k in bad)} must be a string, got "
                        f"{', '.join(type(row.get(k)).__name__ for k in bad)}")
    return [row[k] for k in keys]


def _sharegpt(turns: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(turns, list):
        raise DataError(f"{where}: \"conversations\" must be a list of {{\"from\", \"value\"}}")
    out = []
    for i, t in enumerate(turns):
        speaker = t.get("from", t.get("role")) if isinstance(t, dict) else None
        text = t.get("value", t.get("content")) if isinstance(t, dict) else None
        if speaker not in _SHAREGPT_ROLES or not isinstance(text, str):
            raise DataError(f"{where}: turn {i} must be {{\"from\": one of {sorted(_SHAREGPT_ROLES)}, "
                            f"\"value\": str}}, got {json.dumps(t)[:80]}")
        out.append({"role": _SHAREGPT_ROLES[speaker], "content": text})
    return check_messages(out, where)


def to_row(row: Any, where: str) -> Row:
    """A row of any of the ROW_SHAPES, or a DataError that names the row and the shapes."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}; rows are "
                        f"{', '.join(ROW_SHAPES)}")
    if "messages" in row:
        return Row(where, "messages", messages=check_messages(row["messages"], where))
    if "conversations" in row:
        return Row(where, "sharegpt", messages=_sharegpt(row["conversations"], where))
    if "instruction" in row and "output" in row:
        instruction, output = _strings(row, where, "instruction", "output")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: 'input' must be a string, got {type(extra).__name__}")
        # the instruction and its input as the user's turn, the output as the assistant's
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Row(where, "alpaca", messages=[{"role": "user", "content": user},
                                              {"role": "assistant", "content": output}])
    if "prompt" in row and ("response" in row or "completion" in row):
        answer = "response" if "response" in row else "completion"
        prompt, response = _strings(row, where, "prompt", answer)
        return Row(where, "prompt/response", prompt=prompt, response=response)
    if "text" in row:
        return Row(where, "text", text=_strings(row, where, "text")[0])
    raise DataError(f"{where}: a row with keys {sorted(row)[:8]} is none of the formats understood: "
                    f"{', '.join(ROW_SHAPES)}")


def _jsonl(path: Path, text: str) -> list[Row]:
    rows = []
    # lines end at "\n" alone: str.splitlines() would also split inside a string at U+2028,
    # U+0085 and the like, which JSON allows unescaped
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not JSON ({exc})") from None
        rows.append(to_row(value, f"{path}:{n}"))
    return rows


def _json(path: Path, text: str) -> list[Row]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        first = text.lstrip().split("\n", 1)[0]
        if exc.msg == "Extra data" and first.startswith("{"):
            return _jsonl(path, text)  # JSON Lines under a .json name
        raise DataError(f"{path}: not JSON ({exc})") from None
    if not isinstance(value, list):
        keys = f" with keys {sorted(value)[:8]}" if isinstance(value, dict) else ""
        raise DataError(f"{path}: a JSON {type(value).__name__}{keys}, not an array of rows; blocktune "
                        f"reads {FORMATS}")
    return [to_row(v, f"{path}[{i}]") for i, v in enumerate(value)]


def _parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow, in the `data` extra: {DATA_EXTRA}") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow's errors (ArrowInvalid, OSError) for a file it cannot read
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    return [to_row(v, f"{path}[{i}]") for i, v in enumerate(table.to_pylist())]


def _saved_dataset(path: Path) -> list[Row]:
    """A folder `datasets`' save_to_disk wrote: one Dataset, or a DatasetDict (its train split)."""
    if not any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(f"{path}: a folder, but not one `datasets` saved (no state.json or "
                        f"dataset_dict.json); blocktune reads {FORMATS}")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a saved `datasets` folder needs `datasets`, in the `data` "
                        f"extra: {DATA_EXTRA}") from None
    data = datasets.load_from_disk(str(path))
    name = str(path)
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (it has {sorted(data)}); "
                            "save the split to train on with save_to_disk")
        data, name = data["train"], f"{path}[train]"
    return [to_row(v, f"{name}[{i}]") for i, v in enumerate(data)]


def read_rows(path: str | Path) -> list[Row] | str:
    """The file's rows, or its text for a text file (TEXT_SUFFIXES)."""
    path = Path(path)
    if path.is_dir():
        return _saved_dataset(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        if not path.is_file():
            raise DataError(f"{path}: dataset file not found")
        return _parquet(path)
    if suffix not in TEXT_SUFFIXES + (".jsonl", ".json"):
        what = "not found, and its" if not path.exists() else "its"
        raise DataError(f"{path}: {what} extension {suffix or '(none)'!r} is not a data format blocktune "
                        f"reads; it reads {FORMATS}")
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: the dataset file is empty")
    if suffix in TEXT_SUFFIXES:
        return text
    return _jsonl(path, text) if suffix == ".jsonl" else _json(path, text)
