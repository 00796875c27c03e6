"""The run's record, as people read it: a figure, TensorBoard scalars, a summary, progress lines.

    RUN/
      metrics.jsonl   one JSON row per step (the source of everything below)
      config.toml     the resolved config
      loss.png        training and validation loss, learning rate, tokens/s, GB moved per step
      events.out.tfevents.*   the same scalars for `tensorboard --logdir runs`

matplotlib and tensorboard are optional (`pip install blocktune-core[plot]`): without them a run
says so in one line and goes on. Everything here can be redrawn from `metrics.jsonl` alone, for
a run that was killed too (`blocktune report RUN`).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from blocktune.run.keptadapters import BEST, kept_adapters

__all__ = ["read_metrics", "summarize", "draw_run", "save_figure", "plot_run", "ScalarLog",
           "Progress", "SCALARS"]

# metrics.jsonl field -> TensorBoard tag
SCALARS = {"loss": "train/loss", "val_loss": "val/loss", "lr": "train/lr",
           "tokens_per_s": "perf/tokens_per_s", "gb_read": "io/gb_read", "gb_written": "io/gb_written",
           "peak_rss_gb": "memory/peak_rss_gb", "peak_device_gb": "memory/peak_device_gb",
           "peak_device_reserved_gb": "memory/peak_device_reserved_gb", "device_slots_gb": "memory/device_slots_gb"}


def read_metrics(path: str | Path, upto: int | None = None, log=None) -> list[dict]:
    """Rows of a metrics.jsonl, at most one per step (the last written wins: a resumed run
    re-logs the steps after its checkpoint). A line that is not a row is skipped, and `log`
    (stderr by default) hears which: the last one cut by a kill, or a damaged one."""
    path = Path(path)
    if not path.is_file():
        return []
    rows: dict[int, dict] = {}
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    bad = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            row = False
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            if upto is None or row["step"] <= upto:
                rows[row["step"]] = row
        elif row is not None:
            bad.append(n)
    if bad:
        cut = [bad.pop()] if bad[-1] == len(lines) else []  # no newline after it: a write a kill cut
        parts = [f"damaged line(s) {', '.join(map(str, bad[:8]))}{' …' if len(bad) > 8 else ''} (not "
                 "metrics rows)"] if bad else []
        parts += [f"line {cut[0]}, cut short by a kill"] if cut else []
        (log or (lambda m: print(m, file=sys.stderr)))(f"note: {path}: skipped {'; '.join(parts)}")
    return [rows[s] for s in sorted(rows)]


def _config(run: Path) -> dict[str, Any]:
    try:
        return tomllib.loads((run / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def summarize(run: str | Path) -> dict[str, Any]:
    """What a run did, from its folder: steps, losses, speed, bytes moved, memory, budgets."""
    run = Path(run)
    rows = read_metrics(run / "metrics.jsonl")
    cfg = _config(run)
    vals = [(r["step"], r["val_loss"]) for r in rows if isinstance(r.get("val_loss"), (int, float))]
    best = min(vals, key=lambda v: v[1]) if vals else None
    out: dict[str, Any] = {
        "run": str(run), "store": cfg.get("store"), "method": cfg.get("method"),
        "steps_done": rows[-1]["step"] if rows else 0, "steps_planned": cfg.get("steps"),
        "first_loss": rows[0]["loss"] if rows else None, "last_loss": rows[-1]["loss"] if rows else None,
        "best_val_loss": best[1] if best else None, "best_val_step": best[0] if best else None,
        "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows) if rows else None,
        "gb_read": sum(r.get("gb_read", 0.0) for r in rows),
        "gb_written": sum(r.get("gb_written", 0.0) for r in rows),
        "seconds": sum(r.get("seconds", 0.0) for r in rows),
        "peak_rss_gb": max((r["peak_rss_gb"] for r in rows if "peak_rss_gb" in r), default=None),
        "peak_device_gb": max((r["peak_device_gb"] for r in rows if "peak_device_gb" in r), default=None),
        "peak_device_reserved_gb": max((r["peak_device_reserved_gb"] for r in rows
                                        if "peak_device_reserved_gb" in r), default=None),
        "budgets": {k: cfg[k] for k in ("device_budget", "host_budget", "activation_budget",
                                        "keep_activations", "spill_activations") if k in cfg},
    }
    kept = kept_adapters(run)  # a LoRA run's adapter-step-N files and the best validated one
    out["adapters"] = {"steps": sorted(kept["steps"]), "best_step": kept["best"],
                       "best": str(run / BEST) if kept["best"] is not None else None}
    out["finished"] = bool(rows) and out["steps_planned"] is not None and out["steps_done"] >= out["steps_planned"]
    return out


def format_summary(s: dict[str, Any]) -> str:
    def num(v, fmt):
        return "—" if v is None else format(v, fmt)

    state = "finished" if s["finished"] else "stopped early (resume with --resume)" if s["steps_done"] else "no steps"
    lines = [
        f"run       {s['run']}  ({s['method'] or '?'} fine-tune of {s['store'] or '?'})",
        f"steps     {s['steps_done']} of {s['steps_planned'] if s['steps_planned'] is not None else '?'}: {state}",
        f"loss      {num(s['first_loss'], '.4f')} -> {num(s['last_loss'], '.4f')}; best validation "
        f"{num(s['best_val_loss'], '.4f')}" + (f" at step {s['best_val_step']}" if s["best_val_step"] else ""),
        f"speed     {num(s['median_tokens_per_s'], '.0f')} tokens/s (median), {s['seconds']:.1f} s of steps",
        f"moved     {s['gb_read']:.2f} GB read, {s['gb_written']:.2f} GB written",
        f"memory    peak RSS {num(s['peak_rss_gb'], '.2f')} GB"
        + (f", device {s['peak_device_gb']:.2f} GB allocated" if s["peak_device_gb"] is not None else "")
        + (f", {s['peak_device_reserved_gb']:.2f} GB reserved" if s.get("peak_device_reserved_gb") is not None else ""),
        "budgets   " + (", ".join(f"{k} {v}" for k, v in s["budgets"].items()) or "—"),
    ]
    kept = s.get("adapters") or {}
    if kept.get("steps"):
        lines.append("adapters  adapter-step-N.safetensors of steps " + ", ".join(map(str, kept["steps"]))
                     + (f"; best validation: {kept['best']} (step {kept['best_step']})" if kept["best"] else ""))
    return "\n".join(lines)


def _model(store: str | None) -> str:
    """'6 layers, dim 192, 3.6M params, fp32' from the store's manifest ('' if unreadable)."""
    from blocktune.model.args import ModelArgs

    try:
        m = json.loads(Path(store or "", "manifest.json").read_text())
        args = ModelArgs(**m["model"])
        return f"{args.n_layers} layers, dim {args.dim}, {args.n_params() / 1e6:,.1f}M params, {m['dtype']}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _title(cfg: dict[str, Any]) -> str:
    store = cfg.get("store") or "?"
    model = _model(cfg.get("store"))
    method = cfg.get("method", "?")
    if method == "lora" and "lora_rank" in cfg:
        method = f"LoRA r={cfg['lora_rank']} on {'/'.join(cfg.get('lora_targets', []))}"
    budgets = ", ".join(f"{k.replace('_budget', '')} {cfg[k]}" for k in ("device_budget", "host_budget")
                        if k in cfg)
    return (f"{Path(store).name}" + (f" ({model})" if model else "") + f"\n{method}"
            + (f"; budgets: {budgets}" if budgets else ""))


