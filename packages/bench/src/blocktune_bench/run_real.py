"""The real model's benchmark group (`python -m blocktune_bench.run --only real`): SmolLM2-135M-
Instruct from its GGUF file. `blocktune prepare` against gguf's own reader dequantizing every
tensor (the floor) and cp; a LoRA and a full step from the CLI against transformers (+ peft) in
memory on the same file, text and shapes, in fp32 and in bf16, with their peak anonymous memory;
the same runs' steps profiled (blocktune_bench.profile: time by unit, operators by kind, waits
for loads, page faults); 30-step LoRA and full runs in bf16 beside the same runs in fp32, their
losses compared (bf16 tracks fp32 within TRACK_TOL); a 30-step LoRA run on text the project
ships, its held-out loss before and after measured by transformers (the base GGUF file, then
the merged HF export); a bf16 against fp32 matmul of the issue's shape, side by side.

`small=True` (run.py --small) runs every part on tiny shapes to check the code, and saves nothing."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .common import machine, save
from .corpus import corpus_text
from .measure import evict_from_page_cache
from .realmodel import HOW_TO_FETCH, smollm2_gguf

DTYPES = ("fp32", "bf16")
# bf16 against fp32, 30 steps from the same start: every step's loss within 2%, the last ten's mean within 1%
TRACK_TOL, TRACK_TOL_LAST = 0.02, 0.01
TRACK_LR = {"lora": "1e-3", "full": "1e-5"}


@dataclass(frozen=True)
class Shape:
    batch: int = 4
    seq: int = 256
    steps: int = 6  # timed steps per run (the first is not counted)
    track: int = 30  # steps of the bf16-vs-fp32 runs and of the held-out run


SMALL = Shape(1, 32, 2, 3)


def _probe(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "blocktune_bench.probes", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"probe {args[0]} failed: {r.stderr[-2000:]}")
    return r


def _blocktune(cmd: str, *args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "blocktune", cmd, *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"blocktune {cmd} failed: {r.stderr[-2000:]}")


def _prepare(work: Path, gguf: Path, reps: int) -> dict:
    runs = []
    for _ in range(reps):
        for what in ("cp", "gguf reader", "blocktune prepare"):
            evict_from_page_cache([gguf])
            dst = work / "prep"
            shutil.rmtree(dst, ignore_errors=True)
            dst.unlink(missing_ok=True)  # a file left by an earlier, killed run
            t = time.perf_counter()
            if what == "cp":
                dst.mkdir()
                subprocess.run(["cp", str(gguf), str(dst)], check=True)
                subprocess.run(["sync"], check=True)
            elif what == "gguf reader":
                _probe("gguf_read_all", str(gguf))
            else:
                _blocktune("prepare", str(gguf), str(dst))
            runs.append({"what": what, "seconds": time.perf_counter() - t})
            print(json.dumps(runs[-1]), flush=True)
    shutil.rmtree(work / "prep", ignore_errors=True)
    return {w: statistics.median(r["seconds"] for r in runs if r["what"] == w)
            for w in ("cp", "gguf reader", "blocktune prepare")}


def _finetune(work: Path, store: Path, train: Path, name: str, method: str, steps: int, sh: Shape,
              *flags: str) -> dict:
    """`blocktune finetune` in a probe process (its peak anonymous memory measured) into work/name:
    each step's seconds and loss, the peak."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    if method == "full":  # a full fine-tune writes its store: a fresh copy each time
        store = _fresh_copy(work, store)
    r = _probe("finetune", "--store", str(store), "--data", str(train), "--out", str(out), "--method", method,
               "--steps", str(steps), "--batch-size", str(sh.batch), "--grad-accum", "1", "--seq-len", str(sh.seq),
               "--no-progress", "--checkpoint-every", "1000", "--set", "val_ratio=0", "--set", "eval_every=0",
               "--set", "sample_every=0", "--set", "warmup_steps=0", *flags)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    mem = json.loads(r.stderr.strip().splitlines()[-1])
    chose = [x for x in r.stderr.splitlines() if x.startswith(("compute ", "keep_activations auto"))]
    return {"seconds": [row["seconds"] for row in rows if "seconds" in row],
            "losses": [row["loss"] for row in rows if "loss" in row], "anon_peak": mem["anon_peak"], "chose": chose}


