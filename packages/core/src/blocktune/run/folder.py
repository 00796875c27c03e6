"""The run folder a run claims: its lock (one live run per folder, `WriterLock.acquire_run`)
and what taking it created, so that a run refused before its first step leaves the disk as it
found it: a folder that was there stays, one the claim made goes, its lock with it."""

from __future__ import annotations

import shutil
from pathlib import Path

from blocktune.store.lock import LOCK_DIR, WriterLock

__all__ = ["RunFolder"]


class RunFolder:
    """The claim on `out`: the lock held, and the topmost folder the claim created (`out`, a
    parent of it such as runs/, or only `out`/.lock), None where it created nothing."""

    def __init__(self, out: Path, lock: WriterLock, made: Path | None):
        self.out, self.lock, self.made = out, lock, made

    @classmethod
    def claim(cls, out: Path) -> RunFolder:
        made = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)
        if made is None and not (out / LOCK_DIR).exists():
            made = out / LOCK_DIR
        return cls(out, WriterLock.acquire_run(out), made)

    def release(self) -> None:
        self.lock.release()

    def refused(self) -> None:
        """The run stopped before its first step: the lock released, and the folders the claim
        made removed where they hold nothing else (a run that wrote its config.toml, having
        claimed a store, keeps its folder: the store names it)."""
        self.lock.release()
        if self.made is None:
            return
        lock_dir = self.out / LOCK_DIR
        if lock_dir.is_dir() and all(p.name == self.lock.path.name for p in lock_dir.iterdir()):
            shutil.rmtree(lock_dir, ignore_errors=True)
        for folder in (self.out, *self.out.parents):
            if not folder.is_relative_to(self.made) or not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()
