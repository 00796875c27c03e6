"""Settings as users write them, parsed once at the edge: sizes ("4GiB", "inf") into bytes or
None, and the word `auto` (a value worked out from the machine at the start); and back into
the words a config file holds."""

from __future__ import annotations

from blocktune.errors import BudgetError

__all__ = ["AUTO", "parse_bytes", "parse_budget", "size_text", "short_size"]

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


def parse_budget(text: str | int | None) -> int | str | None:
    """'auto' (`AUTO`), or bytes as `parse_bytes` reads them ('4GiB'; None and 'inf': unlimited)."""
    if isinstance(text, str) and text.strip().lower() == AUTO:
        return AUTO
    return parse_bytes(text)


def size_text(value: int | str | None) -> int | str:
    """A parsed size or budget as a config file writes it, read back to the same value by
    `parse_budget`: 'auto', 'inf' (None), whole KiB/MiB/GiB/TiB ('2GiB'), else the bytes."""
    if value is None or value == AUTO:
        return "inf" if value is None else AUTO
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value and value % size == 0:
            return f"{value // size}{unit}"
    return value


def short_size(value: int | None) -> str:
    """A size for a person: 'unlimited', '600 KiB', '512 MiB', '2.5 GiB'."""
    if value is None:
        return "unlimited"
    if value >= 1 << 30:
        return f"{value / (1 << 30):.1f} GiB"
    return f"{value / (1 << 20):,.0f} MiB" if value >= 1 << 20 else f"{value / (1 << 10):,.0f} KiB"
