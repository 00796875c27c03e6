"""`emu` (`--device emu`): the CPU behaving as an accelerator, so that every branch of the
accelerator path runs in the ordinary test run; `emu-mps`: the same CPU behaving as MPS does.

On `emu` units are copied into separate "device" tensors, the host tier and staging buffers
are on, and copies run asynchronously on a copy stream (a thread of its own) that is ordered
only by events, as on CUDA. A missing wait shows up as wrong numbers (a tensor read before its
copy landed, a staging buffer overwritten while a copy still reads it), not as a silent pass.
`emu-mps` has unified memory (no host tier) and a device that only the computing thread may
copy to or from (MPS is not thread-safe); a copy from any other thread is an error.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from blocktune.machine.devices.base import Device

__all__ = ["EmuDevice", "EmuMpsDevice", "EmuStream", "EmuEvent", "emu_registered_bytes"]


class EmuStream:
    """The emulated accelerator's copy stream: work submitted to it runs in order on its own
    thread, concurrently with the compute (the caller's thread)."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="blocktune-emu-copy")

    def submit(self, fn, *args) -> Future:
        return self._pool.submit(fn, *args)


class EmuEvent:
    """Done when everything submitted to its stream before it has run."""

    def __init__(self, future: Future | None = None):
        self._future = future

    def synchronize(self) -> None:
        if self._future is not None:
            self._future.result()

    def query(self) -> bool:
        return self._future is None or self._future.done()


_current = threading.local()  # the stream a thread's copies go to (none: synchronous)

_registered: dict[int, int] = {}  # "page-locked" buffers (registration -> bytes)
_keys = itertools.count()


def emu_registered_bytes() -> int:
    """Host memory the emulated accelerator has registered as page-locked and not released."""
    return sum(_registered.values())


@contextlib.contextmanager
def _current_stream(stream: EmuStream):
    before = getattr(_current, "stream", None)
    _current.stream = stream
    try:
        yield
    finally:
        _current.stream = before


def _copy(fn, *args) -> None:
    """Run a copy now, or on the current copy stream if there is one: then it lands later, and
    whoever reads its destination must wait for an event after it."""
    stream = getattr(_current, "stream", None)
    if stream is None:
        fn(*args)
    else:
        stream.submit(fn, *args)


class EmuDevice(Device):
    type = "emu"
    host_tier_useful = True
    splits_host_ram = True

    @property
    def torch(self) -> torch.device:
        return torch.device("cpu")

    def __str__(self) -> str:
        return "emu"

    def _check_thread(self) -> None:
        """Where copies are allowed (here: on any thread)."""

    def default_dtype(self) -> torch.dtype:
        """fp32: the emulated accelerator computes as the CPU does."""
        return torch.float32

    def register_host(self, buf: torch.Tensor):
        """Counts what it holds as page-locked, keyed by registration, not address (a freed
        buffer's may recur); returns the callable that releases it."""
        key = next(_keys)
        _registered[key] = buf.numel() * buf.element_size()
        return lambda: _registered.pop(key, None)

    def to_device(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A separate "device" tensor, copied on the current copy stream (order it with events)."""
        self._check_thread()
        out = torch.empty(t.shape, dtype=dtype or t.dtype)
        _copy(out.copy_, t)
        return out

    def copy_into(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy `src` into `dst` on the current copy stream (order it with events)."""
        self._check_thread()
        _copy(dst.copy_, src)

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        self._check_thread()
        return t.clone()

    def stream(self, stream):
        return _current_stream(stream) if stream is not None else super().stream(stream)

    def copy_stream(self):
        return EmuStream()

    def record_event(self, stream=None):
        """The compute runs on the calling thread: its work is done; a copy stream's is done
        when what was submitted before the event has run."""
        return EmuEvent(stream.submit(lambda: None) if stream is not None else None)

    def wait_event(self, event) -> None:
        if event is not None:
            event.synchronize()


class EmuMpsDevice(EmuDevice):
    """The emulated accelerator with MPS's memory and thread rules."""

    host_tier_useful = False
    one_copy_thread = True

    def __str__(self) -> str:
        return "emu-mps"

    def _check_thread(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(f"emu-mps: a device copy on thread {threading.current_thread().name!r}; "
                               "on MPS only the computing thread may copy")

    def copy_stream(self):
        return None
