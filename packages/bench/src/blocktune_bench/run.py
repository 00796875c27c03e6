"""`nox -s bench`: the CPU figures, each configuration in its own process, side by side.

    python -m blocktune_bench.run [--only step,limit,headline] [--reps 3] [--workdir DIR]

step      16 layers, dim 1024, fp32, batch 2 x 256, LoRA and full fine-tune: the paged step
          against plain in-memory autograd and against per-block activation checkpointing
          (the same arithmetic), weights in the page cache, alternating runs, medians.
limit     a model over 3x larger than a kernel-enforced memory limit (cgroup) completes LoRA
          and full fine-tune steps.
headline  a 7B-shaped model (dim 4096, 32 layers, vocab 32000, bf16, about 13.5 GB) completes a
          LoRA step with batch 1 x 128 under a 2 GiB memory limit.
prepare   Meta -> store throughput on a 2.7 GB checkpoint against cp of the same files; peak RSS.
export    store -> Meta (1 and 2 shards) of a 2.7 GB bf16 store: time and the anonymous memory
          it takes at its peak (mapped page cache aside).
generate  generation tokens/s of the paged engine against the same model in memory.
dist      data-parallel LoRA: 2 processes against 1 on this machine, and bytes all-reduced.
real      SmolLM2-135M-Instruct (GGUF): prepare against gguf's reader; LoRA and full steps from the CLI
          against transformers + peft in memory; a 30-step LoRA run's held-out loss before and after.
stages    pipeline stages: bytes each rank reads, S = 1, 2, 4; a worked model of 70B on 4 and 8 machines.
reliability  the reliability campaign, small (10 kills, 3 writer trials, 300 fuzz cases) with the
          attacks of #29 (blocktune_bench.reliability, blocktune_bench.attacks).
disk      the headline's step on a disk a cgroup slows to BLOCKTUNE_READ_RATE (400MB): step time
          against max(IO floor, compute floor), driver and CLI, beside BLOCKTUNE_BASELINE (a checkout).
floor     the README's no-flag `blocktune finetune` step, this disk as it is, against max(IO floor, the same
          command in RAM): LoRA on the 7B shape under 2 GiB, LoRA and full on the laptop shape under 1 GiB.
peer      blocktune beside slowllama (a checkout: --slowllama PATH or $SLOWLLAMA; skipped without one) on
          slowllama's own LoRA settings: its conf_fp32 against blocktune's defaults.

Results: benchmarks/results/<date>-cpu-<group>.json and .md (machine, date, commit, command).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from blocktune.model.args import ModelArgs
from blocktune.store.store import BlockStore

from .common import cached_store, disk_bandwidth, machine, matmul_rate, measure, save
from .measure import evict_from_page_cache
from .run_disk import group_disk
from .run_floor import group_floor
from .run_io import group_dist, group_export, group_generate, group_prepare
from .run_limits import group_auto, group_families
from .run_real import group_real
from .run_stages import group_stages
from .synthetic import SHAPES


def group_step(work: Path, reps: int) -> None:
    base = cached_store(work / "bench-1k", "bench-1k", seed=0)
    runs: list[dict] = []
    for method in ("lora", "full"):
        for rep in range(reps if method == "lora" else max(1, reps - 1)):
            for mode in ("paged", "paged-keep", "paged-lean", "plain", "ckpt") if method == "lora" else ("paged", "paged-keep", "plain", "ckpt"):
                store = base
                if mode.startswith("paged") and method == "full":  # a full fine-tune rewrites its store
                    store = work / "bench-1k-full"
                    shutil.rmtree(store, ignore_errors=True)
                    shutil.copytree(base, store)
                r = measure(store, mode, method, "--steps", "3", "--budget-units", "2")
                r["rep"] = rep
                runs.append(r)
                print(json.dumps({k: r.get(k) for k in ("method", "mode", "rep", "step_median", "peak_rss", "error")}), flush=True)
    summary = {}
    table = ["Batch 2 x 256, fp32, 16 layers, dim 1024 (222M parameters, 0.89 GB); paged budget: 2 units "
             "resident; weights in the page cache. Median of per-run medians (3 timed steps each, after one "
             "warm-up step), runs alternated. ckpt = in-memory with per-block activation checkpointing (the "
             "same arithmetic as paged). paged-keep = `keep_budget=None`: activations kept from the "
             "first forward, weights in the graph as pager handles, no recompute. paged-lean = `lean_memory=True` "
             "(freed heap returned to the OS between units).", "",
             "Peak RSS counts the page cache a process has mapped (a LoRA run keeps its frozen unit files "
             "mapped; the kernel takes those pages back under memory pressure); anonymous is the "
             "memory only the process holds (RssAnon, sampled every 10 ms).", "",
             "| method | paged s/step | plain s/step | ckpt s/step | paged/plain | paged/ckpt | peak RSS paged / plain / ckpt (GB) | peak anonymous paged / plain / ckpt (GB) | GB read, written per paged step |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for method in ("lora", "full"):
        s = {}
        for mode in ("paged", "paged-keep", "paged-lean", "plain", "ckpt"):
            ok = [r for r in runs if r["method"] == method and r["mode"] == mode and "error" not in r]
            if ok:
                s[mode] = {"step_median": statistics.median(r["step_median"] for r in ok),
                           "peak_rss": max(r["peak_rss"] for r in ok),
                           "peak_anon": max(r.get("peak_anon", 0) for r in ok),
                           "read": statistics.median(r["bytes_read_per_step"] for r in ok),
                           "written": statistics.median(r["bytes_written_per_step"] for r in ok)}
        if all(m in s for m in ("paged", "plain", "ckpt")):
            s["paged_over_plain"] = s["paged"]["step_median"] / s["plain"]["step_median"]
            s["paged_over_ckpt"] = s["paged"]["step_median"] / s["ckpt"]["step_median"]
            s["rss_paged_over_plain"] = s["paged"]["peak_rss"] / s["plain"]["peak_rss"]
            table.append(
                f"| {method} | {s['paged']['step_median']:.2f} | {s['plain']['step_median']:.2f} | "
                f"{s['ckpt']['step_median']:.2f} | {s['paged_over_plain']:.2f} | {s['paged_over_ckpt']:.2f} | "
                f"{s['paged']['peak_rss'] / 1e9:.2f} / {s['plain']['peak_rss'] / 1e9:.2f} / "
                f"{s['ckpt']['peak_rss'] / 1e9:.2f} ({s['rss_paged_over_plain']:.0%}) | "
                f"{s['paged']['peak_anon'] / 1e9:.2f} / {s['plain']['peak_anon'] / 1e9:.2f} / "
                f"{s['ckpt']['peak_anon'] / 1e9:.2f} ({s['paged']['peak_anon'] / s['plain']['peak_anon']:.0%}) | "
                f"{s['paged']['read'] / 1e9:.2f}, {s['paged']['written'] / 1e9:.2f} |")
        for variant in ("paged-keep", "paged-lean"):
            if variant in s and "paged_over_plain" in s:
                v = s[variant]
                table.append(
                    f"| {method} ({variant}) | {v['step_median']:.2f} | | | "
                    f"{v['step_median'] / s['plain']['step_median']:.2f} | {v['step_median'] / s['ckpt']['step_median']:.2f} | "
                    f"{v['peak_rss'] / 1e9:.2f} ({v['peak_rss'] / s['plain']['peak_rss']:.0%} of plain) | "
                    f"{v['peak_anon'] / 1e9:.2f} ({v['peak_anon'] / s['plain']['peak_anon']:.0%} of plain) | |")
        summary[method] = s
    save("step", {"machine": machine(), "summary": summary, "runs": runs}, table)


def group_limit(work: Path) -> None:
    args = ModelArgs(dim=1536, n_layers=30, n_heads=12, vocab_size=8192, multiple_of=256, max_seq_len=512)
    store = cached_store(work / "limit-3x-30", args, seed=0)
    size = sum(p.stat().st_size for p in store.glob("*.safetensors"))
    limit = 1 << 30
    runs = []
    # LoRA: two units resident, so the next unit's read overlaps this one's compute. Full: one
    # (unit, AdamW state, gradients and a write-back of 0.1 + 0.2 GB each do not fit twice).
    budgets = {"lora": "2", "full": "1"}
    for method in ("lora", "full"):
        for limited in (True, False):  # under the limit from a cold disk; then the same, in RAM
            target = store
            if method == "full":
                target = work / "limit-3x-30-full"
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(store, target)
            extra = ("--memory-limit", str(limit), "--cold") if limited else ()
            r = measure(target, "paged", method, "--steps", "2", "--batch", "1", "--seq", "128",
                        "--budget-units", budgets[method], "--max-dirty", "128MiB", *extra)
            r["limited"] = limited
            runs.append(r)
            print(json.dumps({k: r.get(k) for k in ("method", "limited", "step_median", "peak_rss", "cgroup_peak", "error")}), flush=True)
    unit = max(p.stat().st_size for p in store.glob("block_*.safetensors"))
    bw = disk_bandwidth(work, unit, files=8)
    table = [f"Model {size / 1e9:.2f} GB (fp32, {args.n_layers} layers, dim {args.dim}) under a cgroup memory limit of "
             f"{limit / 2**20:.0f} MiB ({size / limit:.1f}x the limit); paged budget 2 units (LoRA) or 1 (full); batch "
             f"1 x 128. In RAM: the same run without the limit, its store in the page cache (what compute alone costs). "
             f"Disk-bound: the floor is bytes read / read bandwidth + bytes written / write bandwidth, measured "
             f"just before on 8 files of one unit's size ({unit / 1e6:.0f} MB): cold mapped read "
             f"{bw['read_GBps']:.2f} GB/s (LoRA reads frozen units so), O_DIRECT read {bw['direct_read_GBps']:.2f} "
             f"and write {bw['direct_write_GBps']:.2f} GB/s (a full fine-tune's units and state, and LoRA's "
             f"frozen units when the store is bigger than RAM, as here). Where compute takes longer than the IO, "
             f"no overlap can reach the IO floor: the last ratio is to the larger of the two.", "",
             "| method | completed | s/step | in RAM s/step | IO floor (s) | step / IO floor | step / max(IO floor, in RAM) | peak RSS (GB) | cgroup peak incl. page cache (GB) | GB read, written per step |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    in_ram = {r["method"]: r.get("step_median") for r in runs if not r["limited"]}
    for r in runs:
        if not r["limited"]:
            continue
        if "error" in r:
            table.append(f"| {r['method']} | no: {r['error'][-120:]!r} (rc {r.get('returncode')}) | | | | | | | | |")
            continue
        r["io_floor_seconds"] = floor = (r["bytes_read_per_step"] / (bw["direct_read_GBps"] * 1e9)
                                         + r["bytes_written_per_step"] / (bw["direct_write_GBps"] * 1e9))
        ram = f"{in_ram[r['method']]:.2f}" if in_ram.get(r["method"]) else "failed"
        both = f"{r['step_median'] / max(floor, in_ram[r['method']]):.2f}" if in_ram.get(r["method"]) else ""
        table.append(f"| {r['method']} | yes ({len(r['step_seconds']) + 1} steps) | {r['step_median']:.2f} | {ram} | "
                     f"{floor:.2f} | {r['step_median'] / floor:.2f} | {both} | "
                     f"{r['peak_rss'] / 1e9:.3f} | {(r['cgroup_peak'] or 0) / 1e9:.3f} | "
                     f"{r['bytes_read_per_step'] / 1e9:.2f}, {r['bytes_written_per_step'] / 1e9:.2f} |")
    save("limit", {"machine": machine(), "model_bytes": size, "limit_bytes": limit, "disk": bw, "runs": runs}, table)


def group_headline(work: Path) -> None:
    t0 = time.perf_counter()
    store = cached_store(work / "shape-7b", "shape-7b", seed=0, dtype=torch.bfloat16)
    made = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in store.glob("*.safetensors"))
    opens = []  # the manifest dropped from the page cache first: a cold open
    for _ in range(5):
        evict_from_page_cache([store / "manifest.json"])
        t = time.perf_counter()
        BlockStore.open(store)
        opens.append(time.perf_counter() - t)
    bw = disk_bandwidth(work)
    limit = 2 << 30
    r = measure(store, "paged", "lora", "--steps", "1", "--batch", "1", "--seq", "128", "--budget-units", "2",
                "--compute-dtype", "bf16", "--memory-limit", str(limit), "--cold")
    args = SHAPES["shape-7b"]
    flops = 3 * 2 * args.n_params() * 128  # forward, recompute, input-gradient pass
    rate = matmul_rate(128, args.dim, args.hidden_dim, torch.bfloat16)
    data = {"machine": machine(), "store_bytes": size, "store_make_seconds": made, "disk": bw,
            "limit_bytes": limit, "run": r, "bf16_matmul_GFLOPs": rate / 1e9, "compute_floor_seconds": flops / rate,
            "store_open_seconds": opens}
    table = [f"7B-shaped (dim 4096, 32 layers, vocab 32000, random weights), bf16 store of {size / 1e9:.1f} GB, "
             f"LoRA (rank 16, wq/wk/wv/wo), batch 1 x 128, bf16 compute, cgroup limit 2 GiB.", ""]
    if "error" in r:
        table.append(f"Did not complete: {r['error'][-300:]}")
    else:
        io_floor = r["bytes_read_per_step"] / (bw["direct_read_GBps"] * 1e9)  # bigger than RAM: direct reads
        data["io_floor_seconds"] = io_floor
        table += ["| figure | value |", "| --- | ---: |",
                  f"| store open, manifest not cached (ms, median of {len(opens)}) | {statistics.median(opens) * 1e3:.1f} |",
                  f"| seconds per step (median of {len(r['step_seconds'])} after 1 warm-up) | {r['step_median']:.1f} |",
                  f"| first step | {r['first_step_seconds']:.1f} |",
                  f"| GB read per step | {r['bytes_read_per_step'] / 1e9:.1f} |",
                  f"| reader thread busy (s) | {r['last_step_io_seconds']['read_thread']:.1f} |",
                  f"| IO floor: bytes read / O_DIRECT read bandwidth {bw['direct_read_GBps']:.2f} GB/s (s) | {io_floor:.1f} |",
                  f"| effective read rate: bytes read / step time (GB/s) | {r['bytes_read_per_step'] / r['step_median'] / 1e9:.2f} |",
                  f"| compute floor: {flops / 1e12:.1f} TFLOP (6 x parameters x tokens: forward, recompute, "
                  f"input gradients) at {rate / 1e9:.0f} GFLOP/s, a bf16 matmul of this model's shapes measured "
                  f"just before (s) | {flops / rate:.1f} |",
                  f"| peak RSS (GB) | {r['peak_rss'] / 1e9:.2f} |",
                  f"| cgroup peak incl. page cache (GB) | {(r['cgroup_peak'] or 0) / 1e9:.2f} |"]
    save("headline", data, table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="step,limit,headline,auto,families,real,prepare,export,generate,dist,stages,disk,"
                                        "reliability,floor,peer")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--small", action="store_true", help="real: tiny shapes, to check that the code runs (saves nothing)")
    p.add_argument("--slowllama", help="peer: a checkout of github.com/okuvshynov/slowllama (default: $SLOWLLAMA; "
                                       "without one the group is skipped)")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("BLOCKTUNE_BENCH_DIR", "/tmp/blocktune-bench")))
    a = p.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    groups = a.only.split(",")
    if "step" in groups:
        group_step(a.workdir, a.reps)
    if "limit" in groups:
        group_limit(a.workdir)
    if "headline" in groups:
        group_headline(a.workdir)
    if "auto" in groups:
        group_auto(a.workdir)
    if "families" in groups:
        group_families(a.workdir)
    if "real" in groups:
        group_real(a.workdir / "real", a.reps, a.small)
    if "prepare" in groups:
        group_prepare(a.workdir, a.reps)
    if "export" in groups:
        group_export(a.workdir, a.reps)
    if "generate" in groups:
        group_generate(a.workdir, a.reps)
    if "dist" in groups:
        group_dist(a.workdir, a.reps)
    if "stages" in groups:
        group_stages(a.workdir, a.reps)
    if "disk" in groups:
        group_disk(a.workdir)
    if "floor" in groups:
        group_floor(a.workdir, a.reps)
    if "peer" in groups:
        from .run_peer import group_peer

        group_peer(a.workdir, a.reps, a.slowllama)
    if "reliability" in groups:
        from .reliability import main as reliability

        reliability(["--kills", "10", "--writers", "3", "--fuzz", "300",
                     "--command", "blocktune_bench.run"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
