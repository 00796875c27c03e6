"""Bench group `floor`: the user's no-flag step against its floors (issue #31), on this machine's
own disk, nothing throttled.

`blocktune finetune` exactly as the README shows it (no budget or dtype flags: budgets and compute
dtype auto), each case alternated, `reps` times:

- the 7B-shaped bf16 store (13.5 GB), LoRA, under a 2 GiB cgroup; and the same with
  `--spill-activations 0` (every block recomputed, as before activations could be kept on disk:
  the mechanism's side-by-side, not the headline);
- the laptop shape: a 3.5 GB (3.3 GiB) fp32 store (30 layers, dim 1536), LoRA and a full AdamW fine-tune,
  under a 1 GiB cgroup (a full fine-tune runs on a fresh copy of the store each time: it writes it).

Each beside the same command in RAM (no limit, the store in the page cache): its compute floor,
in its own dtype, with its own kernels, nothing waiting for the disk. The limited runs start with
the store dropped from the page cache. The IO floor is the limited step's bytes read over the
disk's O_DIRECT read rate, plus its bytes written over the write rate (one disk: reads and writes
share it), both measured on the spot; where the step writes, the smaller of that and all its bytes
over the rate the disk gives reads and writes in flight together, in the step's proportion
(`common.disk_mixed`: the two rates alone may add up to more than the disk does mixed, or less). The figure the issue asks for is the limited step over
max(IO floor, compute floor). Beside it, the share of the limited steps during which the disk was
busy (`common.DiskBusy`): the IO floor takes the disk's rates measured alone, and a disk's rate
varies (with reads and writes mixed, with its neighbours on a VM).

    python -m blocktune_bench.run --only floor [--reps 2]
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import torch

from .common import cached_store, cli_under_limit, disk_bandwidth, disk_mixed, machine, save
from .measure import evict_from_page_cache

__all__ = ["group_floor"]

STEPS = 4  # from the third step on, a full fine-tune writes over the files of two steps back (`store.spares`)
SHAPE = ("--steps", str(STEPS), "--batch-size", "1", "--seq-len", "128", "--grad-accum", "1")


def _steps(report: dict) -> list[float]:
    """The seconds of each step after the first (the first fills caches and starts threads)."""
    return [r["seconds"] for r in report.get("rows", [])[1:]]


def _median(reports: list[dict]) -> float | None:
    steps = [s for r in reports for s in _steps(r)]
    return statistics.median(steps) if steps else None


def _last(reports: list[dict], key: str) -> float:
    return statistics.median(r["rows"][-1].get(key) or 0.0 for r in reports if r.get("rows"))


class _Case:
    """One store and method: the limited runs (and variants) beside the same command in RAM."""

    def __init__(self, name: str, store: Path, limit: int, flags: tuple[str, ...], writes_store: bool,
                 variants: dict[str, tuple[str, ...]]):
        self.name, self.store, self.limit, self.flags = name, store, limit, flags
        self.writes_store = writes_store
        self.variants = {"limited": (), **variants}
        self.runs: dict[str, list[dict]] = {"in RAM": [], **{k: [] for k in self.variants}}

    def _target(self, work: Path) -> Path:
        """The store a run trains: the store itself, or a fresh copy (a full fine-tune writes it)."""
        if not self.writes_store:
            return self.store
        copy = work / f"{self.store.name}-copy"
        if copy.exists():
            shutil.rmtree(copy)
        shutil.copytree(self.store, copy, ignore=shutil.ignore_patterns(".lock", ".narrowed*"))
        return copy

    def rep(self, work: Path, data: Path) -> None:
        out = work / f"floor-{self.name.replace(' ', '-')}"
        target = self._target(work)
        for f in target.glob("*.safetensors"):  # in the page cache, as a run in RAM finds it after the first
            f.read_bytes()
        self.runs["in RAM"].append(cli_under_limit("none", target, data, out, *self.flags))
        for variant, extra in self.variants.items():
            target = self._target(work)
            evict_from_page_cache(target.glob("*.safetensors"))
            self.runs[variant].append(cli_under_limit(str(self.limit), target, data, out, *self.flags, *extra))

    def io_floor(self, bw: dict, work: Path) -> dict:
        """Seconds the disk needs for the limited step's bytes: read over the read rate plus
        written over the write rate, each measured alone (`disk_bandwidth`); where the step
        writes too, also all of it over the rate of reads and writes in flight together in
        its proportion (`disk_mixed`, the faster of two tries just after the runs). The floor
        is the smaller: the disk's best figure for what the step moves."""
        read, written = _last(self.runs["limited"], "gb_read"), _last(self.runs["limited"], "gb_written")
        alone = read / bw["direct_read_GBps"] + written / bw["direct_write_GBps"]
        out = {"gb_read": read, "gb_written": written, "io_floor_alone_s": alone, "io_floor_s": alone}
        if written and read:
            out["mixed_GBps"] = max(disk_mixed(work, read / (read + written)) for _ in range(2))
            out["io_floor_mixed_s"] = (read + written) / out["mixed_GBps"]
            out["io_floor_s"] = min(alone, out["io_floor_mixed_s"])
        return out

    def rows(self, bw: dict, work: Path) -> tuple[list[str], dict]:
        step = {k: _median(v) for k, v in self.runs.items()}
        lim = self.runs["limited"]
        size = sum(p.stat().st_size for p in self.store.glob("*.safetensors"))
        label = f"{self.name} ({size / 1e9:.1f} GB), under {self.limit >> 20} MiB"
        if step["limited"] is None or step["in RAM"] is None:
            why = "; ".join(f"{k}: exit {r.get('exit_code')} {r.get('budget_notes')}"
                            for k, v in self.runs.items() for r in v if not _steps(r))
            return [f"| {label} | did not complete: {why} | | | | | | | |"], {"step_median": step}
        io = self.io_floor(bw, work)
        read, written, io_floor = io["gb_read"], io["gb_written"], io["io_floor_s"]
        floor = max(io_floor, step["in RAM"])
        shown = f"{io_floor:.1f}" + (f" ({io['mixed_GBps']:.2f} GB/s mixed)" if "mixed_GBps" in io else "")
        out = []
        for variant in self.variants:
            if step[variant] is None:
                continue
            peak = max((r.get("cgroup_peak_bytes") or 0) for r in self.runs[variant]) / 1e9
            busy = [r["disk_busy"] for r in self.runs[variant] if r.get("disk_busy") is not None]
            name = label if variant == "limited" else f"{label}, `{' '.join(self.variants[variant])}`"
            out.append(f"| {name} | {step[variant]:.2f} | {step['in RAM']:.2f} | {read:.1f}, {written:.1f} | "
                       f"{shown} | **{step[variant] / floor:.2f}** | "
                       f"{f'{statistics.median(busy):.0%}' if busy else ''} | {peak:.2f} |")
        notes = sorted({n for r in lim for n in r.get("budget_notes", [])})
        return out, {"step_median": step, **io, "ratio": step["limited"] / floor, "notes": notes}


