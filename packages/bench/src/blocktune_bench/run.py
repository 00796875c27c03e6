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

Results: benchmarks/results/<date>-cpu-<group>.json and .md (machine, date, commit, command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from blocktune.config import ModelArgs
from blocktune.store import BlockStore

from .measure import evict_from_page_cache
from .synthetic import PRESETS, make_store

RESULTS = Path("benchmarks/results")


def machine(module: str = "blocktune_bench.run") -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_GB": round(mem / 1e9, 1), "python": platform.python_version(),
            "torch": torch.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": commit or "?", "command": f"python -m {module} " + " ".join(sys.argv[1:])}


def measure(store: Path, mode: str, method: str, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "blocktune_bench.measure", "--store", str(store), "--mode", mode,
           "--method", method, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"mode": mode, "method": method, "error": out.stderr[-800:], "returncode": out.returncode}
    return json.loads(out.stdout.strip().splitlines()[-1])


def cached_store(path: Path, args, **kw) -> Path:
    """A synthetic store at `path`, made on the first run and reused after (minutes at 7B)."""
    if not (path / "manifest.json").exists():
        make_store(path, args, **kw)
    return path


def save(group: str, data: dict, table: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{data['machine']['date'][:10]}-cpu-{group}"
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    m = data["machine"]
    head = [f"# {group} — {m['cpu']}, {m['cores']} cores, {m['memory_GB']} GB", "",
            f"{m['date']}, commit {m['commit']}, torch {m['torch']}, `{m['command']}`", ""]
    stem.with_suffix(".md").write_text("\n".join(head + table) + "\n")
    print("\n".join(table))


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
             "(freed heap returned to the OS after every unit).", "",
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


def disk_bandwidth(path: Path, nbytes: int = 1 << 30, files: int = 1) -> dict:
    """This disk's bandwidths, measured on the spot with `files` files of `nbytes` each (the
    sizes a run moves): an O_DIRECT write and read (how a full fine-tune writes and reads
    back its units) and a cold mapped read (how frozen units are read: mmap + MAP_POPULATE).
    The read is also the figure for a cold buffered read."""
    from blocktune.fileio import ALIGN, aligned_empty

    nbytes -= nbytes % ALIGN
    buf = aligned_empty(nbytes)
    buf.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    view = memoryview(buf.numpy())
    paths = [path / f"bw-{i}.bin" for i in range(files)]

    def timed(fn) -> float:
        t0 = time.perf_counter()
        for f in paths:
            fn(f)
        return nbytes * files / (time.perf_counter() - t0) / 1e9

    def write(f: Path) -> None:
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            done = 0
            while done < nbytes:
                done += os.write(fd, view[done:])
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(f: Path) -> None:
        fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
        try:
            done = 0
            while done < nbytes:
                done += os.readv(fd, [view[done:]])
        finally:
            os.close(fd)

    def mapped(f: Path) -> None:
        with open(f, "rb", buffering=0) as fh:
            mmap.mmap(fh.fileno(), nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_POPULATE, prot=mmap.PROT_READ).close()

    try:
        out = {"file_bytes": nbytes, "files": files, "direct_write_GBps": timed(write),
               "direct_read_GBps": timed(read)}
        evict_from_page_cache(paths)
        out["read_GBps"] = timed(mapped)
    finally:
        for f in paths:
            f.unlink(missing_ok=True)
    return out


def matmul_rate(tokens: int, dim: int, hidden: int, dtype: torch.dtype) -> float:
    """FLOP/s of this machine's matmuls at a block's shapes (tokens x dim into dim and hidden
    outputs), in this process's threads: the median of 5 timed rounds after a warm-up."""
    x = torch.randn(tokens, dim).to(dtype)
    ws = [torch.randn(n, dim).to(dtype) for n in (dim, hidden)]
    work = sum(2 * tokens * dim * w.shape[0] for w in ws) * 10
    rounds = []
    for i in range(6):
        t0 = time.perf_counter()
        for _ in range(10):
            for w in ws:
                x @ w.t()
        if i:
            rounds.append(work / (time.perf_counter() - t0))
    return statistics.median(rounds)


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
    args = PRESETS["shape-7b"]
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


PREPARE = """
import sys, time
from blocktune.hostmem import peak_rss_bytes
from blocktune_bench.measure import track_anon_peak
from blocktune_export.meta import import_meta
peak = track_anon_peak()
t = time.perf_counter()
import_meta(sys.argv[1], sys.argv[2])
print(time.perf_counter() - t, peak_rss_bytes(), peak())
"""


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
                out = subprocess.run([sys.executable, "-c", PREPARE, str(src), str(dst)], check=True,
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


GENERATE = """
import sys, time, json, torch
torch.set_num_threads(2)
from blocktune import BlockStore, Engine, EngineConfig
from blocktune.generate import SamplingConfig, generate_tokens
from blocktune.model import KVCache
from blocktune_bench.reference import model_from_store
store = BlockStore.open(sys.argv[1]); mode = sys.argv[2]; n = 48
prompt = list(range(1, 17))
if mode == "paged":
    eng = Engine(store, EngineConfig(method="full", device="cpu", read_only=True))
    list(generate_tokens(eng, prompt, SamplingConfig(4, stop_at_eos=False)))  # warm: units resident
    t = time.perf_counter(); out = list(generate_tokens(eng, prompt, SamplingConfig(n, stop_at_eos=False)))
else:
    model = model_from_store(store).eval()
    a = store.args
    def run(k):
        caches = [KVCache(1, len(prompt) + k, a.kv_heads, a.head_dim, torch.float32, "cpu") for _ in range(a.n_layers)]
        toks, start, out = list(prompt), 0, []
        with torch.no_grad():
            for _ in range(k):
                logits = model(torch.tensor([toks[start:]]), caches, start)[0, -1]
                start = len(toks); toks.append(int(logits.argmax())); out.append(toks[-1])
        return out
    run(4)
    t = time.perf_counter(); out = run(n)
dt = time.perf_counter() - t
print(json.dumps({"mode": mode, "tokens": len(out), "seconds": dt, "tokens_per_s": len(out) / dt, "out": out[:8]}))
"""


EXPORT = """
import sys, time
from blocktune.cli import main
from blocktune_bench.measure import rss_anon, track_anon_peak
start, peak = rss_anon(), track_anon_peak()
t = time.perf_counter()
code = main(["export", *sys.argv[1:]])  # `blocktune export ...`, in this process so its memory is measured
print(time.perf_counter() - t, peak() - start, file=sys.stderr)
sys.exit(code)
"""


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
            res = subprocess.run([sys.executable, "-c", EXPORT, str(store), str(out), *flags],
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
            out = subprocess.run([sys.executable, "-c", GENERATE, str(store), mode], check=True,
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


def cli_under_limit(limit: str, store: Path, data: Path, out: Path, *flags: str) -> dict:
    """`blocktune finetune` as the README shows it (no budget flags), in a cgroup of `limit`."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "blocktune_bench.limited", limit, "--", sys.executable, "-m", "blocktune",
           "finetune", "--store", str(store), "--data", str(data), "--out", str(out), "--no-progress", *flags]
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {"exit_code": r.returncode}
    report["budget_notes"] = [line for line in lines if "auto:" in line or line.startswith(("memory is tight", "warning:"))]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").exists() else []
    report["step_seconds"] = rows[-1]["seconds"] if rows else None
    report["gb_read"] = rows[-1]["gb_read"] if rows else None
    return report


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="step,limit,headline,auto,families,prepare,export,generate,dist")
    p.add_argument("--reps", type=int, default=3)
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
    if "prepare" in groups:
        group_prepare(a.workdir, a.reps)
    if "export" in groups:
        group_export(a.workdir, a.reps)
    if "generate" in groups:
        group_generate(a.workdir, a.reps)
    if "dist" in groups:
        group_dist(a.workdir, a.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
