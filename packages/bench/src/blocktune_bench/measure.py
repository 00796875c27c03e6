"""One measured configuration per process, so that peak RSS belongs to that configuration alone.

    python -m blocktune_bench.measure --store S --mode paged|plain|ckpt --method lora|full \
        [--batch 2 --seq 256 --steps 3 --budget-units 2 --memory-limit 2GiB]

Prints one JSON line: step times (the first, which warms caches, reported apart), peak RSS,
bytes read and written per step, and where a paged step's time went. With --memory-limit the
process first moves itself into a fresh cgroup (v1 or v2) with that limit, so the limit is
enforced by the kernel on everything the process touches, page cache included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from blocktune import Engine, EngineConfig, LoraConfig, OptimizerConfig
from blocktune.machine.hostmem import peak_rss_bytes
from blocktune.settings import AUTO, parse_bytes
from blocktune.store.store import BlockStore

from .synthetic import random_batch

LORA = LoraConfig(rank=16, alpha=32.0, dropout=0.0, targets=("wq", "wk", "wv", "wo"))


def evict_from_page_cache(paths) -> None:
    """Drop files from the page cache, so the next read of them is a cold read."""
    for f in paths:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def enter_cgroup(limit: int) -> str:
    """Put this process in a new memory cgroup limited to `limit` bytes; return its path."""
    name = f"blocktune-bench-{os.getpid()}"
    v1 = Path("/sys/fs/cgroup/memory")
    if v1.is_dir():
        cg = v1 / name
        cg.mkdir()
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        try:  # no swap either, where the kernel accounts it
            (cg / "memory.memsw.limit_in_bytes").write_text(str(limit))
        except OSError:
            pass
    else:
        cg = Path("/sys/fs/cgroup") / name
        cg.mkdir()
        (cg / "memory.max").write_text(str(limit))
        (cg / "memory.swap.max").write_text("0")
    (cg / "cgroup.procs").write_text(str(os.getpid()))
    return str(cg)


def rss_anon() -> int:
    """This process's anonymous resident memory (RssAnon): what it holds that the kernel cannot
    take back, unlike the page cache it has mapped (which ru_maxrss counts too)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def track_anon_peak(every: float = 0.002):
    """Sample RssAnon every `every` seconds on a thread; returns a function that gives the peak
    so far."""
    import threading

    peak = [rss_anon()]

    def poll() -> None:
        while True:
            peak[0] = max(peak[0], rss_anon())
            time.sleep(every)

    threading.Thread(target=poll, daemon=True).start()
    return lambda: max(peak[0], rss_anon())


def cgroup_peak(cg: str | None) -> int | None:
    if not cg:
        return None
    for name in ("memory.max_usage_in_bytes", "memory.peak"):
        p = Path(cg) / name
        if p.exists():
            return int(p.read_text())
    return None




def _paged_engine(a: argparse.Namespace, store: BlockStore, ocfg: OptimizerConfig, dtype: torch.dtype):
    """The paged engine of --mode (paged-auto: the CLI's defaults), and its device budget."""
    unit = max(store.unit_bytes(u) for u in store.units) * dtype.itemsize // store.dtype.itemsize
    auto = a.mode == "paged-auto"
    budget = AUTO if auto else int(unit * a.budget_units)
    engine = Engine(store, EngineConfig(method=a.method, lora=LORA, optimizer=ocfg, device="cpu",
                                        compute_dtype=a.compute_dtype, device_budget=budget,
                                        lean_memory=a.mode == "paged-lean",
                                        keep_budget=AUTO if auto else None if a.mode == "paged-keep" else 0,
                                        max_dirty=parse_bytes(a.max_dirty), batch_hint=(a.batch, a.seq, 1)))
    return engine, budget


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    # paged-auto: the CLI's defaults (budgets and keep_activations auto); paged*: --budget-units
    p.add_argument("--mode", choices=["paged", "paged-auto", "paged-lean", "paged-keep", "plain", "ckpt"],
                   required=True)
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--budget-units", type=float, default=2.0, help="paged: resident budget in units")
    p.add_argument("--compute-dtype", default="fp32")
    p.add_argument("--memory-limit", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-dirty", default="512MiB")
    p.add_argument("--cold", action="store_true", help="drop the store from the page cache first")
    p.add_argument("--profile", action="store_true", help="paged: one more step, profiled (blocktune_bench.profile)")
    a = p.parse_args(argv)
    if a.cold:  # page cache pages are charged to the cgroup that reads them: make it this one
        evict_from_page_cache(Path(a.store).glob("*.safetensors"))
    cg = enter_cgroup(parse_bytes(a.memory_limit)) if a.memory_limit else None
    torch.set_num_threads(a.threads)
    store = BlockStore.open(a.store)
    args = store.args
    ocfg = OptimizerConfig("adamw", lr=1e-5)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.compute_dtype]
    out = {"mode": a.mode, "method": a.method, "batch": f"{a.batch}x{a.seq}", "store_bytes": store.total_bytes(),
           "params": args.n_params(), "n_layers": args.n_layers, "dim": args.dim,
           "compute_dtype": a.compute_dtype, "memory_limit": a.memory_limit}
    paged = a.mode.startswith("paged")
    if paged:
        engine, out["budget_bytes"] = _paged_engine(a, store, ocfg, dtype)

        def step(i):
            r = engine.train_step([random_batch(args, a.batch, a.seq, i)])
            return r.loss, r.bytes_read, r.bytes_written
    else:
        from .reference import ReferenceTrainer

        ref = ReferenceTrainer(store, a.method, LORA, ocfg, dtype=dtype, checkpoint_blocks=a.mode == "ckpt")

        def step(i):
            return ref.train_step([random_batch(args, a.batch, a.seq, i)]), 0, 0

    # RssAnon beside ru_maxrss: a LoRA run keeps its frozen units mapped, and ru_maxrss counts
    # those page-cache pages, which the kernel takes back when memory runs short
    anon_peak = track_anon_peak(every=0.01)  # coarser than export's: this thread shares the cores
    times, reads, writes, losses = [], [], [], []
    for i in range(a.steps + 1):
        if paged:
            s0 = engine.pager.stats.snapshot()
        t0 = time.perf_counter()
        loss, br, bw = step(i)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        reads.append(br)
        writes.append(bw)
        if paged and i == a.steps:
            s1 = engine.pager.stats.snapshot()
            out["last_step_io_seconds"] = {"read_thread": s1["read_seconds"] - s0["read_seconds"],
                                           "write_thread": s1["write_seconds"] - s0["write_seconds"]}
    if paged and a.profile:
        from .profile import profile_step

        out["profile"] = profile_step(engine, lambda: step(a.steps + 1))
    if paged:
        out["budgets"] = {"device": engine.budgets.device, "keep": engine.budgets.keep, "notes": engine.budgets.notes}
        engine.close()
    out.update({"first_step_seconds": times[0], "step_seconds": times[1:],
                "step_median": statistics.median(times[1:]), "losses": losses,
                "bytes_read_per_step": statistics.median(reads[1:]),
                "bytes_written_per_step": statistics.median(writes[1:]),
                "peak_rss": peak_rss_bytes(), "peak_anon": anon_peak(), "cgroup_peak": cgroup_peak(cg),
                "tokens_per_s": a.batch * a.seq / statistics.median(times[1:])})
    print(json.dumps(out))
    if cg:
        import contextlib

        with contextlib.suppress(OSError):
            Path("/sys/fs/cgroup/memory/cgroup.procs" if "/memory/" in cg else "/sys/fs/cgroup/cgroup.procs").write_text(str(os.getpid()))
            os.rmdir(cg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