def group_floor(work: Path, reps: int = 2) -> None:
    from blocktune.model.args import ModelArgs

    from .corpus import demo_text, tokenizer_path

    big = cached_store(work / "shape-7b-tok", "shape-7b", seed=0, dtype=torch.bfloat16, tokenizer=tokenizer_path())
    laptop = cached_store(work / "laptop-tok", ModelArgs(dim=1536, n_layers=30, n_heads=12, vocab_size=8192,
                                                         multiple_of=256, max_seq_len=512),
                          seed=0, tokenizer=tokenizer_path())
    data = work / "notes.txt"
    data.write_text(demo_text())
    cases = [_Case("laptop-shaped fp32 store, LoRA", laptop, 1 << 30, ("--method", "lora", *SHAPE), False, {}),
             _Case("laptop-shaped fp32 store, full AdamW", laptop, 1 << 30, ("--method", "full", *SHAPE), True, {}),
             _Case("7B-shaped bf16 store, LoRA", big, 2 << 30, ("--method", "lora", *SHAPE), False,
                   {"recompute": ("--spill-activations", "0")})]
    bw = disk_bandwidth(work)
    for _ in range(reps):
        for case in cases:
            case.rep(work, data)
            print(case.name, {k: [_steps(r) for r in v] for k, v in case.runs.items()}, flush=True)
    table = [f"`blocktune finetune {' '.join(SHAPE)} --method M` with no other flags (budgets and compute dtype "
             f"auto); median of steps 2-{STEPS} of {reps} alternated runs each. Compute floor: the same command in RAM "
             f"(no limit, store in the page cache). IO floor: the limited step's bytes read over this disk's O_DIRECT "
             f"read rate ({bw['direct_read_GBps']:.2f} GB/s) plus its bytes written over the write rate "
             f"({bw['direct_write_GBps']:.2f} GB/s), measured just before; where the step writes, the smaller of "
             f"that and all its bytes over the rate of reads and writes in flight together in the step's "
             f"proportion (measured just after, the better of two). Disk busy: the share of steps 2-{STEPS} "
             f"during which the store's disk had IO in flight (`/proc/diskstats`), median of the runs; near 100%, "
             f"the disk bounds the step, whatever its rate then.", "",
             "| store, method, limit | s/step | in RAM (compute floor) | GB read, written a step | IO floor (s) | "
             f"step / max(IO floor, compute floor) | disk busy (steps 2-{STEPS}) | cgroup peak incl. page cache (GB) |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    results = {}
    for case in cases:
        rows, results[case.name] = case.rows(bw, work)
        table += rows
    table += ["", "What `auto` chose (the limited runs' notes):", ""]
    for case in cases:
        table.append(f"- {case.name}: " + " / ".join(results[case.name].get("notes", [])))
    save("floor", {"machine": machine(), "disk": bw, "shape": SHAPE, "cases": results,
                   "runs": {c.name: c.runs for c in cases}}, table)
