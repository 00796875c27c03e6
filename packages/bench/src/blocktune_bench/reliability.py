"""The reliability campaign behind benchmarks/results/<date>-reliability.md.

    python -m blocktune_bench.reliability [--kills 40] [--fuzz 2000]

- kills: a real full fine-tune process (tiny model, one-unit budget) is SIGKILLed at random
  instants; each time the store must open, verify, and equal exactly one step of an
  uninterrupted run, and a resume must end where the uninterrupted run ended.
- writers: two full fine-tunes started at once on one store while a reader verifies it in a
  loop; exactly one may run, and every read must see one whole committed step.
- faults: ENOSPC and EIO injected at the k-th write call of a full fine-tune step, for every k
  the step makes; the step must fail with the project's error, the store must keep the last
  committed step, and no file may be left behind.
- corruptions: one byte flipped in every file of a store, one at a time; each must be named.
- fuzz: truncated and bit-flipped manifests and adapter files; only the project's errors.
- crc32 cost: checksum throughput against the bytes a step reads.
- attacks (#29, `blocktune_bench.attacks`): killed prepares and exports, orphaned versions, odd
  entries in .lock/readers, full disks (a real tmpfs), hostile safetensors headers and tokenizer
  files, huge and odd JSONL rows, odd paths, file modes, links and damage in a run folder.

`nox -s bench` runs it as the group `reliability` of `python -m blocktune_bench.run`, small.
"""

from __future__ import annotations

import argparse
import errno
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from blocktune import BlockStore, Engine, EngineConfig, OptimizerConfig
from blocktune.errors import BlocktuneError, ChecksumError, StoreError
from blocktune.formats.adapters import load_adapter, save_adapter
from blocktune.model.args import LoraConfig
from blocktune.store.fileio import crc32
from blocktune.store.lock import LOCK_DIR

from .attacks import run_attacks
from .common import machine, save
from .synthetic import SHAPES, make_store

STEPS = 6
SCRIPT = """
import sys, torch
from blocktune import BlockStore, Engine, EngineConfig, OptimizerConfig
store = BlockStore.open(sys.argv[1])
unit = max(store.unit_bytes(u) for u in store.units)
engine = Engine(store, EngineConfig(method="full", device="cpu", device_budget=unit,
                                    optimizer=OptimizerConfig("adamw", 1e-3)))
for step in range(store.step, int(sys.argv[2])):
    tok = torch.randint(0, store.args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(step))
    engine.train_step([(tok[:, :-1], tok[:, 1:])])
    print(step + 1, flush=True)
"""
ARGS = SHAPES["tiny-7b"].with_dropout(0.1)


def _fp(store: BlockStore) -> tuple:
    return tuple(store.record(u).crc32 for u in store.units)


def _history(root: Path) -> dict[int, tuple]:
    """Fingerprints of every step of an uninterrupted run."""
    ref = make_store(root / "ref", ARGS, seed=2)
    history = {0: _fp(ref)}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(ref.path), str(STEPS)], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        history[int(line)] = _fp(BlockStore.open(ref.path))
    proc.wait()
    return history


