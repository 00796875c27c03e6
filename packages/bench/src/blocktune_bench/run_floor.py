"""Bench group `floor`: the user's 7B-shaped LoRA step against its floors (issue #31), on this
machine's own disk, nothing throttled.

`blocktune finetune` exactly as the README shows it (no budget or dtype flags: budgets and
compute dtype auto) on the 7B-shaped store, twice per repetition, alternated:

- in RAM: no memory limit, the store in the page cache — the same command's compute floor
  (its own dtype, its own kernels, nothing waiting for the disk);
- under a 2 GiB cgroup, the store dropped from the page cache first — the user's case;
- the same with `--spill-activations 0`: every block recomputed, as before activations could
  be kept on disk (the mechanism's side-by-side; not the headline).

The IO floor is the limited step's bytes read over the disk's O_DIRECT read rate, measured on the
spot. The figure the issue asks for is the limited step over max(IO floor, compute floor).

    python -m blocktune_bench.run --only floor [--reps 2]
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from .common import cached_store, cli_under_limit, disk_bandwidth, machine, save
from .measure import evict_from_page_cache

__all__ = ["group_floor"]

LIMIT = 2 << 30
FLAGS = ("--method", "lora", "--steps", "3", "--batch-size", "1", "--seq-len", "128", "--grad-accum", "1")


def _steps(report: dict) -> list[float]:
    """The seconds of each step after the first (the first fills caches and starts threads)."""
    return [r["seconds"] for r in report.get("rows", [])[1:]]


def group_floor(work: Path, reps: int = 2) -> None:
    from .corpus import demo_text, tokenizer_path

    store = cached_store(work / "shape-7b-tok", "shape-7b", seed=0, dtype=torch.bfloat16, tokenizer=tokenizer_path())
    data = work / "notes.txt"
    data.write_text(demo_text())
    bw = disk_bandwidth(work)
    runs: dict[str, list[dict]] = {"in RAM": [], "2 GiB": [], "2 GiB, recompute": []}
    for _ in range(reps):
        runs["in RAM"].append(cli_under_limit("none", store, data, work / "floor-ram", *FLAGS))
        evict_from_page_cache(store.glob("*.safetensors"))
        runs["2 GiB"].append(cli_under_limit(str(LIMIT), store, data, work / "floor-2g", *FLAGS))
        evict_from_page_cache(store.glob("*.safetensors"))
        runs["2 GiB, recompute"].append(cli_under_limit(str(LIMIT), store, data, work / "floor-2g-re", *FLAGS,
                                                        "--spill-activations", "0"))
        print({k: [_steps(r) for r in v] for k, v in runs.items()}, flush=True)
    step = {k: statistics.median(s for r in v for s in _steps(r)) if any(_steps(r) for r in v) else None
            for k, v in runs.items()}
    read = statistics.median(r["rows"][-1]["gb_read"] for r in runs["2 GiB"] if r.get("rows")) if step["2 GiB"] else None
    size = sum(p.stat().st_size for p in store.glob("*.safetensors"))
    notes = sorted({n for r in runs["2 GiB"] for n in r.get("budget_notes", []) if n.startswith(("keep_", "spill_"))})
    table = [f"7B-shaped bf16 store ({size / 1e9:.1f} GB, random weights), `blocktune finetune "
             f"{' '.join(FLAGS)}` with no other flags (budgets and compute dtype auto); median of steps 2-3 of "
             f"{reps} alternated runs each. Compute floor: the same command in RAM (no limit, store in the page "
             f"cache). IO floor: the limited step's bytes read / this disk's O_DIRECT read rate "
             f"({bw['direct_read_GBps']:.2f} GB/s, measured just before).", "",
             "What `auto` chose under 2 GiB: " + " / ".join(notes), ""]
    if step["2 GiB"] is None or step["in RAM"] is None:
        table.append("Did not complete: " + "; ".join(f"{k}: {r.get('exit_code')} {r.get('budget_notes')}"
                                                       for k, v in runs.items() for r in v if not _steps(r)))
    else:
        io_floor = read / bw["direct_read_GBps"]
        floor = max(io_floor, step["in RAM"])
        peak = max((r.get("cgroup_peak_bytes") or 0) for r in runs["2 GiB"]) / 1e9
        table += ["| run | s/step | GB read/step | IO floor (s) | step / max(IO floor, compute floor) | cgroup peak incl. page cache (GB) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |",
                  f"| in RAM (the compute floor) | {step['in RAM']:.1f} | | | 1.00 | |",
                  f"| under 2 GiB | {step['2 GiB']:.1f} | {read:.1f} | {io_floor:.1f} | "
                  f"{step['2 GiB'] / floor:.2f} | {peak:.2f} |"]
        if step["2 GiB, recompute"] is not None:
            peak_re = max((r.get("cgroup_peak_bytes") or 0) for r in runs["2 GiB, recompute"]) / 1e9
            table.append(f"| under 2 GiB, `--spill-activations 0` (every block recomputed) | "
                         f"{step['2 GiB, recompute']:.1f} | | | {step['2 GiB, recompute'] / floor:.2f} | {peak_re:.2f} |")
    save("floor", {"machine": machine(), "disk": bw, "flags": FLAGS, "step_median": step, "runs": runs}, table)
