"""An NVIDIA GPU: page-locked host buffers, copies on a side stream ordered by events, the
caching allocator's figures, its own RNG, and one GPU per process under torchrun."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from blocktune.machine.devices.base import Device

__all__ = ["CudaDevice"]


@dataclass(frozen=True)
class CudaDevice(Device):
    index: int | None = None
    type = "cuda"
    missing = "torch sees no CUDA GPU"
    host_tier_useful = True
    dist_backend = "nccl"

    @classmethod
    def available(cls) -> bool:
        return torch.cuda.is_available()

    @classmethod
    def open(cls, index: str = "") -> CudaDevice:
        cls._require()
        return cls(int(index) if index else 0)

    @property
    def torch(self) -> torch.device:
        return torch.device("cuda", self.index) if self.index is not None else torch.device("cuda")

    def for_local_rank(self) -> CudaDevice:
        """This process's GPU under torchrun (cuda:LOCAL_RANK, made current); itself elsewhere."""
        if "LOCAL_RANK" not in os.environ:
            return self
        dev = CudaDevice(int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev.index)
        return dev

    # ---- memory and copies ----
    def register_host(self, buf: torch.Tensor):
        """Page-lock `buf` (cudaHostRegister, exactly its bytes: torch's pinned allocator would
        round it up to a power of two), so copies from it are asynchronous DMA; returns the
        callable that releases it."""
        ptr, nbytes = buf.data_ptr(), buf.numel() * buf.element_size()
        cudart = torch.cuda.cudart()
        err = int(cudart.cudaHostRegister(ptr, nbytes, 0))
        if err:
            raise RuntimeError(f"cudaHostRegister of {nbytes:,} bytes failed (cudaError {err}); "
                               "lower --host-budget")
        return lambda: cudart.cudaHostUnregister(ptr)

    def memory_free(self) -> int | None:
        free, _ = torch.cuda.mem_get_info(self.torch)
        return free + torch.cuda.memory_reserved(self.torch) - torch.cuda.memory_allocated(self.torch)

    def local_devices(self) -> int:
        """The GPUs this process can see: one per rank (`for_local_rank`)."""
        return torch.cuda.device_count()

    def to_device(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Copy to the GPU (converted to `dtype` on the way, if given); asynchronous from
        pinned memory (order it with events)."""
        return t.to(self.torch, dtype or t.dtype, non_blocking=t.is_pinned())

    def copy_into(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy host tensor `src` into device tensor `dst`, converted to its dtype; asynchronous
        from pinned memory. Converted on the GPU: the raw bytes go over, half as many for bf16."""
        async_ = src.is_pinned()
        if src.dtype != dst.dtype:
            src = src.to(self.torch, non_blocking=async_)  # on the current stream, freed into it
        dst.copy_(src, non_blocking=async_ or src.device.type == "cuda")

    def stream(self, stream):
        return torch.cuda.stream(stream) if stream is not None else super().stream(stream)

    def record_stream(self, tensors) -> None:
        current = torch.cuda.current_stream(self.torch)
        for t in tensors:
            t.record_stream(current)

    def copy_stream(self):
        return torch.cuda.Stream(device=self.torch)

    def record_event(self, stream=None):
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait_event(self, event) -> None:
        """Make the compute stream wait for work recorded in `event` (no host sync)."""
        if event is not None:
            torch.cuda.current_stream(self.torch).wait_event(event)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.torch)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.torch)

    def peak_memory_bytes(self) -> int:
        return torch.cuda.max_memory_allocated(self.torch)

    def peak_reserved_bytes(self) -> int:
        return torch.cuda.max_memory_reserved(self.torch)

    # ---- RNG ----
    def _device_rng_state(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.torch)

    def _set_device_rng_state(self, state: torch.Tensor) -> None:
        torch.cuda.set_rng_state(state, self.torch)
