"""Benchmark groups under memory limits from the CLI: `auto` budgets, and each family's 7B-class shape."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from blocktune.model.args import ModelArgs
from blocktune.store.store import BlockStore

from .common import RESULTS, cached_store, cli_under_limit, machine, save


def group_auto(work: Path) -> None:
    """Issue 12's laptop cases, from the CLI with no budget flags, under kernel memory limits."""
    from .corpus import demo_text, tokenizer_path

    laptop = ModelArgs(dim=2048, n_layers=30, n_heads=16, vocab_size=32000, multiple_of=256)
    small = cached_store(work / "laptop-30x2048", laptop, seed=0, dtype=torch.bfloat16, tokenizer=tokenizer_path())
    big = cached_store(work / "shape-7b-tok", "shape-7b", seed=0, dtype=torch.bfloat16, tokenizer=tokenizer_path())
    data = work / "notes.txt"
    data.write_text(demo_text())
    limit_small = BlockStore.open(small).total_bytes() // 3
    cases = [("lora", small, limit_small, ["--method", "lora", "--steps", "1", "--batch-size", "1", "--seq-len", "64"]),
             ("full", small, limit_small, ["--method", "full", "--steps", "1", "--batch-size", "1", "--seq-len", "64",
                                           "--grad-accum", "1"]),
             ("lora", big, 2 << 30, ["--method", "lora", "--steps", "1", "--batch-size", "1", "--seq-len", "128",
                                     "--grad-accum", "1"])]
    runs = []
    for method, store, limit, flags in cases:
        target = store
        if method == "full":  # a full fine-tune changes its store: work on a copy
            target = work / f"{store.name}-full"
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(store, target, ignore=shutil.ignore_patterns(".lock"))
        r = cli_under_limit(str(limit), target, data, work / f"auto-{method}-{store.name}", *flags)
        r.update({"method": method, "store": store.name, "store_bytes": BlockStore.open(store).total_bytes()})
        print(json.dumps(r), flush=True)
        runs.append(r)
    table = ["`blocktune finetune` with no budget flags (budgets `auto`), fp32 compute (the CPU default), in a "
             "memory cgroup (v1, no swap) made by `python -m blocktune_bench.limited LIMIT -- blocktune finetune ...`.", "",
             "| store | method | limit | exit | cgroup peak | step s | GB read | budgets chosen |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in runs:
        step = f"{r['step_seconds']:.1f}" if r.get("step_seconds") else "—"
        table.append(f"| {r['store']} ({r['store_bytes'] / 1e9:.2f} GB bf16) | {r['method']} | {r['limit_bytes'] / 2**20:.0f} MiB | "
                     f"{r['exit_code']}{' (OOM-killed)' if r.get('oom_kills') else ''} | "
                     f"{(r.get('cgroup_peak_bytes') or 0) / 2**20:.0f} MiB | {step} | {r.get('gb_read') or 0:.2f} | "
                     f"{'; '.join(r['budget_notes'])[:400]} |")
    save("auto-budgets", {"machine": machine(), "runs": runs}, table)


def group_families(work: Path) -> None:
    """Issue 13's acceptance: a 7B-class shape of each family, as a Hugging Face folder (config by
    transformers, bf16 shards), prepared with `blocktune prepare` and taking a LoRA step with
    `blocktune finetune` (no budget flags), each under a 2 GiB memory cgroup."""
    from .corpus import demo_text
    from .families import SHAPES, make_shape_checkpoint

    data = work / "notes.txt"
    data.write_text(demo_text())
    limit = 2 << 30
    runs = []
    only = os.environ.get("BLOCKTUNE_SHAPES")  # a comma-separated subset, to rerun some
    for shape in [s for s in SHAPES if not only or s in only.split(",")]:
        hf, store = work / f"hf-{shape}", work / f"store-{shape}"
        for p in (hf, store):
            if p.exists():
                shutil.rmtree(p)
        make_shape_checkpoint(hf, shape)
        cmd = [sys.executable, "-m", "blocktune_bench.limited", str(limit), "--", sys.executable, "-m", "blocktune",
               "prepare", str(hf), str(store)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        prep = json.loads(r.stderr.strip().splitlines()[-1])
        shutil.rmtree(hf)  # two copies of a 16 GB model do not fit this disk beside the next one
        step = cli_under_limit(str(limit), store, data, work / f"families-{shape}", "--method", "lora", "--steps",
                               "1", "--batch-size", "1", "--seq-len", "128", "--grad-accum", "1")
        info = BlockStore.open(store)
        run = {"shape": shape, "store_bytes": info.total_bytes(), "params": info.args.n_params(),
               "prepare": prep, "lora_step": step}
        info.close()
        shutil.rmtree(store)
        print(json.dumps(run), flush=True)
        runs.append(run)
    # a rerun of some shapes keeps today's figures of the others (each row says its commit)
    for r in runs:
        r["commit"] = machine()["commit"]
    earlier = RESULTS / f"{machine()['date'][:10]}-cpu-families.json"
    if earlier.exists():
        done = {r["shape"] for r in runs}
        runs = [r for r in json.loads(earlier.read_text())["runs"] if r["shape"] not in done] + runs
    runs.sort(key=lambda r: list(SHAPES).index(r["shape"]))
    table = ["7B-class shapes from Hugging Face folders, each command in its own 2 GiB memory cgroup (v1, no swap, "
             "page cache included) via `python -m blocktune_bench.limited 2GiB -- blocktune ...`; "
             "`blocktune prepare HF STORE`, then `blocktune finetune --store STORE --data notes.txt --method lora "
             "--steps 1 --batch-size 1 --seq-len 128 --grad-accum 1` (budgets auto, fp32 compute).", "",
             "| shape | params | store | prepare: exit, s, peak | LoRA step: exit, peak, step s, GB read | commit |",
             "| --- | ---: | ---: | --- | --- | --- |"]
    for r in runs:
        p, s = r["prepare"], r["lora_step"]
        step = f"{s['step_seconds']:.1f}" if s.get("step_seconds") else "—"
        table.append(f"| {r['shape']} | {r['params'] / 1e9:.2f} B | {r['store_bytes'] / 1e9:.1f} GB bf16 | "
                     f"{p['exit_code']}, {p['seconds']:.0f} s, {p['cgroup_peak_bytes'] / 2**20:.0f} MiB | "
                     f"{s['exit_code']}{' (OOM-killed)' if s.get('oom_kills') else ''}, "
                     f"{(s.get('cgroup_peak_bytes') or 0) / 2**20:.0f} MiB, {step} s, {s.get('gb_read') or 0:.1f} | "
                     f"{r.get('commit', '64af7d3')} |")
    save("families", {"machine": machine(), "limit_bytes": limit, "runs": runs}, table)
