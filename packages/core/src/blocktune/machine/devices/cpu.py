"""The CPU as the compute device: host RAM is the device, so a unit's tensors are used where
they are read (converted, if at all, in place of a copy) and nothing is asynchronous."""

from __future__ import annotations

import torch

from blocktune.machine.cpubf16 import cpu_bf16
from blocktune.machine.devices.base import Device

__all__ = ["CpuDevice"]


class CpuDevice(Device):
    type = "cpu"
    is_cpu = True
    host_is_device = True

    def default_dtype(self) -> torch.dtype:
        """fp32: the library's default (the equivalence suite's); `auto` may pick bf16."""
        return torch.float32

    def auto_dtype(self) -> tuple[torch.dtype, str]:
        """bf16 where the processor computes it natively (2-3x fp32's matmul speed), else fp32
        (torch widens bf16 in software there: slower than fp32)."""
        native, why = cpu_bf16()
        return (torch.bfloat16 if native else torch.float32), why

    def to_device(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`t` itself, or converted to `dtype`."""
        dtype = dtype or t.dtype
        return t if t.dtype == dtype else t.to(dtype)
