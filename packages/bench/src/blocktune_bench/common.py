"""What every benchmark group shares: the machine record, a measured run, cached stores,
saved results, the disk's and the matmul's rates measured on the spot, a CLI run in a cgroup."""

from __future__ import annotations

import datetime
import json
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .measure import evict_from_page_cache
from .synthetic import make_store

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


def _direct_write(f: Path, view: memoryview) -> None:
    """Write `view` to `f` with O_DIRECT, then fsync (how a full fine-tune writes a unit)."""
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        os.fsync(fd)
    finally:
        os.close(fd)


def _direct_read(f: Path, view: memoryview) -> None:
    """Read `f` into `view` with O_DIRECT (how units not mapped are read)."""
    fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
    try:
        done = 0
        while done < len(view):
            done += os.readv(fd, [view[done:]])
    finally:
        os.close(fd)


def _aligned_view(nbytes: int) -> memoryview:
    from blocktune.store.fileio import aligned_empty

    buf = aligned_empty(nbytes)
    buf.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    return memoryview(buf.numpy())


def disk_bandwidth(path: Path, nbytes: int = 1 << 30, files: int = 1) -> dict:
    """This disk's bandwidths, measured on the spot with `files` files of `nbytes` each (the
    sizes a run moves): an O_DIRECT write and read (how a full fine-tune writes and reads
    back its units) and a cold mapped read (how frozen units are read: mmap + MAP_POPULATE).
    The read is also the figure for a cold buffered read."""
    from blocktune.store.fileio import ALIGN

    nbytes -= nbytes % ALIGN
    view = _aligned_view(nbytes)
    paths = [path / f"bw-{i}.bin" for i in range(files)]

    def timed(fn) -> float:
        t0 = time.perf_counter()
        for f in paths:
            fn(f)
        return nbytes * files / (time.perf_counter() - t0) / 1e9

    def mapped(f: Path) -> None:
        with open(f, "rb", buffering=0) as fh:
            mmap.mmap(fh.fileno(), nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_POPULATE, prot=mmap.PROT_READ).close()

    try:
        out = {"file_bytes": nbytes, "files": files,
               "direct_write_GBps": timed(lambda f: _direct_write(f, view)),
               "direct_read_GBps": timed(lambda f: _direct_read(f, view))}
        evict_from_page_cache(paths)
        out["read_GBps"] = timed(mapped)
    finally:
        for f in paths:
            f.unlink(missing_ok=True)
    return out


def disk_mixed(path: Path, read_share: float, nbytes: int = 1 << 30) -> float:
    """GB/s this disk moves with O_DIRECT reads and writes in flight together, `read_share` of
    the `nbytes` read (a full fine-tune's step reads a unit's weights and moments while the last
    unit's are written): one thread reads a file while another writes one, timed until both are
    done. Measured alone, the two rates add up to more than they give mixed on a disk like the
    one of 2026-12-07 (1.5-2.0 GB/s together, against 2.1 read alone)."""
    from blocktune.store.fileio import ALIGN

    reads = int(nbytes * read_share) // ALIGN * ALIGN
    writes = (nbytes - reads) // ALIGN * ALIGN
    src, dst = path / "mixed-read.bin", path / "mixed-write.bin"
    rview, wview = _aligned_view(max(reads, ALIGN)), _aligned_view(max(writes, ALIGN))
    try:
        _direct_write(src, rview)
        evict_from_page_cache([src])
        t0 = time.perf_counter()
        with ThreadPoolExecutor(1) as pool:
            writer = pool.submit(_direct_write, dst, wview[:writes])
            _direct_read(src, rview[:reads])
            writer.result()  # (an error in the writer is raised here)
        return (reads + writes) / (time.perf_counter() - t0) / 1e9
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)


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


def _disk_ticks(path: Path) -> int | None:
    """Milliseconds the disk holding `path` has had IO in flight since boot (`/proc/diskstats`'
    io_ticks; a partition's own line where it is on one); None off Linux."""
    dev = os.stat(path).st_dev
    try:
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if (int(f[0]), int(f[1])) == (os.major(dev), os.minor(dev)):
                return int(f[12])
    except (OSError, ValueError, IndexError):
        pass
    return None


class DiskBusy:
    """The share of a CLI run's steps 2..N during which the store's disk had IO in flight,
    sampled on a thread while the run goes: from the moment its `metrics.jsonl` holds step 1's
    row to the moment it holds the last. Near 1: the disk bounds the step."""

    def __init__(self, store: Path, out: Path, period: float = 0.05):
        self.store, self.metrics, self.period = store, out / "metrics.jsonl", period
        self.first: tuple[float, int] | None = None  # (time, ticks) when step 1's row appeared
        self.last: tuple[float, int] | None = None  # when the latest row after it appeared
        self._rows, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                rows = self.metrics.read_bytes().count(b"\n")
            except OSError:
                continue
            if rows > self._rows:
                ticks = _disk_ticks(self.store)
                if ticks is None:
                    return
                mark = (time.perf_counter(), ticks)
                if self.first is None:
                    self.first = mark
                else:
                    self.last = mark
                self._rows = rows

    def __enter__(self) -> DiskBusy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def share(self) -> float | None:
        if self.first is None or self.last is None or self.last[0] <= self.first[0]:
            return None
        return (self.last[1] - self.first[1]) / 1000 / (self.last[0] - self.first[0])


def cli_under_limit(limit: str, store: Path, data: Path, out: Path, *flags: str, read_rate: int | None = None,
                    prefix: tuple[str, ...] = ()) -> dict:
    """`blocktune finetune` as the README shows it (no budget flags), in a cgroup of `limit`
    (`none`: no memory limit), its disk reads throttled to `read_rate` bytes/s if given;
    `prefix` goes before the command (another checkout's PYTHONPATH). The report's `disk_busy`:
    the share of steps 2..N during which the store's disk was busy (`DiskBusy`)."""
    if out.exists():
        shutil.rmtree(out)
    rate = ["--read-rate", str(read_rate), "--disk", str(store)] if read_rate is not None else []
    cmd = [sys.executable, "-m", "blocktune_bench.limited", limit, *rate, "--", *prefix, sys.executable, "-m",
           "blocktune", "finetune", "--store", str(store), "--data", str(data), "--out", str(out), "--no-progress", *flags]
    with DiskBusy(store, out) as busy:
        r = subprocess.run(cmd, capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {"exit_code": r.returncode}
    report["budget_notes"] = [line for line in lines if "auto:" in line or line.startswith(("memory is tight", "warning:"))]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").exists() else []
    report["rows"] = rows
    report["step_seconds"] = rows[-1]["seconds"] if rows else None
    report["gb_read"] = rows[-1]["gb_read"] if rows else None
    report["disk_busy"] = busy.share
    return report