def _steps(work: Path, gguf: Path, store: Path, train: Path, reps: int, sh: Shape) -> list[dict]:
    """Each method's step, blocktune (no budget flags; and LoRA recomputing, the low-memory mode)
    beside transformers in memory, in each dtype, runs alternated."""
    runs = []
    for _ in range(reps):
        for dtype in DTYPES:
            for method in ("lora", "full"):
                cases = [("blocktune", ()), ("transformers", None)]
                if method == "lora":
                    cases.insert(1, ("blocktune --keep-activations 0", ("--keep-activations", "0")))
                for who, flags in cases:
                    if flags is None:
                        got = json.loads(_probe("hf_step", str(gguf), str(train), method, str(sh.batch), str(sh.seq),
                                                str(sh.steps), dtype).stdout.strip().splitlines()[-1])
                    else:
                        got = _finetune(work, store, train, f"run-{method}", method, sh.steps, sh,
                                        "--compute-dtype", dtype, *flags)
                    runs.append({"dtype": dtype, "method": method, "who": who, "anon_peak": got["anon_peak"],
                                 "step_median": statistics.median(got["seconds"][1:]), "seconds": got["seconds"],
                                 "chose": got.get("chose", [])})
                    print(json.dumps(runs[-1]), flush=True)
    return runs


def _fresh_copy(work: Path, store: Path) -> Path:
    """A copy of the store for a full fine-tune to write (the prepared one stays the base model)."""
    shutil.rmtree(work / "store-full", ignore_errors=True)
    return Path(shutil.copytree(store, work / "store-full"))


def _profiles(work: Path, store: Path, sh: Shape) -> list[dict]:
    """One no-flag paged step of each method in each dtype, profiled (`measure --profile`)."""
    out = []
    for dtype in DTYPES:
        for method in ("lora", "full"):
            path = _fresh_copy(work, store) if method == "full" else store
            r = subprocess.run([sys.executable, "-m", "blocktune_bench.measure", "--store", str(path), "--mode",
                                "paged-auto", "--method", method, "--batch", str(sh.batch), "--seq", str(sh.seq),
                                "--steps", "2", "--compute-dtype", dtype, "--profile"],
                               capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"measure --profile failed: {r.stderr[-2000:]}")
            got = json.loads(r.stdout.strip().splitlines()[-1])
            out.append({"dtype": dtype, "method": method, "step_median": got["step_median"], **got["profile"]})
            print(json.dumps(out[-1]), flush=True)
    return out


def tracking_rows(tracking: list[dict]) -> list[str]:
    """The tracking table: blocktune's bf16-against-fp32 deviation beside transformers'."""
    return ["| method | lr | worst step | last ten's mean | transformers: worst step | last ten's mean | within |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- |"] + [
        f"| {t['method']} | {t['lr']} | {t['worst_rel']:.2e} | {t['last_mean_rel']:.2e} | "
        f"{t['transformers']['worst_rel']:.2e} | {t['transformers']['last_mean_rel']:.2e} | "
        f"{'yes' if t['within'] else 'NO'} |" for t in tracking]


def _deviation(losses: dict[str, list[float]]) -> dict:
    """bf16's losses against fp32's: the worst step's relative difference, the last ten's mean's."""
    a, b = losses["fp32"], losses["bf16"]
    last = min(10, len(a))
    return {"worst_rel": max(abs(y - x) / x for x, y in zip(a, b)),
            "last_mean_rel": abs(statistics.mean(b[-last:]) - statistics.mean(a[-last:])) / statistics.mean(a[-last:])}


def hf_losses(gguf: Path, train: Path, method: str, sh: Shape, dtype: str) -> list[float]:
    """transformers' (+ peft's) losses over `sh.track` steps in `dtype`, at the tracking's learning rate."""
    r = _probe("hf_step", str(gguf), str(train), method, str(sh.batch), str(sh.seq), str(sh.track), dtype,
               TRACK_LR[method])
    return json.loads(r.stdout.strip().splitlines()[-1])["losses"]


def compared(method: str, losses: dict[str, list[float]], hf: dict[str, list[float]]) -> dict:
    """One method's tracking: blocktune's deviation, transformers', and whether blocktune's is within."""
    mine, theirs = _deviation(losses), _deviation(hf)
    within = ((mine["worst_rel"] <= TRACK_TOL and mine["last_mean_rel"] <= TRACK_TOL_LAST)
              or all(mine[k] <= theirs[k] for k in mine))
    return {"method": method, "lr": TRACK_LR[method], "losses": losses, **mine, "transformers_losses": hf,
            "transformers": theirs, "within": within}


