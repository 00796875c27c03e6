"""Bench group `peer`: blocktune beside slowllama on slowllama's own fine-tune settings (issue #31).

slowllama (github.com/okuvshynov/slowllama) is the tool blocktune grew from: it pages a Llama 2
model through the device block by block and recomputes each block in the backward. Nothing of it
is shipped here: give a checkout with `--slowllama PATH` (or $SLOWLLAMA); without one the group
says so and skips.

Both tools get the same Meta checkpoint (the 16-layer dim-1024 bench shape, random weights, the
project's sentencepiece tokenizer) and the same text. slowllama runs as its scripts do
(`slowllama_drive`: prepare_model.py, then finetune.py's loop with its conf.py settings, on the
CPU) in its conf_fp32 configuration (compute fp32, frozen weights bf16). Its conf_fp16 is for Apple's
GPU: on a CPU without native fp16 one of its iterations took over 10 minutes here (2026-12-07, AMD
EPYC), so it is left out. blocktune runs as a user would run it:
`blocktune prepare`, then `blocktune finetune` with slowllama's settings spelled as flags (LoRA
rank 4, alpha 64, dropout 0.05 on wq and wv, 16 x 128 tokens a step, AdamW at lr 1e-4) and no
budget or dtype flag — then with `--compute-dtype fp32` (slowllama's conf_fp32 arithmetic) and with
`--keep-activations 0` (every block recomputed, as slowllama does). Every run is in a cgroup with
no limit, for its peak (page cache included); the configurations alternate, `reps` times; the
figure is the median of each run's steps after the first.

    python -m blocktune_bench.run --only peer --slowllama ~/src/slowllama [--reps 2]
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from .common import cli_under_limit, machine, save

__all__ = ["group_peer"]

STEPS = 3
TOKENS = 16 * 128
SETTINGS = ("--method", "lora", "--lora-rank", "4", "--lora-alpha", "64", "--lora-dropout", "0.05",
            "--lora-targets", "wq", "wv", "--batch-size", "16", "--grad-accum", "1", "--seq-len", "128",
            "--lr", "1e-4", "--warmup-steps", "0", "--steps", str(STEPS), "--eval-every", "0",
            "--eval-batches", "1")
BLOCKTUNE = {"blocktune, no budget or dtype flag": (),
             "blocktune --compute-dtype fp32": ("--compute-dtype", "fp32"),
             "blocktune --keep-activations 0": ("--keep-activations", "0")}
SLOWLLAMA = {"slowllama conf_fp32": "fp32"}


def _limited(cmd: list[str]) -> tuple[dict, dict]:
    """Run `cmd` in a cgroup with no limit: (its last stdout line as JSON, the cgroup's report)."""
    r = subprocess.run([sys.executable, "-m", "blocktune_bench.limited", "none", "--", *cmd],
                       capture_output=True, text=True)
    err = r.stderr.strip().splitlines()
    report = json.loads(err[-1]) if err and err[-1].startswith("{") else {"exit_code": r.returncode}
    out = r.stdout.strip().splitlines()
    if r.returncode or not out:
        report["error"] = r.stderr[-1500:]
        return {}, report
    return json.loads(out[-1]), report


def _slowllama(checkout: Path, phase: str, meta: Path, work: Path, conf: str, *rest: str) -> tuple[dict, dict]:
    return _limited([sys.executable, "-m", "blocktune_bench.slowllama_drive", str(checkout), phase, str(meta),
                     str(work), conf, *rest])


def group_peer(work: Path, reps: int = 2, checkout: str | None = None) -> None:
    checkout = checkout or os.environ.get("SLOWLLAMA")
    if not checkout or not (Path(checkout) / "llama2_loader.py").exists():
        print(f"peer: skipped: no slowllama checkout (--slowllama PATH or $SLOWLLAMA; got {checkout!r})", flush=True)
        return
    checkout = Path(checkout).resolve()
    commit = os.environ.get("SLOWLLAMA_COMMIT") or subprocess.run(  # the variable: for a copy made by `git archive`
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "?"
    from .corpus import corpus_text
    from .synthetic import preset, write_meta_checkpoint

    work = work / "peer"
    meta, store, data = work / "meta-1k", work / "store-1k", work / "corpus.txt"
    if not (meta / "params.json").exists():
        write_meta_checkpoint(meta, dataclasses.replace(preset("bench-1k"), vocab_size=1024))  # the tokenizer's
    data.write_text(corpus_text())
    if not (store / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "blocktune", "prepare", str(meta), str(store)], check=True)
    prepared = {}
    for name, conf in SLOWLLAMA.items():
        if not (work / f"slow-{conf}" / "frozen" / "model.pth").exists():
            out, report = _slowllama(checkout, "prepare", meta, work / f"slow-{conf}", conf)
            prepared[name] = out.get("prepare_s", report.get("error"))
    runs: dict[str, list[dict]] = {k: [] for k in [*SLOWLLAMA, *BLOCKTUNE]}
    for rep in range(reps):
        order = list(runs) if rep % 2 == 0 else list(reversed(runs))
        for name in order:
            if name in SLOWLLAMA:
                out, report = _slowllama(checkout, "train", meta, work / f"slow-{SLOWLLAMA[name]}", SLOWLLAMA[name],
                                         str(data), str(STEPS))
                report["steps"] = out.get("step_s", [])[1:]
                report["loss"] = out.get("loss")
            else:
                report = cli_under_limit("none", store, data, work / "bt", *SETTINGS, *BLOCKTUNE[name])
                report["steps"] = [r["seconds"] for r in report["rows"][1:]]
                report["loss"] = [r["loss"] for r in report["rows"]]
                report.pop("rows")
            runs[name].append(report)
            print(name, [round(s, 2) for s in report["steps"]], report.get("error", ""), flush=True)
    step = {k: statistics.median(s for r in v for s in r["steps"]) if any(r["steps"] for r in v) else None
            for k, v in runs.items()}
    peak = {k: max((r.get("cgroup_peak_bytes") or 0) for r in v) / 1e9 for k, v in runs.items()}
    ref = step["slowllama conf_fp32"]
    notes = list({n.split(":")[0]: n for r in runs["blocktune, no budget or dtype flag"]
                  for n in r.get("budget_notes", [])}.values())  # one of each kind: the free memory varies
    table = [f"slowllama {commit} (its conf.py settings: LoRA rank 4 on wq/wv, 16 x 128 tokens a step, AdamW) "
             "beside `blocktune finetune` with the same settings as flags, on one Meta checkpoint (16 layers, "
             "dim 1024, vocab 1024, random weights, bf16) and one text, both on the CPU, in RAM; median of the "
             f"steps after the first, {reps} alternated runs of {STEPS} steps each.", "",
             "| run | s/step | tokens/s | speed against slowllama conf_fp32 | cgroup peak incl. page cache (GB) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for k, s in step.items():
        if s is None:
            table.append(f"| {k} | did not run: {runs[k][-1].get('error', '')[-200:]!r} | | | |")
            continue
        table.append(f"| {k} | {s:.2f} | {TOKENS / s:.0f} | {ref / s:.2f}x | {peak[k]:.2f} |" if ref else
                     f"| {k} | {s:.2f} | {TOKENS / s:.0f} | | {peak[k]:.2f} |")
    table += ["", "What `auto` chose for blocktune: " + " / ".join(notes)]
    if prepared:
        table += ["", "slowllama's prepare (Meta folder -> its frozen blocks): " +
                  ", ".join(f"{k} {v:.1f} s" if isinstance(v, float) else f"{k} {v!r}" for k, v in prepared.items())]
    save("peer", {"machine": machine(), "slowllama": {"commit": commit}, "runs": runs, "step_s": step,
                  "peak_gb": peak}, table)
