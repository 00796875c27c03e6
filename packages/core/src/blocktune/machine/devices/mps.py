"""Apple's GPU (MPS): unified memory (no host tier: it would hold the model twice), Metal's
figures for memory, its own RNG, and command queues that only the computing thread may use."""

from __future__ import annotations

import torch

from blocktune.machine.devices.base import Device

__all__ = ["MpsDevice"]


class MpsDevice(Device):
    type = "mps"
    missing = "MPS is not available"
    one_copy_thread = True

    @classmethod
    def available(cls) -> bool:
        mps = getattr(torch.backends, "mps", None)
        return bool(mps and mps.is_available())

    def memory_free(self) -> int | None:
        """The working set Metal recommends, less what is allocated; None if unknown."""
        rec = getattr(torch.mps, "recommended_max_memory", None)
        return None if rec is None else rec() - torch.mps.driver_allocated_memory()

    def synchronize(self) -> None:
        torch.mps.synchronize()

    def peak_memory_bytes(self) -> int:
        return torch.mps.driver_allocated_memory()

    # ---- RNG ----
    def _device_rng_state(self) -> torch.Tensor:
        return torch.mps.get_rng_state()

    def _set_device_rng_state(self, state: torch.Tensor) -> None:
        torch.mps.set_rng_state(state)