def _tracking(work: Path, gguf: Path, store: Path, train: Path, sh: Shape) -> list[dict]:
    """A LoRA and a full run of `sh.track` steps in bf16 and in fp32 from the same start on the
    same batches: bf16's losses against fp32's; beside them transformers' own pair (its batches,
    the same learning rate; LoRA on bf16 weights, full under autocast), what bf16 does there.
    Within: blocktune's bf16 inside TRACK_TOL / TRACK_TOL_LAST, or no further from its fp32 than
    transformers' bf16 is from its own."""
    out = []
    for method in ("lora", "full"):
        losses = {dt: _finetune(work, store, train, f"track-{method}-{dt}", method, sh.track, sh, "--compute-dtype",
                                dt, "--lr", TRACK_LR[method])["losses"] for dt in DTYPES}
        out.append(compared(method, losses, {dt: hf_losses(gguf, train, method, sh, dt) for dt in DTYPES}))
        print(json.dumps(out[-1]), flush=True)
    return out


def matmul_ratio(m: int = 128, k: int = 4096, n: int = 11008, reps: int = 5) -> dict:
    """GFLOP/s of an (m x k) @ (k x n) matmul in fp32 and in bf16, alternated in this process."""
    import torch

    got: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(reps):
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
            a @ b
            t = time.perf_counter()
            a @ b
            got[name].append(2 * m * k * n / (time.perf_counter() - t) / 1e9)
    rate = {k: statistics.median(v) for k, v in got.items()}
    return {"shape": [m, k, n], "gflops": rate, "bf16_over_fp32": rate["bf16"] / rate["fp32"]}


def _heldout(work: Path, gguf: Path, store: Path, train: Path, held: Path, sh: Shape) -> dict:
    before = json.loads(_probe("hf_loss", str(gguf.parent), gguf.name, str(held), str(sh.seq)).stdout)
    out = work / "run-30"
    shutil.rmtree(out, ignore_errors=True)
    _blocktune("finetune", "--store", str(store), "--data", str(train), "--out", str(out), "--steps", str(sh.track),
               "--batch-size", str(sh.batch), "--grad-accum", "1", "--seq-len", str(sh.seq), "--lr", "1e-3",
               "--no-progress", "--set", "val_ratio=0", "--set", "eval_every=0", "--set", "sample_every=0")
    shutil.rmtree(work / "merged", ignore_errors=True)
    _blocktune("export", str(store), str(work / "merged"), "--format", "hf", "--adapter",
               str(out / "adapter.safetensors"), "--dtype", "fp32")
    after = json.loads(_probe("hf_loss", str(work / "merged"), "-", str(held), str(sh.seq)).stdout)
    return {"before": before["loss"], "after": after["loss"], "windows": before["windows"]}


def real_inputs(work: Path, small: bool = False) -> tuple[Path, Path, Path, Path]:
    """The GGUF file, its prepared store in `work` (made once), the training text (90% of the
    project's corpus) and the held-out text (from the other 10%)."""
    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit(f"the real model is not in the cache: {HOW_TO_FETCH}")
    work.mkdir(parents=True, exist_ok=True)
    text = corpus_text(300_000)
    cut = int(len(text) * 0.9)
    train, held = work / "train.txt", work / "heldout.txt"
    train.write_text(text[:cut])
    held.write_text(text[cut:cut + (2_000 if small else 20_000)])
    store = work / "store"
    if not (store / "manifest.json").exists():
        _blocktune("prepare", str(gguf), str(store))
    return gguf, store, train, held


def group_real(work: Path, reps: int, small: bool = False) -> None:
    sh = SMALL if small else Shape()
    gguf, store, train, held = real_inputs(work, small)
    ratio = matmul_ratio()
    print(json.dumps(ratio), flush=True)
    prep = _prepare(work, gguf, reps)
    runs = _steps(work, gguf, store, train, reps, sh)
    profiles = _profiles(work, store, sh)
    tracking = _tracking(work, gguf, store, train, sh)
    loss = _heldout(work, gguf, store, train, held, sh)
    data = {"machine": machine(), "shape": sh.__dict__, "matmul": ratio, "runs": runs, "profiles": profiles,
            "tracking": tracking, "prepare": prep, "heldout": loss}
    table = _table(gguf, reps, sh, data)
    if small:  # a check that the code runs: nothing saved
        print("\n".join(table))
    else:
        save("real", data, table)


