"""One writer per store, readers beside it: real processes on one store (issue 18)."""

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from blocktune import BlockStore, StoreError, cli
from blocktune.errors import StoreLockedError
from blocktune.run.config import RunConfig
from blocktune.run.trainer import Trainer
from blocktune.store.lock import LOCK_DIR, pinned_files
from blocktune_bench.corpus import demo_text
from blocktune_bench.synthetic import write_meta_checkpoint
from blocktune_export.meta import import_meta

PY = sys.executable
STEPS = 20


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The demo-sized model (6 layers, dim 192) from Meta's layout, fp32, and a text."""
    root = tmp_path_factory.mktemp("lock")
    meta = write_meta_checkpoint(root / "meta", "demo", seed=0)
    store = import_meta(meta, root / "store", dtype=torch.float32)
    store.close()
    text = root / "text.txt"
    text.write_text(demo_text())
    # a constant learning rate: the schedule does not depend on the run's length, so a run of
    # k steps resumed step by step equals the first k steps of a longer run
    config = root / "run.toml"
    config.write_text(f'method = "full"\nsteps = {STEPS}\nlr = 1e-3\nwarmup_steps = 0\n'
                      'min_lr_ratio = 1.0\nbatch_size = 1\ngrad_accum = 2\nseq_len = 64\n'
                      'eval_every = 0\nsample_every = 0\ncheckpoint_every = 1000\nprogress = false\n')
    return store.path, text, config


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(LOCK_DIR))
    return dst


def _finetune(store, text, config, out, *extra):
    return [PY, "-m", "blocktune", "finetune", "--config", str(config), "--store", str(store),
            "--data", str(text), "--out", str(out), "--no-progress", *extra]


def _fingerprint(path: Path) -> tuple:
    store = BlockStore.open(path)
    try:
        return tuple(store.record(u).crc32 for u in store.units)
    finally:
        store.close()