def kills(root: Path, n: int, history: dict[int, tuple]) -> dict:
    rng = random.Random(0)
    survived, at_steps = 0, []
    for k in range(n):
        store = make_store(root / f"k{k}", ARGS, seed=2)
        p = subprocess.Popen([sys.executable, "-c", SCRIPT, str(store.path), str(STEPS)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        p.stdout.readline()
        time.sleep(rng.uniform(0, 0.3))
        p.send_signal(signal.SIGKILL)
        p.wait()
        s = BlockStore.open(store.path)
        ok = s.verify() == [] and [i for i, v in history.items() if v == _fp(s)] == [s.step]
        subprocess.run([sys.executable, "-c", SCRIPT, str(store.path), str(STEPS)], check=True, capture_output=True)
        ok = ok and _fp(BlockStore.open(store.path)) == history[STEPS]
        ok = ok and not [q for q in store.path.iterdir() if ".tmp-" in q.name]
        survived += ok
        at_steps.append(s.step)
    return {"tried": n, "survived": survived, "committed_steps_found": sorted(set(at_steps))}


def concurrency(root: Path, n: int, history: dict[int, tuple]) -> dict:
    """Two writers started at once on one store, with a reader verifying it in a loop: exactly
    one writer runs, the other stops with the lock error; every read sees one whole committed
    step; the store ends at the uninterrupted run's last step."""
    tried = survived = reads = bad_reads = 0
    for k in range(n):
        store = make_store(root / f"c{k}", ARGS, seed=2)
        store.close()
        procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(store.path), str(STEPS)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        seen = []
        while any(p.poll() is None for p in procs):
            try:
                s = BlockStore.open(store.path)
                seen.append(s.verify() == [] and _fp(s) in history.values())
                s.close()
            except BlocktuneError:
                seen.append(False)
        errs = [p.stderr.read() for p in procs]
        codes = sorted(p.returncode for p in procs)
        final = BlockStore.open(store.path)
        ok = codes[0] == 0 and codes[1] != 0 and sum("another process is writing" in e for e in errs) == 1
        ok = ok and final.verify() == [] and _fp(final) == history[STEPS] and all(seen)
        final.close()
        tried += 1
        survived += ok
        reads += len(seen)
        bad_reads += seen.count(False)
    return {"tried": tried, "survived": survived, "reads": reads, "inconsistent_reads": bad_reads}


class FaultyOpener:
    """open() for a store's IO seam (`BlockStore.opener`) that injects OSError(err): on the
    `fail_at`-th write call, once more than `write_budget` bytes would have been written, or
    on every read (`fail_reads`). `faults` counts the errors raised."""

    def __init__(self, err: int, write_budget: int | None = None, fail_at: int | None = None,
                 fail_reads: bool = False):
        self.err, self.left, self.fail_at, self.fail_reads = err, write_budget, fail_at, fail_reads
        self.calls = self.faults = 0
        self._lock = threading.Lock()  # files are written on several threads (the masters beside the state)

    def _fail(self, path) -> OSError:
        self.faults += 1
        return OSError(self.err, "No space left on device" if self.err == errno.ENOSPC else "injected", str(path))

    def __call__(self, path, mode="r", **kw):
        if "r" in mode and self.fail_reads:
            raise self._fail(path)
        f = open(path, mode, **kw)
        if "w" in mode and (self.left is not None or self.fail_at is not None):
            real = f.write

            def write(data):
                n = len(memoryview(data).cast("B"))
                with self._lock:
                    self.calls += 1
                    if self.calls == self.fail_at or (self.left is not None and self.left - n < 0):
                        raise self._fail(path)
                    if self.left is not None:
                        self.left -= n
                return real(data)

            f.write = write
        return f


def faults(root: Path) -> dict:
    tried = survived = 0
    for err in (errno.ENOSPC, errno.EIO):
        k = 1
        while True:
            store = make_store(root / f"f{err}-{k}", ARGS, seed=1)
            engine = Engine(store, EngineConfig(method="full", device="cpu",
                                                optimizer=OptimizerConfig("adamw", 1e-3)))
            tok = torch.randint(0, ARGS.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
            engine.train_step([(tok[:, :-1], tok[:, 1:])])
            committed = _fp(store)
            opener = FaultyOpener(err, fail_at=k)
            store.opener = opener
            try:
                engine.train_step([(tok[:, :-1], tok[:, 1:])])
                engine.close()
                break  # the step made fewer than k write calls: every call has been failed once
            except StoreError:
                pass
            tried += 1
            s = BlockStore.open(store.path)
            ok = s.step == 1 and _fp(s) == committed and s.verify() == []
            ok = ok and {q.name for q in store.path.iterdir()} - {LOCK_DIR} == s.referenced_files()
            survived += ok
            k += 1
    return {"tried": tried, "survived": survived}


def corruptions(root: Path) -> dict:
    store = make_store(root / "c", ARGS, seed=3)
    engine = Engine(store, EngineConfig(method="full", device="cpu"))
    tok = torch.randint(0, ARGS.vocab_size, (1, 9))
    engine.train_step([(tok[:, :-1], tok[:, 1:])])
    engine.close()
    store = BlockStore.open(store.path)
    records = [store.record(u) for u in store.units] + [store.state_record(u) for u in store.units]
    rng = random.Random(1)
    tried = named = 0
    for rec in records:
        path = store.path / rec.file
        good = path.read_bytes()
        for _ in range(3):
            bad = bytearray(good)
            bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(bad))
            tried += 1
            try:
                BlockStore.open(store.path).read_file(rec, verify="always")
            except ChecksumError as exc:
                named += rec.file in str(exc)
            except StoreError as exc:  # a flip in the header can fail the parse first
                named += rec.file in str(exc)
            path.write_bytes(good)
    return {"tried": tried, "named": named}


def fuzz(root: Path, n: int) -> dict:
    store = make_store(root / "z", ARGS, seed=0)
    good = (store.path / "manifest.json").read_bytes()
    adapter = root / "a.safetensors"
    save_adapter(adapter, {"layers.0.attention.wq.lora_a": torch.randn(2, 64)}, LoraConfig(rank=2), ARGS)
    agood = adapter.read_bytes()
    rng = random.Random(2)
    clear = crashes = 0
    for i in range(n):
        target, data = ((store.path / "manifest.json", good) if i % 2 == 0 else (adapter, agood))
        bad = bytearray(data[: rng.randrange(len(data) + 1)] if rng.random() < 0.3 else data)
        for _ in range(rng.randrange(1, 4)):
            if bad:
                bad[rng.randrange(len(bad))] ^= rng.randrange(1, 256)
        target.write_bytes(bytes(bad))
        try:
            if i % 2 == 0:
                BlockStore.open(store.path).verify()
            else:
                load_adapter(adapter, ARGS)
            clear += 1  # still valid (e.g. a flip inside a tensor caught by verify's report)
        except BlocktuneError:
            clear += 1
        except Exception:
            crashes += 1
        target.write_bytes(data)
    return {"cases": n, "clear": clear, "other_exceptions": crashes}


def crc_cost() -> dict:
    buf = torch.randint(0, 255, (256 << 20,), dtype=torch.uint8).numpy()
    t0 = time.perf_counter()
    crc32(memoryview(buf))  # the store's own (ISA-L's where installed)
    gbps = buf.nbytes / (time.perf_counter() - t0) / 1e9
    return {"crc32_GBps": gbps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--kills", type=int, default=40)
    p.add_argument("--fuzz", type=int, default=2000)
    p.add_argument("--writers", type=int, default=20, help="trials of two writers and a reader at once")
    p.add_argument("--command", default="blocktune_bench.reliability", help="the command the results name")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        history = _history(root)
        k = kills(root, a.kills, history)
        print("kills", k, flush=True)
        w = concurrency(root, a.writers, history)
        print("concurrent writers", w, flush=True)
        f = faults(root)
        print("faults", f, flush=True)
        c = corruptions(root)
        print("corruptions", c, flush=True)
        z = fuzz(root, a.fuzz)
        print("fuzz", z, flush=True)
        (root / "attacks").mkdir()
        attacks = run_attacks(root / "attacks")
    cost = crc_cost()
    step_read = 1.61e9  # bytes a LoRA step reads on the 1 GB test model (cpu-step results)
    table = ["Reliability campaign (`python -m blocktune_bench.reliability`), tiny model, real processes and files.", "",
             "| what | tried | survived / detected | notes |", "| --- | ---: | ---: | --- |",
             f"| SIGKILL of a full fine-tune at random instants | {k['tried']} | {k['survived']} | store opened, verified and equalled one step of the straight run (found steps {k['committed_steps_found']}); resume reached the same final weights; no temp files |",
             f"| two full fine-tunes started at once on one store, a reader verifying it in a loop | {w['tried']} | {w['survived']} | one ran, the other stopped with the lock error; {w['reads']} reads, {w['inconsistent_reads']} not one whole committed step; the store ended at the straight run's last step |",
             f"| ENOSPC / EIO at the k-th write call of a step, every k | {f['tried']} | {f['survived']} | clear StoreError; last committed step intact; no file left behind |",
             f"| one flipped bit in a unit or optimizer-state file | {c['tried']} | {c['named']} | each named by file in the error |",
             f"| fuzzed manifests and adapter files | {z['cases']} | {z['clear']} | only blocktune's own errors; {z['other_exceptions']} other exceptions |",
             "", "The attacks of #29, each through the `blocktune` command in fresh processes (a full disk is a real "
             "tmpfs of 300-420 KiB mounted in a user namespace):", "",
             "| attack | held | what was seen | s |", "| --- | --- | --- | ---: |",
             *[f"| {t['attack']} | {'yes' if t['held'] else '**NO**'} | {t['seen'].replace('|', '/')} | {t['seconds']} |"
               for t in attacks],
             "", f"crc32 runs at {cost['crc32_GBps']:.1f} GB/s here: checking every byte a LoRA step reads on the "
             f"1 GB test model ({step_read / 1e9:.2f} GB) would cost {step_read / cost['crc32_GBps'] / 1e9:.2f} s; "
             "checked once per file version per process (the default) it costs that once per run."]
    save("reliability", {"machine": machine(a.command), "kills": k, "concurrent_writers": w, "faults": f,
                         "corruptions": c, "fuzz": z, "attacks": attacks, **cost}, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
