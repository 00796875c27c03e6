"""The real model's benchmark group (`python -m blocktune_bench.run --only real`): SmolLM2-135M-
Instruct from its GGUF file. `blocktune prepare` against gguf's own reader dequantizing every
tensor (the floor) and cp; a LoRA and a full step from the CLI against transformers (+ peft) in
memory on the same file, text and shapes, with their peak anonymous memory; a 30-step LoRA run on
text the project ships, its held-out loss before and after measured by transformers (the base GGUF
file, then the merged HF export)."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import machine, save
from .corpus import corpus_text
from .measure import evict_from_page_cache
from .realmodel import HOW_TO_FETCH, smollm2_gguf

BATCH, SEQ, STEPS = 4, 256, 6


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


def _ours(work: Path, store: Path, train: Path, method: str, *flags: str) -> dict:
    out = work / f"run-{method}"
    shutil.rmtree(out, ignore_errors=True)
    if method == "full":  # a full fine-tune writes its store: a fresh copy each time
        shutil.rmtree(work / "store-full", ignore_errors=True)
        shutil.copytree(store, work / "store-full")
        store = work / "store-full"
    r = _probe("finetune", "--store", str(store), "--data", str(train), "--out", str(out), "--method", method,
               "--steps", str(STEPS), "--batch-size", str(BATCH), "--grad-accum", "1", "--seq-len", str(SEQ),
               "--no-progress", "--checkpoint-every", "1000", "--set", "val_ratio=0", "--set", "eval_every=0",
               "--set", "sample_every=0", *flags)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    mem = json.loads(r.stderr.strip().splitlines()[-1])
    return {"seconds": [row["seconds"] for row in rows if "seconds" in row], "anon_peak": mem["anon_peak"]}


def _steps(work: Path, gguf: Path, store: Path, train: Path, reps: int) -> list[dict]:
    runs = []
    for _ in range(reps):
        for method in ("lora", "full"):
            cases = [("blocktune", ()), ("transformers", None)]
            if method == "lora":
                cases.insert(1, ("blocktune --keep-activations inf", ("--keep-activations", "inf")))
            for who, flags in cases:
                if flags is None:
                    got = json.loads(_probe("hf_step", str(gguf), str(train), method, str(BATCH), str(SEQ),
                                            str(STEPS)).stdout.strip().splitlines()[-1])
                else:
                    got = _ours(work, store, train, method, *flags)
                runs.append({"method": method, "who": who, "step_median": statistics.median(got["seconds"][1:]),
                             "anon_peak": got["anon_peak"], "seconds": got["seconds"]})
                print(json.dumps(runs[-1]), flush=True)
    return runs


def _heldout(work: Path, gguf: Path, store: Path, train: Path, held: Path) -> dict:
    before = json.loads(_probe("hf_loss", str(gguf.parent), gguf.name, str(held), str(SEQ)).stdout)
    out = work / "run-30"
    shutil.rmtree(out, ignore_errors=True)
    _blocktune("finetune", "--store", str(store), "--data", str(train), "--out", str(out), "--steps", "30",
               "--batch-size", str(BATCH), "--grad-accum", "1", "--seq-len", str(SEQ), "--lr", "1e-3",
               "--no-progress", "--set", "val_ratio=0", "--set", "eval_every=0", "--set", "sample_every=0")
    shutil.rmtree(work / "merged", ignore_errors=True)
    _blocktune("export", str(store), str(work / "merged"), "--format", "hf", "--adapter",
               str(out / "adapter.safetensors"), "--dtype", "fp32")
    after = json.loads(_probe("hf_loss", str(work / "merged"), "-", str(held), str(SEQ)).stdout)
    return {"before": before["loss"], "after": after["loss"], "windows": before["windows"]}


def group_real(work: Path, reps: int) -> None:
    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit(f"the real model is not in the cache: {HOW_TO_FETCH}")
    work.mkdir(parents=True, exist_ok=True)
    text = corpus_text(300_000)
    cut = int(len(text) * 0.9)
    train, held = work / "train.txt", work / "heldout.txt"
    train.write_text(text[:cut])
    held.write_text(text[cut:cut + 20_000])
    store = work / "store"
    if not (store / "manifest.json").exists():
        _blocktune("prepare", str(gguf), str(store))
    prep = _prepare(work, gguf, reps)
    runs = _steps(work, gguf, store, train, reps)
    loss = _heldout(work, gguf, store, train, held)
    med = {(r["method"], r["who"]): r for r in runs}  # the last rep's peaks; medians below
    table = [f"SmolLM2-135M-Instruct (Q4_1 GGUF, {gguf.stat().st_size / 1e6:.0f} MB; stored fp32, 538 MB), "
             f"fp32 compute, batch {BATCH} x {SEQ}, AdamW, blocktune's LoRA defaults (rank 8, q/k/v/o) in both; "
             f"median s/step over steps 2-{STEPS} of each run, medians of {reps} alternated runs; peak anonymous "
             "memory (RssAnon, interpreter and torch included; blocktune's mapped store is page cache).", "",
             "| method | run | s/step | ratio to transformers | peak anonymous |", "| --- | --- | ---: | ---: | ---: |"]
    for method in ("lora", "full"):
        whos = [w for (m, w) in med if m == method]
        hf = statistics.median(r["step_median"] for r in runs if r["method"] == method and r["who"] == "transformers")
        for who in whos:
            s = statistics.median(r["step_median"] for r in runs if r["method"] == method and r["who"] == who)
            table.append(f"| {method} | {who} | {s:.2f} | {s / hf:.2f} | {med[(method, who)]['anon_peak'] / 1e9:.2f} GB |")
    table += ["", "`blocktune prepare` of the GGUF file (cold page cache), against gguf's own reader dequantizing "
              "every tensor (no writing: the floor) and cp of the file:", "",
              "| run | seconds |", "| --- | ---: |"] + [f"| {k} | {v:.1f} |" for k, v in prep.items()]
    table += ["", f"30 LoRA steps (lr 1e-3, batch {BATCH} x {SEQ}) on 90% of the project's corpus text; held-out "
              f"loss on {loss['windows']} windows of the other 10%, measured by transformers: the base GGUF "
              f"{loss['before']:.3f}, the merged HF export {loss['after']:.3f}."]
    save("real", {"machine": machine(), "runs": runs, "prepare": prep, "heldout": loss}, table)