def test_two_writers_at_once_exactly_one_runs(base, tmp_path):
    """Two full fine-tunes started together on one store: one runs, the other stops at once with
    the lock error naming the first; the store then verifies and equals a single run's."""
    src, text, config = base
    store = _copy(src, tmp_path / "s")
    procs = [subprocess.Popen(_finetune(store, text, config, tmp_path / f"run{i}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    print("exit codes", codes)
    for _, err in outs:
        print(err.strip().splitlines()[-1])
    assert sorted(codes) == [0, 1]
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    err = outs[loser][1]
    assert "another process is writing this store" in err and f"pid {procs[winner].pid}" in err
    assert not (tmp_path / f"run{loser}").exists()  # it stopped before it made anything
    check = subprocess.run([PY, "-m", "blocktune", "verify", str(store)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    single = _copy(src, tmp_path / "single")
    subprocess.run(_finetune(single, text, config, tmp_path / "run-single"), check=True, capture_output=True)
    assert _fingerprint(store) == _fingerprint(single)


def test_a_killed_writer_leaves_no_stale_lock(base, tmp_path):
    """SIGKILL the writer while it holds the lock: the next writer gets the lock at once."""
    src, text, config = base
    store = _copy(src, tmp_path / "s")
    proc = subprocess.Popen(_finetune(store, text, config, tmp_path / "run", "--steps", "1000"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while BlockStore.open(store).step < 2:  # it has the lock and is committing steps
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        with pytest.raises(StoreLockedError, match=f"pid {proc.pid}"):
            BlockStore.open(store, writer=True)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    t0 = time.perf_counter()
    again = BlockStore.open(store, writer=True)  # no wait, no clean-up step
    print(f"lock taken {time.perf_counter() - t0:.4f}s after the kill, at step {again.step}")
    assert again.verify() == []
    again.collect_garbage()
    again.close()


def _hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _store_as_meta(path: Path) -> dict[str, str]:
    """The store's tensors under Meta's key names (read from the unit files, not our export)."""
    store = BlockStore.open(path)
    out = {}
    for u in store.units:
        prefix = f"layers.{int(u.split('_')[1])}." if u.startswith("block_") else ""
        for k, v in store.read_unit(u).items():
            out[prefix + k] = _hash(v)
    store.close()
    return out


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "blocktune", *args], capture_output=True, text=True)


def test_readers_beside_a_writer_see_one_committed_step(base, tmp_path):
    """`eval` and `export` run in a loop while a full fine-tune commits 20 steps: every one of
    them finishes (nothing it opened disappears), each eval's loss equals a fresh eval of the
    step it reports, and each export equals one committed step of the run, whole."""
    src, text, config = base
    store = _copy(src, tmp_path / "s")
    t0 = time.perf_counter()
    writer = subprocess.Popen(_finetune(store, text, config, tmp_path / "run"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    evals, exports, failures = [], [], []

    def eval_loop():
        while True:
            done = writer.poll() is not None
            r = _cli(["eval", "--store", str(store), "--data", str(text), "--seq-len", "96", "--json"])
            if r.returncode:
                failures.append(r.stderr)
            else:
                evals.append(json.loads(r.stdout))
            if done:
                return

    def export_loop():
        i = 0
        while True:
            done = writer.poll() is not None
            out = tmp_path / f"export-{i}"
            r = _cli(["export", str(store), str(out), "--dtype", "fp32"])
            if r.returncode:
                failures.append(r.stderr)
            else:
                exports.append(out)
            i += 1
            if done:
                return

    threads = [threading.Thread(target=eval_loop), threading.Thread(target=export_loop)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _, err = writer.communicate()
    assert writer.returncode == 0, err
    assert failures == []
    seen = sorted({e["step"] for e in evals})
    print(f"{len(evals)} evals at steps {seen}, {len(exports)} exports, writer done in "
          f"{time.perf_counter() - t0:.1f}s")

    # the reference: the same run on a copy, one step at a time, each step evaluated afresh
    ref = _copy(src, tmp_path / "ref")
    steps: dict[int, dict[str, str]] = {0: _store_as_meta(ref)}
    fresh = {}
    for k in range(STEPS + 1):
        if k:
            cfg = RunConfig.load(config, store=str(ref), data=str(text), out=str(tmp_path / "ref-run"), steps=k)
            trainer = Trainer(cfg, log=lambda s: None)
            trainer.run(resume=k > 1)
            trainer.close()
            steps[k] = _store_as_meta(ref)
        if k in seen:  # the same command, in this process
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert cli.main(["eval", "--store", str(ref), "--data", str(text), "--seq-len", "96", "--json"]) == 0
            fresh[k] = json.loads(out.getvalue())["loss"]
    assert len({tuple(sorted(v.items())) for v in steps.values()}) == STEPS + 1  # every step differs
    for e in evals:
        assert e["loss"] == fresh[e["step"]], e
    found = []
    for out in exports:
        shard = torch.load(out / "consolidated.00.pth", map_location="cpu", weights_only=True)
        got = {k: _hash(v) for k, v in shard.items() if k != "rope.freqs"}
        matches = [k for k, v in steps.items() if v == got]
        assert len(matches) == 1, out
        found += matches
    print(f"exports at steps {found}; reference in {time.perf_counter() - t0:.1f}s")
    # the test has teeth only if readers ran while steps were being committed
    assert any(0 < s < STEPS for s in seen + found), (seen, found)
    # once the readers are gone, the writer's next collection deletes what they kept
    after = BlockStore.open(store, writer=True)
    after.collect_garbage()
    names = {p.name for p in store.iterdir()} - {LOCK_DIR}
    assert names == after.referenced_files()
    after.close()


def test_collection_keeps_what_a_live_reader_pinned(tiny_store):
    """In one process: a reader opened at step 0 keeps step 0's files through the writer's next
    commits and collections, and they go at the first collection after it closes."""
    from blocktune import Engine, EngineConfig, OptimizerConfig
    from conftest import random_batch

    reader = BlockStore.open(tiny_store.path)
    step0 = {reader.record(u).file for u in reader.units}
    engine = Engine(tiny_store, EngineConfig(method="full", device="cpu", optimizer=OptimizerConfig("sgd", 1e-2)))
    for s in range(3):
        engine.train_step([random_batch(tiny_store.args, seed=s)])
    engine.close()
    assert tiny_store.step == 3
    assert step0 <= pinned_files(tiny_store.path)
    assert all((tiny_store.path / f).is_file() for f in step0)
    assert reader.verify() == []  # every file of its step is still there, intact
    reader.close()
    tiny_store.collect_garbage()
    assert not any((tiny_store.path / f).exists() for f in step0)
    assert {p.name for p in tiny_store.path.iterdir()} - {LOCK_DIR} == tiny_store.referenced_files()


def test_a_dead_readers_pin_is_removed(tiny_store, tmp_path):
    """A reader killed with its store open leaves a pin file whose lock the kernel dropped: the
    next collection removes it and the files it named."""
    tiny_store.close()  # the fixture's own pin
    script = (f"import os, sys; from blocktune import BlockStore; s = BlockStore.open({str(tiny_store.path)!r}); "
              "print('open', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([PY, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "open"
    assert "block_00.safetensors" in pinned_files(tiny_store.path)
    proc.kill()
    proc.wait()
    assert pinned_files(tiny_store.path) == set()
    assert list((tiny_store.path / LOCK_DIR / "readers").iterdir()) == []


def test_a_store_changed_under_a_lazy_writer_is_refused(tiny_store):
    """A store opened for reading that another writer committed to meanwhile cannot then be
    written from its stale view (it would write over the newer step)."""
    stale = BlockStore.open(tiny_store.path)
    tiny_store.commit(1, {"block_00": tiny_store.write_unit("block_00", tiny_store.read_unit("block_00"), 1)})
    tiny_store.close()
    with pytest.raises(StoreError, match="committed step 1 since this store was opened at step 0"):
        stale.write_unit("block_01", stale.read_unit("block_01"), 1)
    assert not (tiny_store.path / "block_01-000001.safetensors").exists()


def test_data_parallel_ranks_given_one_store_are_refused(base, tmp_path):
    """Two ranks whose '{rank}' stores resolve to one folder (a link) are refused on both."""
    src, text, config = base
    store = _copy(src, tmp_path / "store-0")
    os.symlink(store, tmp_path / "store-1")
    r = subprocess.run(_finetune(str(tmp_path / "store-{rank}"), text, config, tmp_path / "run",
                                 "--nproc", "2", "--steps", "1"), capture_output=True, text=True, timeout=300)
    print(r.stderr[-600:])
    assert r.returncode != 0 and "were given one store" in r.stderr
    # the launcher names the first rank that failed and its exit code (it said "blocktune FAILED; ---; Failures:")
    assert re.search(r"a rank failed \(its error is printed above\): rank [01] exited with -?[0-9]+", r.stderr)
    assert BlockStore.open(store).step == 0


def test_a_second_prepare_into_one_folder_loses_nothing(tmp_path):
    """Two writes of a new store into one folder: the one that lands second is refused with a
    clear error and its copy discarded; the first one's store stays as it was."""
    from blocktune.store.safefiles import staging_dir

    dst = tmp_path / "dst"
    with pytest.raises(StoreError, match="another process filled this folder"):
        with staging_dir(dst) as tmp:
            (tmp / "manifest.json").write_text("second")
            dst.mkdir()  # the first writer's store lands meanwhile
            (dst / "manifest.json").write_text("first")
    assert (dst / "manifest.json").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["dst"]  # no partial folder left behind
