"""What every device offers — resolve itself, copy, pin, synchronise, save and restore RNG state,
report memory — with the defaults of a device that has nothing asynchronous: copies are plain
`.to`, there are no streams or events, and memory figures are the host's.

A device is one subclass (cpu, cuda, mps, emu and emu-mps): it overrides what differs and says
what it can do through the capabilities below, so that nothing outside this package asks which
kind of device it has.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from blocktune.errors import ConfigError
from blocktune.machine.dtypes import dtype_name, parse_dtype
from blocktune.machine.hostmem import host_memory_free, peak_rss_bytes

__all__ = ["Device"]


@dataclass(frozen=True)
class Device:
    type: ClassVar[str]  # each subclass's kind, as torch names it ("emu" for both emulated devices)
    #: why `--device TYPE` cannot be had here (where `available` can be False)
    missing: ClassVar[str] = ""

    # ---- capabilities: what the device is like, asked by the pager, the budgets and the engine ----
    #: the CPU itself (the emulated devices compute on it too, but as an accelerator would)
    is_cpu: ClassVar[bool] = False
    #: on the CPU, host RAM is the device: no host tier, and the smaller budget bounds residency
    host_is_device: ClassVar[bool] = False
    #: whether a host-RAM copy of units saves anything: not where the device's memory is the
    #: host's (CPU; MPS's unified memory would hold the model twice)
    host_tier_useful: ClassVar[bool] = False
    #: the device's memory is host RAM that a host tier also draws on (the emulated devices):
    #: the budgets give each half of what is free
    splits_host_ram: ClassVar[bool] = False
    #: MPS's rule: only the computing thread may copy to or from the device (its command queues
    #: are not thread-safe)
    one_copy_thread: ClassVar[bool] = False
    #: torch.distributed's backend here: nccl on CUDA, gloo elsewhere (MPS through the CPU)
    dist_backend: ClassVar[str] = "gloo"

    def __new__(cls, *args, **kwargs):
        if cls is Device:
            raise TypeError("Device is the base of the devices: resolve_device(name) makes one "
                            "(or a class of blocktune.machine.devices: CpuDevice(), CudaDevice(0), ...)")
        return super().__new__(cls)

    @property
    def copies_on_any_thread(self) -> bool:
        """Whether threads other than the computing one may copy to and from the device: not
        on MPS (its command queues are not thread-safe), nor on the emulated MPS."""
        return not self.one_copy_thread

    # ---- which device ----
    @classmethod
    def available(cls) -> bool:
        """Whether torch can use this kind of device here."""
        return True

    @classmethod
    def _require(cls) -> None:
        if not cls.available():
            raise ConfigError(f"device {cls.type!r} requested but {cls.missing}; use --device cpu or auto")

    @classmethod
    def open(cls, index: str = "") -> Device:
        """This kind of device, from what `--device` says after a colon (only CUDA reads it);
        an unavailable device is a clear error."""
        cls._require()
        return cls()

    @property
    def torch(self) -> torch.device:
        return torch.device(self.type)

    def __str__(self) -> str:
        return str(self.torch)

    def for_local_rank(self) -> Device:
        """This process's device under torchrun: itself but on CUDA."""
        return self

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
        """bf16 where the device has it (GPUs), else fp16, else fp32."""
        if torch.bfloat16 in self.compute_dtypes:
            return torch.bfloat16
        if torch.float16 in self.compute_dtypes:
            return torch.float16
        return torch.float32

    def auto_dtype(self) -> tuple[torch.dtype, str]:
        """The dtype `--compute-dtype auto` picks here, and why (the log's words)."""
        return self.default_dtype(), "the device's default"

    def resolve_dtype(self, setting: str | None) -> tuple[torch.dtype, str]:
        """The compute dtype a setting means here (None or "": the device's default; "auto": the
        fastest this device computes natively) and the line that says it, checked."""
        if setting == "auto":
            dtype, why = self.auto_dtype()
            said = f"auto: {why}"
        else:
            dtype = parse_dtype(setting) if setting else self.default_dtype()
            said = "asked" if setting else "the device's default"
        self.check_dtype(dtype)
        return dtype, f"compute {dtype_name(dtype)} ({said})"

    def check_dtype(self, dtype: torch.dtype) -> None:
        if dtype not in self.compute_dtypes:
            names = [dtype_name(d) for d in self.compute_dtypes]
            raise ConfigError(
                f"device {self} cannot compute in {dtype_name(dtype)}; it supports {names}"
            )

    # ---- memory and copies ----
    def register_host(self, buf: torch.Tensor):
        """Page-lock `buf` so copies from it are asynchronous DMA; returns the callable that
        releases it. Here nothing to lock."""
        return lambda: None

    def memory_free(self) -> int | None:
        """Bytes the device can still allocate (here the host's); None if unknown."""
        return host_memory_free()

    def local_devices(self) -> int | None:
        """How many devices of this kind the machine has, each a memory of its own that one
        rank under torchrun takes (CUDA: the GPUs); None where every rank on the machine draws
        on the same memory (the CPU's RAM, MPS's unified memory, the emulated devices)."""
        return None

    def scribble(self, buf: torch.Tensor) -> None:
        """Fill device or page-locked memory that is taken again after it was given back with
        garbage, where the device emulates an allocator that makes stale reads show (emu);
        elsewhere a no-op (a real GPU's allocator leaves whatever was there)."""

    def to_device(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Copy to the device, converted to `dtype` on the way, if given."""
        return t.to(self.torch, dtype or t.dtype, non_blocking=False)

    def copy_into(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy host tensor `src` into device tensor `dst`, converted to its dtype."""
        dst.copy_(src, non_blocking=False)

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A device tensor's values in host memory."""
        return t.to("cpu")

    def stream(self, stream):
        """Context that makes `stream` current; here a no-op."""
        return contextlib.nullcontext()

    def record_stream(self, tensors) -> None:
        """Tell the allocator these tensors are in use on the compute stream; here a no-op."""

    def copy_stream(self):
        """A side stream for host→device copies; None where copies are synchronous."""
        return None

    def record_event(self, stream=None):
        """An event after the work submitted so far to `stream` (None: the compute stream);
        None where the work is done when submitted."""
        return None

    def wait_event(self, event) -> None:
        """Make the compute stream wait for work recorded in `event`; here there is none."""

    def synchronize(self) -> None:
        """Wait for all the device's work; here it is done when submitted."""

    def empty_cache(self) -> None:
        """Hand memory the device's allocator caches back to the device (CUDA); here a no-op."""

    def reset_peak_memory(self) -> None:
        """Start `peak_memory_bytes` afresh where the device counts it (CUDA)."""

    def peak_memory_bytes(self) -> int:
        """Peak memory allocated on the device (here the host's RSS)."""
        return peak_rss_bytes()

    def peak_reserved_bytes(self) -> int:
        """Peak memory the device's allocator held (CUDA: reserved, its cache included: what
        the GPU really gave up); where there is no such figure, `peak_memory_bytes`."""
        return self.peak_memory_bytes()

    # ---- RNG: every generator a unit's forward may draw from ----
    def get_rng_state(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.get_rng_state(), self._device_rng_state()

    def set_rng_state(self, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        cpu, dev = state
        torch.set_rng_state(cpu)
        if dev is not None:
            self._set_device_rng_state(dev)

    def _device_rng_state(self) -> torch.Tensor | None:
        """The device's own generator's state, where it has one besides the CPU's."""
        return None

    def _set_device_rng_state(self, state: torch.Tensor) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)  # seeds the CPU and every accelerator's default generator
