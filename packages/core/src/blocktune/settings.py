"""Settings as users write them, parsed once at the edge: sizes ("4GiB", "inf") into bytes or
None, and the word `auto` (a value worked out from the machine at the start)."""

from __future__ import annotations

from blocktune.errors import BudgetError

__all__ = ["AUTO", "parse_bytes"]

AUTO = "auto"  # a budget worked out from the machine at the start (blocktune.paging.budgets)


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}


def parse_bytes(text: str | int | float | None) -> int | None:
    """'4GiB' -> 4294967296; None and 'inf' mean unlimited."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    s = text.strip().lower().replace(" ", "")
    if s in ("inf", "none", "unlimited"):
        return None
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        return int(float(num) * _UNITS[unit])
    except (ValueError, KeyError):
        raise BudgetError(f"cannot read the size {text!r}; write it like 512MiB, 4GiB or 2GB") from None
