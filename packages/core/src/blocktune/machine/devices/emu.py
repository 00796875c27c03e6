"""`emu` (`--device emu`): the CPU behaving as an accelerator, so that every branch of the
accelerator path runs in the ordinary test run; `emu-mps`: the same CPU behaving as MPS does.

On `emu` units are copied into separate "device" tensors, the host tier and staging buffers
are on, it computes in bf16 by default as CUDA does (the raw bytes go over, the device
converts them), and copies go to a lazy copy stream that is ordered only by events: a copy
lands when an event after it is waited on, no sooner, and memory given back holds NaN when it
is taken again (`scribble`). A missing wait shows up as wrong numbers every time (a tensor read
before its copy landed, a buffer overwritten while a copy still reads it or a unit still views
it), not as a silent pass.
`emu-mps` has unified memory (no host tier) and a device that only the computing thread may
copy to or from (MPS is not thread-safe); a copy from any other thread is an error.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from collections import deque
from collections.abc import Callable

import torch

from blocktune.machine.devices.base import Device

__all__ = ["EmuDevice", "EmuMpsDevice", "EmuStream", "EmuEvent", "emu_registered_bytes"]


class EmuStream:
    """The emulated accelerator's copy stream, as lazy as CUDA may be: work submitted to it
    runs in order, but only when an event after it is waited on (`EmuEvent.synchronize`, the
    compute's `wait_event`) or the device is synchronised — never by itself. A read of a copy's
    destination that no wait orders after the copy sees what was there before (scribbled
    memory: NaN), and a source overwritten before its copy's event was waited on is copied as
    overwritten; so a missing wait gives wrong numbers every time, not now and then."""

    def __init__(self):
        self._pending: deque[tuple[int, Callable, tuple]] = deque()
        self._submitted = 0  # work items submitted so far (the next one's number)
        self._lock = threading.RLock()
        _streams.add(self)

    def submit(self, fn, *args) -> int:
        """Queue `fn(*args)`; returns its number (an event after it waits up to that)."""
        with self._lock:
            self._submitted += 1
            self._pending.append((self._submitted, fn, args))
            return self._submitted

    def run_until(self, number: int) -> None:
        """Land every work item up to `number`, in order, on the calling thread."""
        with self._lock:
            while self._pending and self._pending[0][0] <= number:
                _, fn, args = self._pending.popleft()
                fn(*args)

    def done_until(self, number: int) -> bool:
        with self._lock:
            return not self._pending or self._pending[0][0] > number

    def run_all(self) -> None:
        with self._lock:
            self.run_until(self._submitted)


class EmuEvent:
    """Done when everything submitted to its stream before it has run (which waiting on it
    makes happen); an event of the compute (no stream) is done when recorded."""

    def __init__(self, stream: EmuStream | None = None, number: int = 0):
        self._stream, self._number = stream, number

    def synchronize(self) -> None:
        if self._stream is not None:
            self._stream.run_until(self._number)

    def query(self) -> bool:
        return self._stream is None or self._stream.done_until(self._number)


_current = threading.local()  # the stream a thread's copies go to (none: synchronous)
_streams: weakref.WeakSet[EmuStream] = weakref.WeakSet()  # every copy stream, for `synchronize`

_registered: dict[int, int] = {}  # "page-locked" buffers (registration -> bytes)
_keys = itertools.count()

SCRIBBLE = 0xFF  # the byte memory given back is filled with: NaN in fp32, bf16 and fp16


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
    """Run a copy now, or queue it on the current copy stream if there is one: then it lands
    only when an event after it is waited on."""
    stream = getattr(_current, "stream", None)
    if stream is None:
        fn(*args)
    else:
        stream.submit(fn, *args)


def _raw_then_convert(dst: weakref.ref, src: torch.Tensor) -> None:
    """As on CUDA: the raw bytes go over (into a device buffer of the source's dtype), then the
    device converts them into `dst`. A queued copy holds its destination weakly, as a GPU's holds
    no reference: a device slot whose unit is gone is free for the next, whose copy comes after."""
    out = dst()
    if out is None:  # nothing can read it any more
        return
    raw = torch.empty_like(src, device="cpu")
    raw.copy_(src)
    out.copy_(raw)


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
        """bf16, as CUDA: the accelerator's default path (raw bytes over, converted on the
        device) is what the ordinary test run exercises; fp32 with compute_dtype="fp32"."""
        return torch.bfloat16

    def scribble(self, buf: torch.Tensor) -> None:
        """Memory given back and taken again holds garbage (NaN), as a real allocator's would."""
        if buf.is_floating_point() or buf.dtype == torch.uint8:
            buf.view(torch.uint8).fill_(SCRIBBLE)

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
        self.scribble(out)  # fresh device memory: what a read before the copy lands would see
        _copy(_raw_then_convert, weakref.ref(out), t)
        return out

    def copy_into(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy `src` into `dst` on the current copy stream (order it with events)."""
        self._check_thread()
        _copy(_raw_then_convert, weakref.ref(dst), src)

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        self._check_thread()
        return t.clone()

    def stream(self, stream):
        return _current_stream(stream) if stream is not None else super().stream(stream)

    def copy_stream(self):
        return EmuStream()

    def record_event(self, stream=None):
        """The compute runs on the calling thread: its work is done; a copy stream's is done
        when what was submitted before the event has run (waiting on it runs that)."""
        return EmuEvent(stream, stream.submit(lambda: None)) if stream is not None else EmuEvent()

    def wait_event(self, event) -> None:
        """The compute waits for the copies before `event`: they land now."""
        if event is not None:
            event.synchronize()

    def synchronize(self) -> None:
        """Every copy stream's queued work lands."""
        for stream in list(_streams):
            stream.run_all()


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
