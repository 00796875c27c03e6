"""The compute devices, one class each (cpu, cuda, mps, and emu / emu-mps, the CPU as an
emulated accelerator for tests), and `resolve_device`, which picks one by its `--device` name.

Nothing else in blocktune says "cuda" or "mps": it asks a `Device` (see `base`) to resolve
itself, copy, pin, synchronise, save and restore RNG state, and report memory. A new device is
one new class here and its name in `NAMED`.
"""

from __future__ import annotations

import functools

import torch

from blocktune.errors import ConfigError
from blocktune.machine.devices.base import Device
from blocktune.machine.devices.cpu import CpuDevice
from blocktune.machine.devices.cuda import CudaDevice
from blocktune.machine.devices.emu import EmuDevice, EmuEvent, EmuMpsDevice, EmuStream, emu_registered_bytes
from blocktune.machine.devices.mps import MpsDevice
from blocktune.machine.dtypes import TORCH_NAMES, dtype_name, parse_dtype

__all__ = ["Device", "CpuDevice", "CudaDevice", "MpsDevice", "EmuDevice", "EmuMpsDevice", "EmuStream", "EmuEvent",
           "NAMED", "resolve_device", "fused_adamw", "emu_registered_bytes", "TORCH_NAMES", "parse_dtype", "dtype_name"]

#: `--device` names and their classes
NAMED: dict[str, type[Device]] = {"cpu": CpuDevice, "cuda": CudaDevice, "mps": MpsDevice,
                                  "emu": EmuDevice, "emu-mps": EmuMpsDevice}
_AUTO = (CudaDevice, MpsDevice, CpuDevice)  # what `auto` picks: the first available


def resolve_device(name: str | Device = "auto") -> Device:
    """`auto` picks cuda, then mps, then cpu; an unavailable device is a clear error."""
    if isinstance(name, Device):
        return name
    kind, _, index = str(name).partition(":")
    if kind == "auto":
        return next(cls.open() for cls in _AUTO if cls.available())
    if kind not in NAMED:
        raise ConfigError(f"unknown device {name!r}; choose auto, cpu, cuda[:N], mps (or emu / emu-mps, "
                          "the CPU as an emulated accelerator, for tests)")
    return NAMED[kind].open(index)


@functools.cache
def fused_adamw(device_type: str) -> bool:
    """Whether torch's fused AdamW kernel exists for this (torch) device type in this build."""
    try:
        p = torch.nn.Parameter(torch.zeros(1, device=device_type))
        p.grad = torch.zeros_like(p)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, TypeError, ValueError):
        return False
