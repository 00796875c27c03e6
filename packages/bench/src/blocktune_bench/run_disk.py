"""Bench group `disk`: the disk-bound 7B-shaped LoRA step, on a disk the kernel slows down.

On this machine the 7B-shaped LoRA step under 2 GiB is compute-bound (its disk reads ~1.8 GB/s),
so the question of issue 12 — how close does the step come to its IO floor when the disk is the
bottleneck? — is asked on a disk throttled by a cgroup (`blocktune_bench.limited --read-rate`),
to a rate at which the step's reads take longer than its compute. Each run is the headline's
(library driver: LoRA rank 16, batch 1 x 128, bf16 compute, a 2-unit budget, 2 GiB cgroup,
store dropped from the page cache first), and, from the user's path, `blocktune finetune` with
no budget flags under the same two limits. With a baseline checkout (BLOCKTUNE_BASELINE=DIR:
a clone of an earlier commit) its runs alternate with this code's, in one sitting.

    python -m blocktune_bench.run --only disk        [BLOCKTUNE_READ_RATE=400MB]
                                                     [BLOCKTUNE_DISK_PATHS=driver,cli]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from blocktune.settings import parse_bytes

from .common import cached_store, cli_under_limit, machine, save
from .measure import evict_from_page_cache

__all__ = ["group_disk"]

LIMIT = 2 << 30


def _code(checkout: Path | None) -> list[str]:
    """The prefix that makes a command use that checkout's blocktune and bench (None: this one's)."""
    if checkout is None:
        return []
    return ["env", "PYTHONPATH=" + os.pathsep.join(str(checkout / "packages" / p / "src")
                                                   for p in ("core", "export", "bench"))]


def _limited(rate: int | None, store: Path, limit: str, command: list[str]) -> tuple[dict, str]:
    cmd = [sys.executable, "-m", "blocktune_bench.limited", limit]  # this checkout's limits
    if rate is not None:
        cmd += ["--read-rate", str(rate), "--disk", str(store)]
    r = subprocess.run(cmd + ["--", *command], capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {"exit_code": r.returncode,
                                                                                "stderr": r.stderr[-800:]}
    return report, r.stdout


def _read_rate(rate: int, store: Path) -> float:
    """Bytes/s of an O_DIRECT read of two block files under the throttle, measured."""
    files = sorted(store.glob("block_0[01]*.safetensors"))[:2]
    evict_from_page_cache(files)
    total, seconds = 0, 0.0
    for f in files:
        rep, _ = _limited(rate, store, "none", ["dd", f"if={f}", "of=/dev/null", "bs=8M", "iflag=direct"])
        total += f.stat().st_size
        seconds += rep["seconds"]
    return total / seconds


def _driver(store: Path, rate: int | None, checkout: Path | None) -> dict:
    flags = ["--store", str(store), "--mode", "paged", "--method", "lora", "--batch", "1", "--seq", "128",
             "--steps", "1", "--budget-units", "2", "--compute-dtype", "bf16"]
    if rate is not None:
        flags += ["--memory-limit", str(LIMIT), "--cold"]
    rep, out = _limited(rate, store, "none", [*_code(checkout), sys.executable, "-m", "blocktune_bench.measure", *flags])
    if rep.get("exit_code") != 0 or not out.strip():
        return {"error": rep.get("stderr", "")[-400:] or out[-400:], **rep}
    return json.loads(out.strip().splitlines()[-1])


def _cli(store: Path, data: Path, out: Path, rate: int | None, checkout: Path | None) -> dict:
    """The CLI under the two limits (rate None: in RAM, no limits at all: its compute floor)."""
    if rate is not None:
        evict_from_page_cache(store.glob("*.safetensors"))
    rep = cli_under_limit(str(LIMIT) if rate is not None else "none", store, data, out, "--method", "lora",
                          "--steps", "2", "--batch-size", "1", "--seq-len", "128", "--grad-accum", "1",
                          read_rate=rate, prefix=tuple(_code(checkout)))
    rows = rep.pop("rows")
    rep["step_seconds"] = [r["seconds"] for r in rows]
    rep["gb_read"] = [r["gb_read"] for r in rows]
    rep["load_wait_s"] = [r.get("load_wait_s") for r in rows]
    return rep


def group_disk(work: Path, reps: int = 2) -> None:
    from .corpus import demo_text, tokenizer_path

    store = cached_store(work / "shape-7b-tok", "shape-7b", seed=0, dtype=torch.bfloat16, tokenizer=tokenizer_path())
    data = work / "notes.txt"
    data.write_text(demo_text())
    rate = parse_bytes(os.environ.get("BLOCKTUNE_READ_RATE", "400MB"))
    base = os.environ.get("BLOCKTUNE_BASELINE")
    codes = {"this": None} | ({"baseline": Path(base)} if base else {})
    commits = {name: subprocess.run(["git", "-C", str(path or "."), "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True).stdout.strip() for name, path in codes.items()}
    paths = os.environ.get("BLOCKTUNE_DISK_PATHS", "driver,cli").split(",")
    measured_rate = _read_rate(rate, store)
    in_ram = _driver(store, None, None)  # the store in the page cache, no limits: what compute costs
    runs = []
    for rep in range(reps if "driver" in paths else 0):
        for name, path in codes.items():
            r = _driver(store, rate, path)
            r.update({"code": name, "commit": commits[name], "path": "driver", "rep": rep})
            print(json.dumps({k: r.get(k) for k in ("code", "step_seconds", "bytes_read_per_step", "error")}), flush=True)
            runs.append(r)
    cli_ram = None
    if "cli" in paths:  # the CLI's own compute floor: fp32 and budgets auto, the store in the page cache
        cli_ram = _cli(store, data, work / "disk-cli-ram", None, None)
        cli_ram["step"] = cli_ram["step_seconds"][-1] if cli_ram.get("step_seconds") else None
        print(json.dumps({"cli_in_ram": cli_ram.get("step_seconds")}), flush=True)
    for name, path in codes.items() if "cli" in paths else ():
        r = _cli(store, data, work / f"disk-cli-{name}", rate, path)
        r.update({"code": name, "commit": commits[name], "path": "cli"})
        print(json.dumps({k: r.get(k) for k in ("code", "step_seconds", "gb_read", "exit_code")}), flush=True)
        runs.append(r)
    ram = in_ram.get("step_median")
    size = sum(p.stat().st_size for p in store.glob("*.safetensors"))
    table = [f"7B-shaped bf16 store ({size / 1e9:.1f} GB), "
             f"LoRA batch 1 x 128, under a 2 GiB memory cgroup and a disk read rate throttled by a blkio cgroup to "
             f"{rate / 1e6:.0f} MB/s (measured: {measured_rate / 1e6:.0f} MB/s, O_DIRECT). IO floor: bytes read per "
             f"step / the measured rate. Compute floor: the same driver step with the store in the page cache and no "
             f"limits (driver {ram:.1f} s" + (f"; CLI, fp32 and its own auto budgets, {cli_ram['step']:.1f} s"
                                               if cli_ram and cli_ram.get("step") else "") + "). Driver: the headline's (bf16 compute, 2-unit budget). CLI: `blocktune finetune "
             "--method lora --steps 2 --batch-size 1 --seq-len 128 --grad-accum 1`, no budget flags (fp32 compute, "
             "budgets auto). Commits: " + ", ".join(f"{k} {v}" for k, v in commits.items()) + ".", "",
             "| code | path | s/step | GB read/step | IO floor (s) | step / max(IO floor, compute floor) | compute waited for loads (s) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    summary = {}
    for name in codes:
        drv = [r for r in runs if r["code"] == name and r["path"] == "driver" and "error" not in r]
        if drv:
            step = statistics.median(s for r in drv for s in r["step_seconds"])
            read = statistics.median(r["bytes_read_per_step"] for r in drv)
            floor = read / measured_rate
            summary[name] = {"step": step, "io_floor": floor, "ratio": step / max(floor, ram)}
            table.append(f"| {name} ({commits[name]}) | driver, median of {sum(len(r['step_seconds']) for r in drv)} steps | "
                         f"{step:.1f} | {read / 1e9:.1f} | {floor:.1f} | {step / max(floor, ram):.2f} | |")
        for r in runs:
            if r["code"] == name and r["path"] == "cli":
                if not r.get("step_seconds"):
                    table.append(f"| {name} | CLI | failed (exit {r.get('exit_code')}) | | | | |")
                    continue
                step, gb = r["step_seconds"][-1], r["gb_read"][-1]
                floor = gb * 1e9 / measured_rate
                wait = r["load_wait_s"][-1]
                compute = cli_ram["step"] if cli_ram and cli_ram.get("step") else ram
                table.append(f"| {name} ({commits[name]}) | CLI, step 2 | {step:.1f} | {gb:.1f} | {floor:.1f} | "
                             f"{step / max(floor, compute):.2f} | "
                             f"{'' if wait is None else f'{wait:.1f}'} |")
    save("disk-bound" + ("" if paths == ["driver", "cli"] else "-" + "-".join(paths)), {"machine": machine(), "read_rate": rate, "measured_read_rate": measured_rate,
                        "in_ram": in_ram, "cli_in_ram": cli_ram, "commits": commits, "runs": runs, "summary": summary}, table)