def draw_run(rows: list[dict], title: str = ""):
    """A matplotlib Figure of a run: loss (training and validation) on top, then learning rate,
    tokens/s and GB moved per step. None without matplotlib."""
    try:  # a Figure without pyplot: no GUI backend, no global state
        from matplotlib.figure import Figure
    except ImportError:
        return None
    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(9, 8.5), dpi=100, layout="constrained")
    grid = fig.add_gridspec(3, 2, height_ratios=[2.2, 1, 1])
    ax = fig.add_subplot(grid[0, :])
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", lw=1.4, label="training loss")
    val = [(r["step"], r["val_loss"]) for r in rows if isinstance(r.get("val_loss"), (int, float))]
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", lw=1.4, ms=4, label="validation loss")
    losses = [r["loss"] for r in rows] + [v for _, v in val]
    finite = [v for v in losses if math.isfinite(v)]
    if finite:  # start the axis below the lowest loss, not at 0: a fall to 3.2 must not read as one to 0
        lo, hi = min(finite), max(finite)
        pad = 0.05 * (hi - lo or abs(hi) or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy, nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    panels = [(grid[1, 0], "learning rate", [("lr", "tab:green", "lr")]),
              (grid[1, 1], "tokens / s", [("tokens_per_s", "tab:purple", "tokens/s")]),
              (grid[2, :], "GB per step", [("gb_read", "tab:red", "read"), ("gb_written", "tab:gray", "written")])]
    for spec, label, series in panels:
        sub = fig.add_subplot(spec, sharex=ax)
        for key, color, name in series:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                sub.plot(*zip(*pts), color=color, lw=1.2, label=name)
        if label.startswith("GB"):
            sub.set_ylim(bottom=0)
        sub.set_xlabel("step")
        sub.set_ylabel(label)
        sub.grid(alpha=0.3)
        if len(series) > 1:
            sub.legend(loc="upper right")
    fig.suptitle(title or "fine-tune")
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Write the figure as PNG atomically (a half-drawn loss.png is never seen)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


_noted: set[str] = set()


def _note_once(what: str, log) -> None:
    if what not in _noted:
        _noted.add(what)
        log(what)


def plot_run(run: str | Path, rows: list[dict] | None = None, log=print) -> Path | None:
    """Redraw RUN/loss.png from `rows` (or RUN/metrics.jsonl); a one-line note without matplotlib."""
    run = Path(run)
    rows = read_metrics(run / "metrics.jsonl") if rows is None else rows
    if not rows:
        return None
    fig = draw_run(rows, _title(_config(run)))
    if fig is None:
        _note_once("note: no loss.png (matplotlib is not installed: pip install 'blocktune-core[plot]')", log)
        return None
    return save_figure(fig, run / "loss.png")


class ScalarLog:
    """TensorBoard event files in the run folder (torch's SummaryWriter), or nothing without
    the tensorboard package. A resumed run hides the events past its checkpoint (purge_step),
    so a step logged twice, before and after a kill, shows once."""

    def __init__(self, run: str | Path, enabled: bool = True, start: int = 0, log=print):
        self._w = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            _note_once("note: no TensorBoard events (tensorboard is not installed: pip install "
                       "'blocktune-core[plot]')", log)
            return
        self._w = SummaryWriter(log_dir=str(run), purge_step=start + 1 if start else None)

    def add(self, row: dict) -> None:
        if self._w is None:
            return
        for key, tag in SCALARS.items():
            v = row.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                self._w.add_scalar(tag, v, row["step"])

    def flush(self) -> None:
        if self._w is not None:
            self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None


class Progress:
    """Progress of a long job: a tqdm bar on a terminal; elsewhere (CI, nohup, a log file) a
    plain line every `every` seconds and one at the end, with the same fields and no control
    characters."""

    def __init__(self, total: int, start: int = 0, desc: str = "", unit: str = "step",
                 enabled: bool = True, every: float = 30.0, stream=None, tty: bool | None = None):
        self.total, self.n, self.desc, self.unit, self.every = total, start, desc, unit, every
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.fields: dict[str, str] = {}
        self.bar = None
        tty = self.stream.isatty() if tty is None else tty
        if enabled and tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit=unit, desc=desc or None, file=self.stream,
                            dynamic_ncols=True)
        self._t0 = self._last = time.monotonic()
        self._n0, self._printed = start, start

    def update(self, n: int = 1, **fields: str) -> None:
        self.n += n
        self.fields.update(fields)
        if self.bar is not None:
            if fields:
                self.bar.set_postfix(self.fields, refresh=False)
            self.bar.update(n)
        elif self.enabled and (time.monotonic() - self._last >= self.every):
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        self._last, self._printed = now, self.n
        done = self.n - self._n0
        rate = done / (now - self._t0) if now > self._t0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.n / self.total if self.total else 100.0
        extra = "".join(f" {k}={v}" for k, v in self.fields.items())
        eta_s = f"{eta:.0f}s" if math.isfinite(eta) else "?"
        self.stream.write(f"{self.desc + ' ' if self.desc else ''}{self.n}/{self.total} {self.unit}s "
                          f"({pct:.0f}%){extra} elapsed {now - self._t0:.0f}s eta {eta_s}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.n > self._n0 and self.n != self._printed:
            self._line()
        self.enabled = False
