"""The adapters a LoRA run keeps: adapter-step-N.safetensors at each checkpoint, the newest
`keep` of them and the one with the best validation loss, which adapter-best.safetensors also
names. adapters.json lists them (step and validation loss) for `blocktune report` and a resume.

Each is a hard link to the adapter.safetensors the checkpoint wrote (that file is replaced, never
rewritten, at the next checkpoint), so keeping one costs no disk until it is the only name left;
where links cannot be made it is a copy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from blocktune.store.safefiles import atomic_write

__all__ = ["KeptAdapters", "INDEX", "BEST", "kept_adapters"]

INDEX, BEST = "adapters.json", "adapter-best.safetensors"


def _name(step: int) -> str:
    return f"adapter-step-{step}.safetensors"


class KeptAdapters:
    """The run folder's kept adapters: `add` a checkpoint's, `resume` at a step."""

    def __init__(self, out: Path, keep: int):
        self.out, self.keep = out, keep
        self.steps: dict[int, float | None] = {}  # kept step -> its validation loss (None: not validated)

    def resume(self, step: int) -> None:
        """The kept adapters of the run up to `step`, from adapters.json."""
        self.steps = {s: v for s, v in kept_adapters(self.out)["steps"].items() if s <= step}

    @property
    def best(self) -> int | None:
        validated = [(v, s) for s, v in self.steps.items() if v is not None]
        return min(validated)[1] if validated else None

    def add(self, step: int, val_loss: float | None) -> None:
        """Keep adapter.safetensors as step `step`'s, then drop those past the bound."""
        _link(self.out / "adapter.safetensors", self.out / _name(step))
        self.steps[step] = val_loss
        best = self.best
        newest = sorted(self.steps)[-self.keep:] if self.keep else list(self.steps)
        self.steps = {s: v for s, v in self.steps.items() if s in newest or s == best}
        if best == step:
            _link(self.out / _name(step), self.out / BEST)
        index = {"steps": [{"step": s, "val_loss": v, "file": _name(s)} for s, v in sorted(self.steps.items())],
                 "best": None if best is None else {"step": best, "val_loss": self.steps[best], "file": BEST}}
        atomic_write(self.out / INDEX, (json.dumps(index, indent=1) + "\n").encode())
        for path in self.out.glob("adapter-step-*.safetensors"):  # an earlier run's too (--overwrite)
            if path.name not in {_name(s) for s in self.steps}:
                path.unlink(missing_ok=True)


def _link(src: Path, dst: Path) -> None:
    """`dst` names the file `src` names now (a copy where links cannot be made), atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def kept_adapters(out: str | Path) -> dict[str, Any]:
    """adapters.json of a run folder: {"steps": {step: val_loss}, "best": step or None}
    (empty where the run kept none)."""
    try:
        index = json.loads(Path(out, INDEX).read_text())
        steps = {int(e["step"]): e["val_loss"] for e in index["steps"]}
        best = index["best"]["step"] if index.get("best") else None
    except (OSError, ValueError, KeyError, TypeError):
        return {"steps": {}, "best": None}
    return {"steps": steps, "best": best}
