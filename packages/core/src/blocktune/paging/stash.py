"""Stashed block inputs: what the backward recomputes each block from, in RAM up to the
activation budget, spilled to disk past it (and deleted as they are used)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from blocktune.paging.budgets import limit

__all__ = ["ActivationStash"]


class ActivationStash:
    """Cached block inputs for the backward pass: in RAM up to a budget, then spilled to disk."""

    def __init__(self, budget: int | None = None, spill_dir: str | Path | None = None):
        self.budget = limit(budget)
        self._mem: dict[tuple, torch.Tensor] = {}
        self._disk: dict[tuple, Path] = {}
        self._bytes = 0
        self.peak_bytes = 0
        self.spilled_bytes = 0
        self._dir_arg = spill_dir
        self._dir: Path | None = None

    def put(self, key: tuple, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self._bytes + n <= self.budget:
            self._mem[key] = t
            self._bytes += n
            self.peak_bytes = max(self.peak_bytes, self._bytes)
            return
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="blocktune-acts-", dir=self._dir_arg))
        path = self._dir / f"{'_'.join(map(str, key))}.safetensors"
        save_file({"t": t.detach().to("cpu").contiguous()}, str(path))
        self._disk[key] = (path, t.device)
        self.spilled_bytes += n

    def pop(self, key: tuple) -> torch.Tensor:
        if key in self._mem:
            t = self._mem.pop(key)
            self._bytes -= t.numel() * t.element_size()
            return t
        path, device = self._disk.pop(key)
        t = load_file(str(path))["t"].to(device)
        os.unlink(path)
        return t

    def clear(self) -> None:
        self._mem.clear()
        self._disk.clear()
        self._bytes = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
