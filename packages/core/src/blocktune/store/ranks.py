"""Per-rank stores of a staged full fine-tune: split one store into a store per rank (hard
links; only a rank's own files copied across file systems) and merge the trained stages back into
one store (`blocktune split-stages`, `blocktune merge-stages`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from blocktune.dist.pipeline import split_by_bytes
from blocktune.errors import ConfigError, StoreError

__all__ = ["split_stage_stores", "merge_stage_stores"]


def merge_stage_stores(pattern: str, world: int, stages: int, out: str | Path) -> Path:
    """One store of the whole model from a staged full fine-tune's per-rank stores (`pattern`
    holds `{rank}`): each unit from replica 0 of the stage that trained it, files hard-linked
    where the disk allows (copied otherwise), tokenizer and extra files from rank 0's store.
    The result is the tuned model at the stores' common step, without optimizer state or a kept
    base (for export, eval and generate); nothing is written into the stores."""
    from blocktune.store.records import MANIFEST, manifest_bytes
    from blocktune.store.safefiles import atomic_write
    from blocktune.store.store import BlockStore

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
        atomic_write(out / MANIFEST, manifest_bytes(manifest))
    finally:
        for p in parts:
            p.close()
    return out


def split_stage_stores(store_path: str | Path, world: int, stages: int, pattern: str) -> list[Path]:
    """A store per rank for a staged full fine-tune (`pattern` holds `{rank}`): every file
    hard-linked to the original (free on one disk; a full fine-tune writes new files, never into
    old ones). Where the disk refuses links (another file system) only the files the rank needs
    are copied: its stage's units, the tokenizer and the manifest; the others' units are left
    out, which is all a rank on its own machine needs. Returns the stores, in rank order."""
    from blocktune.store.records import MANIFEST, manifest_files
    from blocktune.store.store import BlockStore

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
