"""Files and folders that appear whole or not at all, and never through what stands at their name.

Every file blocktune writes is created under a new name by `open_new` (O_CREAT|O_EXCL|O_NOFOLLOW):
a write never follows a link planted at the name, never lands in a file that exists elsewhere
under another name (a hard link), and never changes the bytes a reader has open. A whole file
appears by `atomic_write` (temp, fsync, rename), a whole folder by `staging_dir` (a hidden
partial folder beside it, locked by its maker, renamed on success; the partials that killed
makers left are found and removed). A write the disk refuses, whichever library made it, is
told apart (`is_write_failure`) and reported with the space left and what is still intact
(`write_failed`).
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from blocktune.errors import StoreError

__all__ = ["ScratchDir", "atomic_write", "is_write_failure", "open_new", "partial_dirs", "readable_size",
           "remove_dead_partials", "staging_dir", "usual_mode", "write_failed"]

_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


def open_new(path: str | Path, flags: int = 0) -> int:
    """An `opener` that creates `path` as a new file (O_EXCL, O_NOFOLLOW; with `flags`'
    O_DIRECT, for direct IO), never writing through what stands at the name. A regular file
    there (an uncommitted version or temp file a killed process left) is unlinked first, so
    its inode, which a reader may still have open, keeps its bytes; a link, folder or any
    other kind of file is a StoreError that names it."""
    flags = _NEW | (flags & getattr(os, "O_DIRECT", 0))
    try:
        return os.open(path, flags, 0o666)  # the umask applies, as open(path, "wb")'s does
    except FileExistsError:
        pass
    kind = os.lstat(path).st_mode
    if not stat.S_ISREG(kind):
        what = "a symbolic link" if stat.S_ISLNK(kind) else "a folder" if stat.S_ISDIR(kind) else "a special file"
        raise StoreError(f"{path}: {what} stands where blocktune writes a new file of its own; nothing "
                         "was written through it. blocktune never writes through links: remove it, then "
                         "run again (the store or run folder is as it was)")
    os.unlink(path)
    try:
        return os.open(path, flags, 0o666)
    except FileExistsError:
        raise StoreError(f"{path}: another process created this file while blocktune was writing it; "
                         "only one blocktune process may write a store or run folder at a time") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | memoryview, *, opener: Callable = open) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one. The
    temp file is made by `open_new` (nothing at its name is written through), and the rename
    replaces a link at `path` itself, never its target."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    f = opener(tmp, "wb", opener=open_new)
    try:
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


_PARTIAL = ".partial-"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def usual_mode(path: Path) -> None:
    """Give a file another library made (safetensors' writer makes them 0600) the mode
    open() gives a new file: 0666 less the umask."""
    os.chmod(path, 0o666 & ~_umask())

_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}
# what a full disk looks like from libraries that write without raising OSError: torch.save's
# zip writer, C++ streams (basic_ios), safetensors' Rust writer
_WRITE_MARKERS = ("No space left", "Disk quota", "File too large", "inline_container.cc", "iostream error",
                  "Errno 28", "Input/output error", " requested and ")  # numpy tofile


def readable_size(nbytes: float) -> str:
    """A size to read in a message: GB from 1 GB up (two decimals), MiB below, so that a small
    difference still shows ("needs 96.0 MiB, 71.3 MiB are free", never "0.1 GB and 0.1 GB")."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 2**20:.1f} MiB"


def is_write_failure(exc: BaseException) -> bool:
    """Whether `exc` is a write that the disk refused (full, over quota, failing), whichever
    library made it."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in _WRITE_ERRNOS
    return isinstance(exc, Exception) and any(m in str(exc) for m in _WRITE_MARKERS)


def write_failed(path: Path, exc: BaseException, kept: str, again: str = "run the command again") -> StoreError:
    """The error for a write to `path` that the disk refused: what failed, the space left,
    what is still intact (`kept`) and how to go on (`again`)."""
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0][:200]
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f"; {readable_size(shutil.disk_usage(where).free)} free there"
    except OSError:
        free = ""
    return StoreError(f"{path}: write failed ({detail}{free}); {kept}; free space or fix the disk, then {again}")


def partial_dirs(dst: Path) -> list[tuple[Path, bool]]:
    """The hidden `.NAME.partial-PID-XXXX` folders that `staging_dir` makes beside `dst`, each
    with whether a live process still writes it (it holds flock on the folder; a name whose pid
    runs is taken as live, since the flock comes a moment after the folder, unless the pid is
    this process's own: a container's processes get the pids killed ones had)."""
    dst = Path(dst)
    out = []
    for p in dst.parent.glob(f".{glob.escape(dst.name)}{_PARTIAL}*"):
        if not p.is_dir() or p.is_symlink():
            continue
        out.append((p, _partial_alive(p)))
    return out


def _partial_alive(p: Path) -> bool:
    try:
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return True  # gone meanwhile, or not ours to judge
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    pid = p.name.rpartition(_PARTIAL)[2].split("-")[0]
    if not pid.isdigit():
        return False  # made before partial folders carried their maker's pid and lock
    if int(pid) == os.getpid():
        return False  # unlocked under this process's own pid: a killed process's that had it (a container's)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # another user's live process
    return True


def remove_dead_partials(dst: Path) -> list[Path]:
    """Remove what killed writers of `dst` left beside it (see `partial_dirs`)."""
    dead = [p for p, alive in partial_dirs(dst) if not alive]
    for p in dead:
        shutil.rmtree(p, ignore_errors=True)
    return dead


class ScratchDir:
    """A hidden folder beside `dst` for what a process needs only while it runs, removed by
    `close`. It is named and locked as `staging_dir`'s partial folders are, so one that a killed
    process left is removed by the next `ScratchDir` or `staging_dir` for `dst`."""

    def __init__(self, dst: Path):
        dst = Path(dst)
        remove_dead_partials(dst)
        self.path = Path(tempfile.mkdtemp(prefix=f".{dst.name}{_PARTIAL}{os.getpid()}-", dir=dst.parent))
        self._held: int | None = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(self._held, fcntl.LOCK_EX)  # released when the descriptor closes, or the process dies

    def close(self) -> None:
        if self._held is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            os.close(self._held)
            self._held = None


@contextmanager
def staging_dir(dst: Path) -> Iterator[Path]:
    """A temp folder beside `dst` that becomes `dst` on success and vanishes on failure. While
    it is written its maker holds flock on it, and its name carries the maker's pid, so that
    the next `staging_dir` for `dst` can remove the ones killed processes left."""
    dst = Path(dst)
    if dst.parent.is_dir():
        remove_dead_partials(dst)
    if dst.exists() and any(dst.iterdir()):
        raise StoreError(f"{dst}: already exists and is not empty; choose a new folder or remove it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    scratch = ScratchDir(dst)
    tmp = scratch.path
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700: the result gets a folder's usual mode
    try:
        try:
            yield tmp
        except Exception as exc:
            if not is_write_failure(exc) or isinstance(exc, StoreError):
                raise
            raise write_failed(dst, exc, f"nothing was written to {dst} (the partial copy is removed)") from exc
        try:
            if dst.exists():
                dst.rmdir()
            os.replace(tmp, dst)
        except OSError as exc:  # ENOTEMPTY: another process (a second prepare, say) got there first
            raise StoreError(f"{dst}: another process filled this folder while this one was being "
                             f"written ({exc.strerror}); nothing of it was changed, and this copy is "
                             "discarded: choose a new folder") from None
        _fsync_dir(dst.parent)
    finally:
        scratch.close()  # nothing is left of it once it has become `dst`
