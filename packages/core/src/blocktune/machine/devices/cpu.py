"""The CPU as the compute device: host RAM is the device, so a unit's tensors are used where
they are read (converted, if at all, in place of a copy) and nothing is asynchronous."""

from __future__ import annotations

import torch

from blocktune.machine.devices.base import Device

__all__ = ["CpuDevice"]


class CpuDevice(Device):
    type = "cpu"
    is_cpu = True
    host_is_device = True

    def default_dtype(self) -> torch.dtype:
        """fp32: CPU bf16 matmuls are slow and lossy."""
        return torch.float32

    def to_device(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`t` itself, or converted to `dtype`."""
        dtype = dtype or t.dtype
        return t if t.dtype == dtype else t.to(dtype)
