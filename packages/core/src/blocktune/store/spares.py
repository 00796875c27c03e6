"""Spare files: a full fine-tune's old unit versions, written over by the next ones instead of
deleted and made anew.

Every step of a full fine-tune writes a new version of every unit and of its optimizer state,
and the commit after it leaves the versions before it to garbage collection. Deleted, their
extents are freed, and where the file system discards freed blocks (ext4 mounted `discard`, as
on the cloud VM of 2026-12-08) the disk spends its time trimming them while the next step reads
and writes; made anew, each file's extents are allocated and converted as its direct writes
land. Reading 3 GiB of files while writing 3 GiB on that disk went at 1.2-1.8 GB/s with the
last step's files deleted, and at 2.4 GB/s written over them (`benchmarks/results`).

So the write-back's garbage collection keeps one collected file per unit and kind (weights,
state) as a spare, and `take` hands it to the next write of that unit and kind: renamed to
the new version's name and written over in place, then cut to its size. A spare is only ever a
file garbage collection would have deleted: named by no manifest on disk, by no view of this
process, by no live reader's pin (`blocktune.store.lock`), so no one reads it. Renamed, it is as
invisible as a new file until the commit names it; a process killed in between leaves an
uncommitted version, which the next collection deletes like any other. Spares live only in the
writing process: any other collection deletes them (the run's end included).
"""

from __future__ import annotations

import os
import re
import stat
import threading
from pathlib import Path

__all__ = ["SpareFiles", "version_kind"]

_VERSION = re.compile(r"^(?P<unit>.+)-\d{6,}(?P<kind>\.state)?\.safetensors$")


def version_kind(filename: str) -> str | None:
    """What a file version is a version of, as `unit` or `unit.state` (the names
    `{unit}-{step:06d}[.state].safetensors` that write-back gives them); None for other files."""
    m = _VERSION.match(filename)
    return None if m is None else m["unit"] + (m["kind"] or "")


class SpareFiles:
    """At most one spare per unit and kind, in the store's folder. Thread-safe: the write-back's
    two writer threads take spares side by side."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._spares: dict[str, tuple[str, int, int]] = {}  # kind -> (file name, st_dev, st_ino)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._spares)

    def keep(self, filename: str) -> bool:
        """Keep `filename` (garbage) as its kind's spare, if it is a version and its kind has
        none; False: delete it."""
        kind = version_kind(filename)
        if kind is None:
            return False
        try:
            st = os.lstat(self.folder / filename)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return False
        with self._lock:
            if kind in self._spares:
                return False
            self._spares[kind] = (filename, st.st_dev, st.st_ino)
        return True

    def names(self) -> set[str]:
        with self._lock:
            return {name for name, _, _ in self._spares.values()}

    def take(self, filename: str) -> int | None:
        """A file descriptor open for direct writes on the spare of `filename`'s kind, renamed
        to `filename` (what stood there, a killed process's leftover, is replaced); None where
        there is no spare, the file system does no direct IO, or what is found is not the file
        kept (then the caller makes a new file, as always)."""
        kind = version_kind(filename)
        with self._lock:
            spare = self._spares.pop(kind, None) if kind is not None else None
        if spare is None or not hasattr(os, "O_DIRECT"):
            return None
        name, dev, ino = spare
        path = self.folder / filename
        try:
            st = os.lstat(self.folder / name)
            if (st.st_dev, st.st_ino) != (dev, ino) or not stat.S_ISREG(st.st_mode):
                return None  # something else stands there now: left for the collection
            os.rename(self.folder / name, path)
            fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (dev, ino) or st.st_nlink != 1:  # not the file kept: never written through
            os.close(fd)
            return None
        return fd

    def clear(self) -> list[str]:
        """Forget every spare; their names (garbage now, for the caller to delete)."""
        with self._lock:
            names = [name for name, _, _ in self._spares.values()]
            self._spares.clear()
        return names
