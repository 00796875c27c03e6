"""Every device branch in one place: cpu, cuda, mps, and `emu`, the emulated accelerator.

Nothing else in blocktune says "cuda" or "mps": it asks a `Device` to resolve itself, copy,
pin, synchronise, save and restore RNG state, and report memory.

`emu` (`--device emu`) is the CPU behaving as an accelerator, so that every branch of the
accelerator path runs in the ordinary test run: units are copied into separate "device"
tensors, the host tier and staging buffers are on, and copies run asynchronously on a copy
stream (a thread of its own) that is ordered only by events, as on CUDA. A missing wait shows
up as wrong numbers (a tensor read before its copy landed, a staging buffer overwritten while
a copy still reads it), not as a silent pass. `emu-mps` is the same CPU behaving as MPS does:
unified memory (no host tier) and a device that only the computing thread may copy to or
from (MPS is not thread-safe); a copy from any other thread is an error.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from blocktune.errors import ConfigError
from blocktune.machine.hostmem import host_memory_free, peak_rss_bytes

__all__ = ["Device", "resolve_device", "fused_adamw", "emu_registered_bytes", "DTYPES", "parse_dtype", "dtype_name"]

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; choose one of bf16, fp16, fp32") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


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


_emu_current = threading.local()  # the stream a thread's copies go to (none: synchronous)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


_emu_registered: dict[int, int] = {}  # emu: "page-locked" buffers (registration -> bytes)
_emu_keys = itertools.count()


def emu_registered_bytes() -> int:
    """Host memory the emulated accelerator has registered as page-locked and not released."""
    return sum(_emu_registered.values())


@dataclass(frozen=True)
class Device:
    type: str  # "cpu" | "cuda" | "mps" | "emu" (the CPU as an emulated accelerator)
    index: int | None = None
    unified: bool = False  # emu only: behave as MPS (one memory, copies on one thread)

    @property
    def torch(self) -> torch.device:
        if self.type == "emu":
            return torch.device("cpu")
        return torch.device(self.type, self.index) if self.index is not None else torch.device(self.type)

    def __str__(self) -> str:
        return "emu-mps" if self.unified else "emu" if self.type == "emu" else str(self.torch)

    @property
    def dist_backend(self) -> str:
        """torch.distributed's backend here: nccl on CUDA, gloo elsewhere (MPS through the CPU)."""
        return "nccl" if self.type == "cuda" else "gloo"

    def for_local_rank(self) -> Device:
        """This process's GPU under torchrun (cuda:LOCAL_RANK, made current); itself elsewhere."""
        if self.type != "cuda" or "LOCAL_RANK" not in os.environ:
            return self
        dev = Device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev.index)
        return dev

    @property
    def host_is_device(self) -> bool:
        """On the CPU, host RAM is the device: no host tier, and the smaller budget bounds residency."""
        return self.type == "cpu"

    @property
    def copies_on_any_thread(self) -> bool:
        """Whether threads other than the computing one may copy to and from the device: not
        on MPS (its command queues are not thread-safe), nor on the emulated MPS."""
        return self.type != "mps" and not self.unified

    def _check_thread(self) -> None:
        if self.unified and threading.current_thread() is not threading.main_thread():
            raise RuntimeError(f"emu-mps: a device copy on thread {threading.current_thread().name!r}; "
                               "on MPS only the computing thread may copy")

    @property
    def is_cpu(self) -> bool:
        return self.type == "cpu"

    # ---- dtypes ----
    @functools.cached_property
    def compute_dtypes(self) -> tuple[torch.dtype, ...]:
        """Dtypes this device really computes in, found by running a small matmul in each."""
        ok = []
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            try:
                a = torch.ones(4, 4, dtype=dt, device=self.torch)
                if float((a @ a).sum()) == 64.0:
                    ok.append(dt)
            except (RuntimeError, TypeError):
                pass
        return tuple(ok)

    def default_dtype(self) -> torch.dtype:
        """bf16 where the device has it (GPUs), else fp32 (CPU bf16 matmuls are slow and lossy;
        the emulated accelerator computes as the CPU does)."""
        if self.type == "emu":
            return torch.float32
        if not self.is_cpu and torch.bfloat16 in self.compute_dtypes:
            return torch.bfloat16
        if not self.is_cpu and torch.float16 in self.compute_dtypes:
            return torch.float16
        return torch.float32

    def check_dtype(self, dtype: torch.dtype) -> None:
        if dtype not in self.compute_dtypes:
            names = [dtype_name(d) for d in self.compute_dtypes]
            raise ConfigError(
                f"device {self} cannot compute in {dtype_name(dtype)}; it supports {names}"
            )

    # ---- memory and copies ----
    def register_host(self, buf: torch.Tensor):
        """Page-lock `buf` (CUDA: cudaHostRegister, exactly its bytes: torch's pinned allocator
        would round it up to a power of two), so copies from it are asynchronous DMA; returns
        the callable that releases it. The emulated accelerator counts what it holds."""
        ptr, nbytes = buf.data_ptr(), buf.numel() * buf.element_size()
        if self.type == "cuda":
            cudart = torch.cuda.cudart()
            err = int(cudart.cudaHostRegister(ptr, nbytes, 0))
            if err:
                raise RuntimeError(f"cudaHostRegister of {nbytes:,} bytes failed (cudaError {err}); "
                                   "lower --host-budget")
            return lambda: cudart.cudaHostUnregister(ptr)
        if self.type == "emu":  # keyed by registration, not address: a freed buffer's may recur
            key = next(_emu_keys)
            _emu_registered[key] = nbytes
            return lambda: _emu_registered.pop(key, None)
        return lambda: None

    def memory_free(self) -> int | None:
        """Bytes the device can still allocate (the host's for the CPU and the emulated device;
        on MPS the working set Metal recommends, less what is allocated); None if unknown."""
        if self.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.torch)
            return free + torch.cuda.memory_reserved(self.torch) - torch.cuda.memory_allocated(self.torch)
        if self.type == "mps":
            rec = getattr(torch.mps, "recommended_max_memory", None)
            return None if rec is None else rec() - torch.mps.driver_allocated_memory()
        return host_memory_free()

    @property
    def host_tier_useful(self) -> bool:
        """Whether a host-RAM copy of units saves anything: not where the device's memory is
        the host's (CPU; MPS's unified memory would hold the model twice)."""
        return self.type == "cuda" or (self.type == "emu" and not self.unified)

    def to_device(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Copy to the device (converted to `dtype` on the way, if given); asynchronous from
        pinned memory and on the emulated accelerator's copy stream (order it with events)."""
        dtype = dtype or t.dtype
        if self.is_cpu:
            return t if t.dtype == dtype else t.to(dtype)
        if self.type == "emu":
            self._check_thread()
            out = torch.empty(t.shape, dtype=dtype)
            stream = getattr(_emu_current, "stream", None)
            if stream is None:
                out.copy_(t)
            else:  # the copy lands later: whoever reads `out` must wait for an event after it
                stream.submit(out.copy_, t)
            return out
        return t.to(self.torch, dtype, non_blocking=self.type == "cuda" and t.is_pinned())

    def copy_into(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy host tensor `src` into device tensor `dst`, converted to its dtype; asynchronous
        as `to_device` (CUDA converts on the GPU: the raw bytes go over, half as many for bf16)."""
        if self.type == "emu":
            self._check_thread()
            stream = getattr(_emu_current, "stream", None)
            if stream is None:
                dst.copy_(src)
            else:  # lands later: whoever reads `dst` must wait for an event after it
                stream.submit(dst.copy_, src)
            return
        async_ = self.type == "cuda" and src.is_pinned()
        if self.type == "cuda" and src.dtype != dst.dtype:
            src = src.to(self.torch, non_blocking=async_)  # on the current stream, freed into it
        dst.copy_(src, non_blocking=async_ or src.device.type == "cuda")

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A device tensor's values in host memory (emu: checked to be on the computing thread)."""
        if self.type == "emu":
            self._check_thread()
            return t.clone()
        return t.to("cpu")

    def stream(self, stream):
        """Context that makes `stream` current (CUDA, emu); a no-op elsewhere."""
        if self.type == "cuda" and stream is not None:
            return torch.cuda.stream(stream)
        if self.type == "emu" and stream is not None:
            return self._emu_stream(stream)
        return contextlib.nullcontext()

    @staticmethod
    @contextlib.contextmanager
    def _emu_stream(stream: EmuStream):
        before = getattr(_emu_current, "stream", None)
        _emu_current.stream = stream
        try:
            yield
        finally:
            _emu_current.stream = before

    def record_stream(self, tensors) -> None:
        if self.type == "cuda":
            current = torch.cuda.current_stream(self.torch)
            for t in tensors:
                t.record_stream(current)

    def copy_stream(self):
        """A side stream for host→device copies (CUDA, emu); None where copies are synchronous."""
        if self.type == "cuda":
            return torch.cuda.Stream(device=self.torch)
        return EmuStream() if self.type == "emu" and not self.unified else None

    def record_event(self, stream=None):
        """An event after the work submitted so far to `stream` (None: the compute stream)."""
        if self.type == "emu":  # the compute runs on the calling thread: its work is done
            return EmuEvent(stream.submit(lambda: None) if stream is not None else None)
        if self.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait_event(self, event) -> None:
        """Make the compute stream wait for work recorded in `event` (no host sync on CUDA)."""
        if event is None:
            return
        if self.type == "emu":
            event.synchronize()
        else:
            torch.cuda.current_stream(self.torch).wait_event(event)

    def synchronize(self) -> None:
        if self.type == "cuda":
            torch.cuda.synchronize(self.torch)
        elif self.type == "mps":
            torch.mps.synchronize()

    def reset_peak_memory(self) -> None:
        if self.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.torch)

    def peak_memory_bytes(self) -> int:
        """Peak memory allocated on the device (host RSS for the CPU)."""
        if self.type == "cuda":
            return torch.cuda.max_memory_allocated(self.torch)
        if self.type == "mps":
            return torch.mps.driver_allocated_memory()
        return peak_rss_bytes()

    def peak_reserved_bytes(self) -> int:
        """Peak memory the device's allocator held (CUDA: reserved, its cache included: what
        the GPU really gave up); where there is no such figure, `peak_memory_bytes`."""
        if self.type == "cuda":
            return torch.cuda.max_memory_reserved(self.torch)
        return self.peak_memory_bytes()

    # ---- RNG: every generator a unit's forward may draw from ----
    def get_rng_state(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        dev = None
        if self.type == "cuda":
            dev = torch.cuda.get_rng_state(self.torch)
        elif self.type == "mps":
            dev = torch.mps.get_rng_state()
        return torch.get_rng_state(), dev

    def set_rng_state(self, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        cpu, dev = state
        torch.set_rng_state(cpu)
        if dev is not None:
            if self.type == "cuda":
                torch.cuda.set_rng_state(dev, self.torch)
            elif self.type == "mps":
                torch.mps.set_rng_state(dev)

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)  # seeds the CPU and every accelerator's default generator


@functools.cache
def fused_adamw(device_type: str) -> bool:
    """Whether torch's fused AdamW kernel exists for this device type in this build."""
    try:
        p = torch.nn.Parameter(torch.zeros(1, device=device_type))
        p.grad = torch.zeros_like(p)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


def resolve_device(name: str | Device = "auto") -> Device:
    """`auto` picks cuda, then mps, then cpu; an unavailable device is a clear error."""
    if isinstance(name, Device):
        return name
    kind, _, index = str(name).partition(":")
    if kind == "auto":
        if torch.cuda.is_available():
            return Device("cuda", 0)
        if _mps_available():
            return Device("mps")
        return Device("cpu")
    if kind == "cpu":
        return Device("cpu")
    if kind == "emu":
        return Device("emu")
    if kind == "emu-mps":
        return Device("emu", unified=True)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but torch sees no CUDA GPU; use --device cpu or auto")
        return Device("cuda", int(index) if index else 0)
    if kind == "mps":
        if not _mps_available():
            raise ConfigError("device 'mps' requested but MPS is not available; use --device cpu or auto")
        return Device("mps")
    raise ConfigError(f"unknown device {name!r}; choose auto, cpu, cuda[:N], mps (or emu / emu-mps, "
                      "the CPU as an emulated accelerator, for tests)")
