"""The run's record as it is written, a step at a time: one row per step appended to
metrics.jsonl, its scalars for TensorBoard, the figure redrawn at checkpoints, the progress line
(how they are read back and drawn: `blocktune.run.report`)."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

from blocktune.errors import StoreError
from blocktune.run.report import Progress, ScalarLog, plot_run
from blocktune.store.safefiles import atomic_write

__all__ = ["RunRecord"]


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW, 0o666)


class RunRecord:
    """The rows of a run, from `history` (the rows of the steps before `start`, written again
    as metrics.jsonl) on. Only the process that `writes` touches the run folder; every process
    keeps the rows."""

    def __init__(self, out: Path, history: list[dict], *, start: int, steps: int, writes: bool,
                 tensorboard: bool, plot: bool, progress: bool, progress_every: float,
                 log: Callable[[str], None]):
        self.out, self.history, self.writes, self.plot, self.log = out, history, writes, plot, log
        self.path = out / "metrics.jsonl"
        if writes:
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in history).encode())
        self.scalars = ScalarLog(out, tensorboard and writes, start, log=log)
        self.bar = Progress(steps, start, desc="finetune", enabled=progress and writes, every=progress_every)

    def add(self, row: dict, checkpoint: bool) -> None:
        """A step's row; at a `checkpoint` the scalars are flushed and the figure redrawn."""
        self.history.append(row)
        if self.writes:
            try:
                with open(self.path, "a", opener=_no_follow) as f:  # a link swapped in is not followed
                    f.write(json.dumps(row) + "\n")
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                raise StoreError(f"{self.path}: a symbolic link stands where the run appends its metrics; "
                                 "nothing was written through it. Remove it, then --resume (the checkpoint "
                                 "is intact)") from None
            self.scalars.add(row)
            if checkpoint:
                self.scalars.flush()
                if self.plot:
                    plot_run(self.out, self.history, log=self.log)
        self.bar.update(1, loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}",
                        read=f"{row['gb_read']:.2f}GB", wrote=f"{row['gb_written']:.2f}GB")

    def close(self) -> None:
        self.bar.close()
        self.scalars.close()
