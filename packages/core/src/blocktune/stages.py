"""Pipeline stages: several machines, each paging only its share of the units.

Layout. `--stages S` over W = S·D processes: rank r is stage r // D, replica r % D. Stage s
holds a contiguous range of units (stage 0 the embeddings, the last the norm and head), cut so
that the stages' stored bytes are as even as contiguity allows (`split_by_bytes`). Each rank
opens the store (shared, or its own copy) and pages only its own range: its disk reads fall
with S, and where its share fits in RAM the disk leaves the step.

Schedule (`Engine._order`). Each unit is read once per pass, as on one machine. A stage whose
units all fit in its budget keeps them resident and takes each micro-batch through all of them
before the next, passing it on at once (`Pipe.send` is asynchronous): stage s works on
micro-batch m while s+1 works on m-1, GPipe's fill and drain. A stage whose units do not fit is
block-major (every micro-batch through a unit while it is resident): then the stages overlap by
one unit only and work one after another, and what stages buy is IO, each rank reading 1/S of
the model. The time each rank waits on its neighbours is `pipeline_wait_s_by_rank` in the
metrics. Backward is the same in reverse with the gradients of the boundary activations.

Same answer. What crosses a boundary is the activation (compute dtype) and, with it, each
micro-batch's RNG state after the units before it, so every dropout mask is the one a single
process draws, whatever S and D (D enters only as data parallel does: stream m·D + replica).
The loss is summed over every rank (stages without the head add 0); gradients are all-reduced
within a stage's replica group only.

A full fine-tune's stages each write their own store; `merge_stage_stores` (`blocktune
merge-stages`) puts the trained units together into one store for export, eval and generate.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ConfigError, StoreError

__all__ = ["split_by_bytes", "Pipe", "StageSteps", "split_stage_stores", "merge_stage_stores"]


def split_by_bytes(sizes: list[int], stages: int) -> list[tuple[int, int]]:
    """Contiguous ranges [lo, hi) of the units, one per stage, minimising the largest stage's
    bytes (exact: dynamic programming over the cut points; ties go to the earliest cuts)."""
    n = len(sizes)
    if stages < 1:
        raise ConfigError(f"stages={stages}: give at least 1")
    if stages > n:
        raise ConfigError(f"stages={stages} is more than the model's {n} units (embed, blocks, head): "
                          f"give at most {n}")
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    inf = float("inf")
    # best[k][j]: the smallest possible largest stage when the first j units make k stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for j in range(k, n - (stages - k) + 1):
            for i in range(k - 1, j):
                worst = max(best[k - 1][i], prefix[j] - prefix[i])
                if worst < best[k][j]:
                    best[k][j], cut[k][j] = worst, i
    bounds, j = [], n
    for k in range(stages, 0, -1):
        i = cut[k][j]
        bounds.append((i, j))
        j = i
    return bounds[::-1]


@dataclass
class Pipe:
    """Point-to-point sends and receives to the neighbouring stages of this rank's replica."""
    prev: int | None  # global rank of the stage before (None on stage 0)
    next: int | None  # global rank of the stage after (None on the last)
    wire: torch.device  # where tensors travel from: the GPU for nccl, the CPU for gloo
    wait_seconds: float = 0.0  # time spent blocked in a receive: the pipeline's bubble
    _pending: list = field(default_factory=list)

    def send(self, t: torch.Tensor, to: int) -> None:
        import torch.distributed as dist

        buf = t.detach().to(self.wire).contiguous()
        self._pending.append((buf, dist.isend(buf, to)))

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, device: torch.device) -> torch.Tensor:
        import torch.distributed as dist

        buf = torch.empty(shape, dtype=dtype, device=self.wire)
        t0 = time.perf_counter()
        dist.recv(buf, src)
        self.wait_seconds += time.perf_counter() - t0
        return buf.to(device)

    def send_rng(self, state: tuple, to: int) -> None:
        """A device's RNG state (`Device.get_rng_state`: the CPU's, and the accelerator's or None)."""
        self.send(torch.cat([t.reshape(-1) for t in state if t is not None]), to)

    def recv_rng(self, like: tuple, src: int) -> tuple:
        """An RNG state shaped like `like` (this rank's own: the same device type as the sender's)."""
        n = sum(t.numel() for t in like if t is not None)
        flat = self.recv((n,), torch.uint8, src, torch.device("cpu"))
        out, at = [], 0
        for t in like:
            out.append(None if t is None else flat[at:at + t.numel()].clone())
            at += 0 if t is None else t.numel()
        return tuple(out)

    def flush(self) -> None:
        """Wait for every send to complete (their buffers are kept alive until then)."""
        for _, work in self._pending:
            work.wait()
        self._pending.clear()


