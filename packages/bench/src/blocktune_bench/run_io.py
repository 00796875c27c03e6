"""Benchmark groups of files and processes: prepare, export, generation, data parallel."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from blocktune.model.args import ModelArgs

from .common import cached_store, machine, save
from .measure import evict_from_page_cache


def group_prepare(work: Path, reps: int) -> None:
    from .synthetic import write_meta_checkpoint

    args = ModelArgs(dim=2048, n_layers=24, n_heads=16, vocab_size=32000, multiple_of=256)
    src = work / "meta-2shards"
    if not (src / "params.json").exists():
        write_meta_checkpoint(src, args, seed=0, n_shards=2)
    files = sorted(src.glob("consolidated.*.pth"))
    size = sum(f.stat().st_size for f in files)
    runs = []
    for _ in range(reps):
        for what in ("cp", "prepare"):
            dst = work / f"prepare-{what}"
            shutil.rmtree(dst, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            evict_from_page_cache(files)
            if what == "cp":
                t0 = time.perf_counter()
                subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
                subprocess.run(["sync"], check=True)  # prepare fsyncs every file; so must the copy
                runs.append({"what": "cp", "seconds": time.perf_counter() - t0})
            else:
                t0 = time.perf_counter()
                out = subprocess.run([sys.executable, "-m", "blocktune_bench.probes", "prepare", str(src), str(dst)], check=True,
                                     capture_output=True, text=True).stdout.split()
                runs.append({"what": "prepare", "seconds": time.perf_counter() - t0,
                             "inner_seconds": float(out[0]), "peak_rss": int(out[1]), "peak_anon": int(out[2])})
            print(json.dumps(runs[-1]), flush=True)
            shutil.rmtree(dst, ignore_errors=True)
    cp = statistics.median(r["seconds"] for r in runs if r["what"] == "cp")
    prep = [r for r in runs if r["what"] == "prepare"]
    pt = statistics.median(r["seconds"] for r in prep)
    rss = max(r["peak_rss"] for r in prep)
    anon = max(r["peak_anon"] for r in prep)
    table = [f"Meta checkpoint of {size / 1e9:.2f} GB (bf16, 2 shards, dim {args.dim}, {args.n_layers} layers), "
             f"cold page cache before each run, medians of {reps} alternated runs (wall time of the whole "
             f"process, interpreter start included; both end with their data on disk). Peak RSS counts the "
             f"checkpoint's mapped pages (page cache); anonymous is what the process alone holds "
             f"(RssAnon, sampled every 2 ms, interpreter and torch included).", "",
             "| run | seconds | GB/s | ratio to cp | peak RSS | peak anonymous |", "| --- | ---: | ---: | ---: | ---: | ---: |",
             f"| cp -r + sync | {cp:.2f} | {size / cp / 1e9:.2f} | 1.00 | | |",
             f"| blocktune prepare | {pt:.2f} | {size / pt / 1e9:.2f} | {cp / pt:.2f} | "
             f"{rss / 1e9:.2f} GB ({rss / size:.0%} of the checkpoint) | {anon / 1e9:.2f} GB ({anon / size:.0%}) |"]
    save("prepare", {"machine": machine(), "checkpoint_bytes": size, "runs": runs,
                     "throughput_ratio_to_cp": cp / pt, "peak_rss_fraction": rss / size,
                     "peak_anon_fraction": anon / size}, table)


def group_export(work: Path, reps: int) -> None:
    """`blocktune export` to Meta's layout (1, 2 and 8 shards) and to HF's: time and the
    anonymous memory it adds at its peak (RssAnon sampled every 2 ms; the store's mapped pages
    are page cache, which the kernel can take back)."""
    args = ModelArgs(dim=2048, n_layers=24, n_heads=16, vocab_size=32000, multiple_of=256)
    store = cached_store(work / "export-bf16", args, seed=0, dtype=torch.bfloat16)
    size = sum(f.stat().st_size for f in store.glob("*.safetensors"))
    cases = [("meta", 1), ("meta", 2), ("meta", 8), ("hf", None)]
    runs = []
    for rep in range(reps):
        for fmt, shards in cases:
            out = work / "export-out"
            shutil.rmtree(out, ignore_errors=True)
            flags = ["--format", fmt] + (["--shards", str(shards)] if shards else [])
            res = subprocess.run([sys.executable, "-m", "blocktune_bench.probes", "export", str(store), str(out), *flags],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                runs.append({"format": fmt, "shards": shards, "rep": rep, "error": res.stderr[-500:]})
                continue
            seconds, peak = res.stderr.strip().splitlines()[-1].split()
            runs.append({"format": fmt, "shards": shards, "rep": rep, "seconds": float(seconds),
                         "anon_peak": int(peak)})
            print(json.dumps(runs[-1]), flush=True)
    shutil.rmtree(work / "export-out", ignore_errors=True)
    table = [f"`blocktune export STORE OUT --format F [--shards N]` of a bf16 store of {size / 1e9:.2f} GB "
             f"(24 layers, dim 2048), bf16 out, warm page cache; median of {reps} runs. Anonymous memory: "
             "RssAnon at its peak minus before the export (the interpreter and torch excluded).", "",
             "| format | shards | seconds | GB/s | anonymous memory at peak (GB) | of the store |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for fmt, shards in cases:
        ok = [r for r in runs if r["format"] == fmt and r["shards"] == shards and "error" not in r]
        if not ok:
            table.append(f"| {fmt} | {shards or ''} | failed | | | |")
            continue
        sec = statistics.median(r["seconds"] for r in ok)
        peak = max(r["anon_peak"] for r in ok)
        table.append(f"| {fmt} | {shards or '1 file'} | {sec:.2f} | {size / sec / 1e9:.2f} | {peak / 1e9:.3f} | "
                     f"{peak / size:.1%} |")
    save("export", {"machine": machine(), "store_bytes": size, "runs": runs}, table)


def group_generate(work: Path, reps: int) -> None:
    store = cached_store(work / "bench-1k", "bench-1k", seed=0)
    runs = []
    for _ in range(reps):
        for mode in ("paged", "memory"):
            out = subprocess.run([sys.executable, "-m", "blocktune_bench.probes", "generate", str(store), mode], check=True,
                                 capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    same = len({tuple(r["out"]) for r in runs}) == 1
    med = {m: statistics.median(r["tokens_per_s"] for r in runs if r["mode"] == m) for m in ("paged", "memory")}
    table = ["Greedy generation, 48 new tokens after a 16-token prompt, KV cache, bench-1k (16 layers, dim 1024, "
             "fp32), all units resident after a warm-up; medians of alternated runs.", "",
             "| run | tokens/s | ratio |", "| --- | ---: | ---: |",
             f"| blocktune paged engine | {med['paged']:.1f} | {med['paged'] / med['memory']:.2f} |",
             f"| in-memory model | {med['memory']:.1f} | 1.00 |", "",
             f"Same tokens from both: {same}."]
    save("generate", {"machine": machine(), "runs": runs, "tokens_per_s": med, "same_tokens": same}, table)


def group_dist(work: Path, reps: int) -> None:
    store = cached_store(work / "bench-1k", "bench-1k", seed=0)
    runs = []
    for _ in range(reps):
        for n in (1, 2):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                   "-m", "blocktune_bench.dist_bench", str(store), "4", "256", "2"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs.append(json.loads([line for line in out.splitlines() if line.startswith("{")][-1]))
            print(json.dumps(runs[-1]), flush=True)
    med = {n: statistics.median(r["step_median"] for r in runs if r["ranks"] == n) for n in (1, 2)}
    red = next(r["bytes_all_reduced_per_step"] for r in runs if r["ranks"] == 2)
    paged = next(r["bytes_read_per_step_per_rank"] for r in runs if r["ranks"] == 2)
    table = ["LoRA (rank 16, wq/wk/wv/wo), bench-1k (16 layers, dim 1024, fp32), global batch 4 x 256, "
             "2-unit budget per rank, gloo over loopback, the machine's 2 cores split between the ranks "
             f"(torch threads = 2 / ranks); medians of {reps} alternated runs.", "",
             "| processes | s/step | tokens/s | speed-up | bytes all-reduced per step | bytes paged per step per rank |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n in (1, 2):
        table.append(f"| {n} | {med[n]:.2f} | {4 * 256 / med[n]:.0f} | {med[1] / med[n]:.2f} | "
                     f"{red if n == 2 else 0:,} | {paged:,} |")
    save("dist", {"machine": machine(), "runs": runs, "median_step": med}, table)