def _table(gguf: Path, reps: int, sh: Shape, data: dict) -> list[str]:
    runs, m = data["runs"], data["matmul"]
    table = [f"SmolLM2-135M-Instruct (Q4_1 GGUF, {gguf.stat().st_size / 1e6:.0f} MB; stored fp32, 538 MB), "
             f"batch {sh.batch} x {sh.seq}, AdamW, blocktune's LoRA defaults (rank 8, q/k/v/o) in both; median "
             f"s/step over steps 2-{sh.steps} of each run, medians of {reps} alternated runs; peak anonymous memory "
             "(RssAnon, interpreter and torch included; blocktune's mapped store is page cache). bf16: blocktune "
             "computes in bf16 with fp32 adapters, masters and moments; transformers LoRA on bf16 weights with "
             "peft's fp32 adapters, full under torch.autocast(bf16) with fp32 weights and moments.", "",
             f"A {'x'.join(map(str, m['shape']))} matmul here: fp32 {m['gflops']['fp32']:.0f} GFLOP/s, bf16 "
             f"{m['gflops']['bf16']:.0f} GFLOP/s ({m['bf16_over_fp32']:.2f}x), side by side in one process.", "",
             "| dtype | method | run | s/step | ratio to transformers | peak anonymous |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    for dtype in DTYPES:
        for method in ("lora", "full"):
            mine = [r for r in runs if r["method"] == method and r["dtype"] == dtype]
            hf = statistics.median(r["step_median"] for r in mine if r["who"] == "transformers")
            for who in dict.fromkeys(r["who"] for r in mine):
                rs = [r for r in mine if r["who"] == who]
                s = statistics.median(r["step_median"] for r in rs)
                table.append(f"| {dtype} | {method} | {who} | {s:.2f} | {s / hf:.2f} | {rs[-1]['anon_peak'] / 1e9:.2f} GB |")
    table += ["", "Where a no-flag paged step's time goes (one profiled step after two timed ones, random "
              "tokens; seconds of operators' own time by kind on the computing thread (a full fine-tune's "
              "optimizer step runs on the write-back thread); the profiler's cost is in the wall time):", "", "| dtype | method | wall | matmul | attention | widen/copy | allocation | "
              "other ops | load waits | minor faults | system s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: "
              "| ---: | ---: | ---: | ---: |"]
    for p in data["profiles"]:
        k = p["op_self_s_by_kind"]
        table.append(f"| {p['dtype']} | {p['method']} | {p['wall_s']:.2f} | {k.get('matmul', 0):.2f} | "
                     f"{k.get('attention', 0):.2f} | {k.get('widen/copy', 0):.2f} | {k.get('allocation', 0):.2f} | "
                     f"{k.get('other', 0):.2f} | {p['load_wait_s']:.2f} | {p['rusage']['minor_faults']:,} | "
                     f"{p['rusage']['system_s']:.2f} |")
    table += ["", f"bf16 against fp32, {sh.track} steps from the same start on the same batches (`--compute-dtype "
              f"bf16` / `fp32`, warm-up 0); tolerance: every step's loss within {TRACK_TOL:.0%} of fp32's and the "
              f"last ten's mean within {TRACK_TOL_LAST:.0%}, or no further than transformers' own bf16 run from its "
              "fp32 run (same learning rate; LoRA on bf16 weights, full under autocast):", "", *tracking_rows(data["tracking"])]
    loss, prep = data["heldout"], data["prepare"]
    table += ["", "`blocktune prepare` of the GGUF file (cold page cache), against gguf's own reader dequantizing "
              "every tensor (no writing: the floor) and cp of the file:", "",
              "| run | seconds |", "| --- | ---: |"] + [f"| {k} | {v:.1f} |" for k, v in prep.items()]
    table += ["", f"{sh.track} LoRA steps (lr 1e-3, batch {sh.batch} x {sh.seq}, no flags) on 90% of the project's "
              f"corpus text; held-out loss on {loss['windows']} windows of the other 10%, measured by transformers: "
              f"the base GGUF {loss['before']:.3f}, the merged HF export {loss['after']:.3f}."]
    return table