def merge_stage_stores(pattern: str, world: int, stages: int, out: str | Path) -> Path:
    """One store of the whole model from a staged full fine-tune's per-rank stores (`pattern`
    holds `{rank}`): each unit from replica 0 of the stage that trained it, files hard-linked
    where the disk allows (copied otherwise), tokenizer and extra files from rank 0's store.
    The result is the tuned model at the stores' common step, without optimizer state or a kept
    base (for export, eval and generate); nothing is written into the stores."""
    import json

    from .fileio import atomic_write
    from .records import MANIFEST
    from .store import BlockStore

    _check_layout(pattern, world, stages)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: not empty; give a new folder for the merged store")
    replicas = world // stages
    parts = [BlockStore.open(pattern.replace("{rank}", str(s * replicas))) for s in range(stages)]
    try:
        first = parts[0]
        steps = [p.step for p in parts]
        if len(set(steps)) > 1:
            raise StoreError(f"the stages' stores are at steps {steps}: resume the run (it brings them to "
                             "one step) before merging")
        if any(p.units != first.units or p.args != first.args for p in parts):
            raise StoreError(f"the stores of {pattern!r} are not of one model")
        bounds = split_by_bytes([first.unit_bytes(u) for u in first.units], stages)
        out.mkdir(parents=True, exist_ok=True)
        units = {}
        for s, (lo, hi) in enumerate(bounds):
            for u in first.units[lo:hi]:
                rec = parts[s].manifest["units"][u]
                _link_or_copy(parts[s].path / rec["file"], out / rec["file"])
                units[u] = rec
        small = [f for f in [first.manifest.get("tokenizer"), *first.manifest.get("extra_files", [])] if f]
        for f in small:
            _link_or_copy(first.path / f, out / f)
        manifest = {k: v for k, v in first.manifest.items() if k not in ("base", "previous", "run", "last_step")}
        manifest.update(units=units, state={})
        atomic_write(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    finally:
        for p in parts:
            p.close()
    return out


class StageSteps:
    """The engine's side of a stage: which units are its own, and what crosses its boundaries.
    Mixed into `Engine` (its units, store, dist, dtype and device)."""

    def _stage_range(self) -> tuple[int, int]:
        """This rank's units [lo, hi): all of them, or its pipeline stage's (`blocktune.stages`)."""
        if self.dist.stages == 1:
            return 0, len(self.units)
        if self.store.tied:
            raise ConfigError(f"{self.store.path}: tied embeddings share one matrix between the first "
                              "and the last stage; --stages does not split such a model yet (use "
                              "data parallel: --nproc without --stages)")
        return split_by_bytes([self.store.unit_bytes(u) for u in self.units], self.dist.stages)[self.dist.stage]

    def _arrive(self, xs: list[torch.Tensor], cursors: list, m: int) -> None:
        """On a stage after the first: micro-batch m's activation and RNG state from the stage before."""
        if self.lo == 0:
            return
        pipe, (B, T) = self.dist.pipe, xs[m].shape[:2]
        xs[m] = pipe.recv((B, T, self.args.dim), self.dtype, pipe.prev, self.device.torch)
        cursors[m] = pipe.recv_rng(cursors[m], pipe.prev)

    def _pass_back(self, grads: list, m: int) -> None:
        """On a stage after the first: micro-batch m's gradient w.r.t. this stage's input, to the
        stage before (when that one trains anything below it)."""
        if self.lo > 0 and self._wants_dx(self.lo):
            self.dist.pipe.send(grads[m], self.dist.pipe.prev)


def split_stage_stores(store_path: str | Path, world: int, stages: int, pattern: str) -> list[Path]:
    """A store per rank for a staged full fine-tune (`pattern` holds `{rank}`): every file
    hard-linked to the original (free on one disk; a full fine-tune writes new files, never into
    old ones). Where the disk refuses links (another file system) only the files the rank needs
    are copied: its stage's units, the tokenizer and the manifest; the others' units are left
    out, which is all a rank on its own machine needs. Returns the stores, in rank order."""
    from .records import MANIFEST, manifest_files
    from .store import BlockStore

    _check_layout(pattern, world, stages)
    src = BlockStore.open(store_path)
    try:
        bounds = split_by_bytes([src.unit_bytes(u) for u in src.units], stages)
        files = sorted(manifest_files(src.manifest) - {MANIFEST})
        by_unit = {src.manifest["units"][u]["file"]: u for u in src.units}
        outs = []
        for r in range(world):
            lo, hi = bounds[r // (world // stages)]
            own = set(src.units[lo:hi])
            dst = Path(pattern.replace("{rank}", str(r)))
            if dst.exists() and any(dst.iterdir()):
                raise ConfigError(f"{dst}: not empty; give new folders for the per-rank stores")
            dst.mkdir(parents=True, exist_ok=True)
            for f in files:  # across file systems, the small files and its own units only
                _link_or_copy(src.path / f, dst / f, copy=f not in by_unit or by_unit[f] in own)
            shutil.copy2(src.path / MANIFEST, dst / MANIFEST)
            outs.append(dst)
    finally:
        src.close()
    return outs


def _check_layout(pattern: str, world: int, stages: int) -> None:
    if "{rank}" not in pattern:
        raise ConfigError(f"{pattern!r}: give the per-rank store pattern, with {{rank}}, e.g. 'store-{{rank}}'")
    if world % stages:
        raise ConfigError(f"--stages {stages} must divide the number of ranks ({world})")


def _link_or_copy(src: Path, dst: Path, copy: bool = True) -> None:
    """A hard link to src, or, where the file system refuses one, a copy (when `copy`)."""
    try:
        os.link(src, dst)
    except OSError:
        if copy:
            shutil.copy2(src, dst)
