"""Who may change a store, and which file versions live readers still need.

    STORE/.lock/writer            the writer lock: flock(LOCK_EX) held by the one process that may
                                  write file versions, commit manifests or delete files; its text
                                  names the holder (pid, host, command, since when)
    STORE/.lock/readers/*.pin     one per open reader: the files of the manifest version it opened,
                                  flock(LOCK_SH) held for as long as it is open
    OUT/.lock/run                 a run folder's writer lock, as the store's: held by the live run
                                  that writes its checkpoint and metrics

Both are OS locks held by an open file descriptor, so the kernel releases them when the process
dies, however it dies: a SIGKILLed writer never leaves a stale lock, and a dead reader's pin is
recognised (its lock can be taken) and removed by the next garbage collection.

Why readers pin rather than lock the store: a full fine-tune commits a step every few seconds and
an `eval` or `export` may take minutes; a shared lock would stop the writer for that long. A pin
costs the writer nothing but disk: garbage collection keeps the files a live pin names, and
deletes them at its first run after the reader has gone.

The reader's protocol leaves no window: read the manifest, pin its files, read the manifest
again; if it changed, pin the new one and try again. The writer replaces the manifest and only
then lists the pins. So if a reader's second read saw the old manifest, its pin existed before
the replace, hence before the writer listed the pins, and the writer keeps its files.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import socket
import stat
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from blocktune.errors import StoreError, StoreLockedError

__all__ = ["LOCK_DIR", "StoreLockedError", "WriterLock", "ReadPin", "pinned_files", "pin_notes"]

LOCK_DIR = ".lock"
_WRITER = "writer"
_RUN = "run"
_READERS = "readers"


def _holder_text() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500],
                       "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")})


def _holder_pid(text: str) -> int | None:
    try:
        return int(json.loads(text)["pid"])
    except (ValueError, KeyError, TypeError):
        return None


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, since {h['since']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet written its name"


def _lock_dir(store: Path, *parts: str) -> Path | None:
    """The lock folder (created); None where the store's folder cannot be written to (a
    read-only mount: then no process can write the store either)."""
    d = Path(store, LOCK_DIR, *parts)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            return None
        raise
    return d


def _take(path: Path) -> tuple[int | None, str]:
    """(the descriptor holding flock(LOCK_EX) on `path`, with this process named in it, "");
    or (None, the holder's text) where another descriptor holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace")
        os.close(fd)
        return None, holder
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder_text().encode(), 0)
    return fd, ""


class WriterLock:
    """The exclusive right to change the store at `store`: `acquire` or a clear error (and,
    by `acquire_run`, to write a run folder)."""

    def __init__(self, fd: int, path: Path):
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, store: str | Path) -> WriterLock:
        d = _lock_dir(store)
        if d is None:
            raise StoreError(f"{store}: the folder is read-only; a store can be written only "
                             "where its folder can be")
        fd, holder = _take(d / _WRITER)
        if fd is None:
            if _holder_pid(holder) == os.getpid():
                raise StoreLockedError(
                    f"{store}: this process already writes this store through another BlockStore "
                    "(an engine that fine-tunes it, say); close that one first")
            raise StoreLockedError(
                f"{store}: another process is writing this store ({_describe_holder(holder)}); "
                "wait for it to finish or stop it, or work on a copy of the store "
                "(`cp -r`), or give each data-parallel rank its own store ('store-{rank}')")
        return cls(fd, d / _WRITER)

    @classmethod
    def acquire_run(cls, out: str | Path) -> WriterLock:
        """The exclusive right to write the run folder `out` (OUT/.lock/run): one live run per
        folder, so a `--resume` beside a live run stops here instead of interleaving its rows."""
        d = _lock_dir(out)
        if d is None:
            raise StoreError(f"{out}: the run folder is read-only; give --out a folder that can be written")
        fd, holder = _take(d / _RUN)
        if fd is None:
            raise StoreLockedError(
                f"{out}: another run is writing this run folder ({_describe_holder(holder)}); "
                "wait for it to finish or stop it (Ctrl-C or SIGTERM), then --resume; or give this "
                "run another --out")
        return cls(fd, d / _RUN)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # no stale name for the next one to read
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


class ReadPin:
    """A live reader's claim on the files of the manifest version it opened."""

    def __init__(self, fd: int, path: Path):
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def create(cls, store: str | Path, files: Iterable[str], step: int) -> ReadPin | None:
        """Pin `files`; None where the store's folder is read-only (nothing can delete them)."""
        d = _lock_dir(store, _READERS)
        if d is None:
            return None
        text = json.dumps({"pid": os.getpid(), "step": step, "files": sorted(files)}).encode()
        for _ in range(100):
            name = f"{os.getpid()}-{secrets.token_hex(6)}"
            tmp = d / f".{name}.tmp"
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                rest = memoryview(text)  # a short write (a full disk) must not leave half a pin
                while len(rest):
                    rest = rest[os.write(fd, rest):]
                path = d / f"{name}.pin"
                os.replace(tmp, path)  # the lock belongs to the file, not the name: it moves with it
                return cls(fd, path)
            except FileNotFoundError:
                # a collector took the unlocked new file for a dead reader's (between the open
                # and the flock): make another
                os.close(fd)
            except BaseException:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
        raise StoreError(f"{d}: could not pin the store's files for reading")

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown: the kernel drops the lock with the process
            pass


def _open_pin(p: Path) -> int | None:
    """A descriptor on the pin file `p`; None for anything blocktune never makes there (a
    folder, a link, a FIFO, a device: ignored, and never opened in a way that could block)."""
    try:
        if not stat.S_ISREG(os.lstat(p).st_mode):
            return None
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # gone meanwhile (released), or swapped for a link
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def _scan_pins(store: str | Path, remove_dead: bool) -> tuple[set[str], list[Path], list[Path]]:
    """(files named by live readers' pins, live pins that cannot be read, other entries)."""
    d = Path(store, LOCK_DIR, _READERS)
    files: set[str] = set()
    unreadable: list[Path] = []
    foreign: list[Path] = []
    if not d.is_dir():
        return files, unreadable, foreign
    for p in d.iterdir():
        fd = _open_pin(p)
        if fd is None:
            if p.exists() or p.is_symlink():
                foreign.append(p)
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live reader
                if p.suffix != ".pin":
                    continue  # still being made: its maker reads the manifest again after
                try:
                    files.update(_pin_files(os.pread(fd, 1 << 24, 0)))
                except (ValueError, KeyError, TypeError):
                    unreadable.append(p)
            else:  # nobody holds it: its reader has gone
                if remove_dead:
                    p.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return files, unreadable, foreign


def _pin_files(raw: bytes) -> list[str]:
    files = json.loads(raw)["files"]
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise TypeError("files is not a list of names")
    return files


def pinned_files(store: str | Path) -> set[str] | None:
    """Every file named by a live reader's pin; dead readers' pins are removed. None if some
    live pin cannot be read: then nothing can be proven unreferenced, and nothing is deleted.
    Entries that are not regular files (a folder, a FIFO, a link) are not pins: ignored."""
    files, unreadable, _ = _scan_pins(store, remove_dead=True)
    return None if unreadable else files


def pin_notes(store: str | Path) -> tuple[set[str], list[str]]:
    """For `verify`, removing nothing: (files live readers keep, one line per oddity in
    STORE/.lock/readers: a live pin that cannot be read, an entry blocktune never makes)."""
    files, unreadable, foreign = _scan_pins(store, remove_dead=False)
    notes = [f"{p}: held open by a live process but not a pin blocktune wrote (its files cannot be "
             "read); garbage collection deletes nothing while it is held: stop the process that "
             f"holds it (`fuser {p}`) or remove the file" for p in unreadable]
    notes += [f"{p}: not a reader's pin (a folder, link or special file); blocktune ignores it: "
              "remove it" for p in foreign]
    return files, notes
