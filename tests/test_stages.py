"""Pipeline stages over real processes on loopback (gloo): S stages (x D replicas) == one process.

Every run is the CLI's (`blocktune finetune --nproc W --stages S`), dropout on, SGD so that the
trained tensors show the gradients to their rounding (see test_distributed), compared with one
process at the same global batch.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from blocktune import BlockStore
from blocktune.dist.pipeline import split_by_bytes
from blocktune.errors import ConfigError
from conftest import finetune_cmd, multi_process_root, signal_rank_one
from safetensors.torch import load_file

PY = sys.executable
CONFIG = ("dropout = 0.1\nlora_dropout = 0.1\nwarmup_steps = 1\neval_every = 0\nsample_every = 0\n"
          "plot = false\nval_ratio = 0.0\ncheckpoint_every = 1\ndist_timeout = 60.0\noptimizer = \"sgd\"\n")
BATCH = 4  # examples per micro-batch over all replicas: each of D replicas takes 4 / D


def test_split_by_bytes_is_the_best_contiguous_split():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        sizes = [rng.randint(1, 100) for _ in range(n)]
        for stages in range(1, n + 1):
            got = split_by_bytes(sizes, stages)
            assert [lo for lo, _ in got] == [0] + [hi for _, hi in got[:-1]] and got[-1][1] == n
            assert all(hi > lo for lo, hi in got)
            best = min(max(sum(sizes[a:b]) for a, b in zip((0,) + cuts, cuts + (n,)))
                       for cuts in _cut_sets(n, stages))
            assert max(sum(sizes[lo:hi]) for lo, hi in got) == best, (sizes, stages, got)
    with pytest.raises(ConfigError, match="more than the model's 3 units"):
        split_by_bytes([1, 2, 3], 4)


def _cut_sets(n, stages):
    import itertools

    return itertools.combinations(range(1, n), stages - 1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    store = multi_process_root(root, CONFIG)
    runs = {}
    # the single-process reference of each method and replica count: D replicas at batch B and
    # A micro-batches are one process at batch B and D x A micro-batches, dropout streams included
    for method in ("lora", "full"):
        for replicas in (1, 2):
            one = root / f"one-{method}-{replicas}"
            s = _store_copies(root / f"single-{method}-{replicas}", store, 1) if method == "full" else store
            _run(root, s, one, method, BATCH // replicas, accum=2 * replicas)
            runs[method, replicas] = one, s
    return root, store, runs


def _store_copies(where, store, ranks, stages=1):
    """A full fine-tune writes its store on every rank: one each (`{rank}` in --store), made by
    `blocktune split-stages` (hard links: a rank's writes must not reach the others' files)."""
    r = subprocess.run([PY, "-m", "blocktune", "split-stages", str(store), "--out", str(where / "rank-{rank}"),
                        "--stages", str(stages), "--nproc", str(ranks)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return where / ("rank-{rank}" if ranks > 1 else "rank-0")


def _run(root, store, out, method, batch, steps=3, extra=(), accum=2):
    r = subprocess.run(finetune_cmd(root, store, out, method, batch, steps, extra, accum), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (out / "console.txt").write_text(r.stdout + r.stderr)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("stages,replicas,budget", [(2, 1, "inf"), (2, 1, "300KiB"), (4, 1, "inf"), (2, 2, "inf")])
def test_stages_equal_one_process(prepared, tmp_path, method, stages, replicas, budget):
    """Where a stage's units fit in its budget (inf) they stay resident and each micro-batch
    goes through all of them in turn; at 300 KiB (each unit is at most 256 KiB) the stage is
    block-major, every micro-batch through each unit while it is resident."""
    root, store, runs = prepared
    one, single_store = runs[method, replicas]
    world = stages * replicas
    rank_store = _store_copies(tmp_path / "stores", store, world, stages) if method == "full" else store
    rows = _run(root, rank_store, tmp_path / "staged", method, BATCH // replicas,
                extra=["--nproc", str(world), "--stages", str(stages), "--device-budget", budget])
    said = (tmp_path / "staged" / "console.txt").read_text()
    order = "in turn (they stay resident)" if budget == "inf" else "block-major"
    assert said.count(order) == world, said[-2000:]  # every rank, in the order its budget allows
    ref = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    print(f"S={stages} x D={replicas} {method}: losses {[r['loss'] for r in rows]} vs {[r['loss'] for r in ref]}")
    assert len(rows) == len(ref) == 3
    for a, b in zip(ref, rows):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]), (a["loss"], b["loss"])
        assert a["tokens"] == b["tokens"]

    # each rank read its own stage's units and no other, each once in the first step
    s0 = BlockStore.open(store)
    bounds = split_by_bytes([s0.unit_bytes(u) for u in s0.units], stages)
    first = rows[0]
    for r in range(world):
        lo, hi = bounds[r // replicas]
        own = s0.units[lo:hi]
        assert first["units_read_by_rank"][r] == own, (r, first["units_read_by_rank"][r], own)
        own_bytes = sum(s0.unit_bytes(u) for u in own)
        if budget == "inf":  # each once, then resident
            assert first["bytes_read_by_rank"][r] == own_bytes
        else:  # again in the backward, all but the unit at the turn
            assert own_bytes < first["bytes_read_by_rank"][r] < 2 * own_bytes

    if method == "lora":
        a, b = load_file(str(one / "adapter.safetensors")), load_file(str(tmp_path / "staged" / "adapter.safetensors"))
        assert a.keys() == b.keys()
        assert any(k.endswith("lora_b") and bool(v.abs().max() > 0) for k, v in a.items())  # trained
        worst = max(_rel(b[k], a[k]) for k in a)
    else:
        want = BlockStore.open(single_store)
        worst = 0.0
        for r in range(world):
            lo, hi = bounds[r // replicas]
            mine = BlockStore.open(str(rank_store).replace("{rank}", str(r)))
            assert mine.step == want.step
            for u in s0.units[lo:hi]:
                assert mine.record(u).crc32 != s0.record(u).crc32  # trained
                worst = max([worst] + [_rel(mine.read_unit(u)[k], v) for k, v in want.read_unit(u).items()])
            for u in s0.units[:lo] + s0.units[hi:]:  # another stage's units: untouched here
                assert mine.record(u).crc32 == s0.record(u).crc32
        # one store of the whole tuned model, for export, eval and generate
        merged = tmp_path / "merged"
        r = subprocess.run([PY, "-m", "blocktune", "merge-stages", str(merged), "--store", str(rank_store),
                            "--nproc", str(world), "--stages", str(stages)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        whole = BlockStore.open(merged)
        assert whole.step == want.step and whole.verify() == []
        for u in s0.units:
            for k, v in want.read_unit(u).items():
                assert _rel(whole.read_unit(u)[k], v) <= 1e-6, (u, k)
    print(f"worst relative difference of the trained tensors: {worst:.2e}")
    assert worst <= 1e-6


def test_a_kill_between_the_stages_commits_resumes_at_one_step(prepared, tmp_path):
    """Stage 0 committed step 2, stage 1 did not (its store is put back at step 1, as a kill
    between the two commits leaves it): the resume brings stage 0 back to step 1 (each stage's
    store keeps the step before its last commit) and the run ends as the uninterrupted one.
    The per-rank stores are on another file system than the store they were split from (tmpfs,
    where it is one): no hard links, so each holds its own stage's unit files only."""
    root, store, runs = prepared
    one, single_store = runs["full", 1]
    elsewhere = Path("/dev/shm")
    apart = elsewhere.is_dir() and os.stat(elsewhere).st_dev != os.stat(store).st_dev
    where = Path(tempfile.mkdtemp(dir=elsewhere)) if apart else tmp_path
    try:
        _kill_between_commits(root, store, one, single_store, where / "stores", tmp_path, apart)
    finally:
        if apart:
            shutil.rmtree(where)


def _kill_between_commits(root, store, one, single_store, stores_dir, tmp_path, apart):
    stores = _store_copies(stores_dir, store, 2, 2)
    base = BlockStore.open(store)
    bounds = split_by_bytes([base.unit_bytes(u) for u in base.units], 2)
    if apart:  # rank 0 has its stage's unit files and not the others'
        files = {p.name for p in (stores_dir / "rank-0").iterdir()}
        assert {base.record(u).file for u in base.units[:bounds[0][1]]} <= files
        assert not {base.record(u).file for u in base.units[bounds[0][1]:]} & files
    staged = ["--nproc", "2", "--stages", "2"]
    _run(root, stores, tmp_path / "run", "full", BATCH, steps=2, extra=staged)
    behind = BlockStore.open(stores_dir / "rank-1", writer=True)
    behind.roll_back()
    assert behind.step == BlockStore.open(store).step + 1
    behind.close()
    r = subprocess.run(finetune_cmd(root, stores, tmp_path / "run", "full", BATCH, steps=3,
                                    extra=[*staged, "--resume"]), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rolled back" in r.stdout + r.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]) for a, b in zip(ref, rows))
    want = BlockStore.open(single_store)
    for r, (lo, hi) in enumerate(bounds):
        mine = BlockStore.open(stores_dir / f"rank-{r}")
        assert mine.step == want.step
        for u in base.units[lo:hi]:
            for k, v in want.read_unit(u).items():
                assert _rel(mine.read_unit(u)[k], v) <= 1e-6, (r, u, k)


def test_a_staged_lora_checkpoint_is_the_single_process_one(prepared, tmp_path):
    """Rank 0 writes every stage's adapters and optimizer state into one checkpoint; a staged
    resume and a single-process resume both continue it to the uninterrupted result."""
    root, store, runs = prepared
    one, _ = runs["lora", 1]
    staged = ["--nproc", "2", "--stages", "2"]
    _run(root, store, tmp_path / "run", "lora", BATCH, steps=2, extra=staged)
    shutil.copytree(tmp_path / "run", tmp_path / "alone")
    for out, extra in ((tmp_path / "run", [*staged, "--resume"]), (tmp_path / "alone", ["--resume", "--stages", "1"])):
        r = subprocess.run(finetune_cmd(root, store, out, "lora", BATCH, steps=3, extra=extra),
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        a, b = load_file(str(one / "adapter.safetensors")), load_file(str(out / "adapter.safetensors"))
        assert max(_rel(b[k], a[k]) for k in a) <= 1e-6, out.name


def test_validation_runs_through_the_stages(prepared, tmp_path):
    """The validation loss, computed by every rank on its own units, is the single process's."""
    root, store, _ = prepared
    val = ["--set", "val_ratio=0.2", "--set", "eval_every=1", "--set", "eval_batches=2"]
    one = _run(root, store, tmp_path / "one", "lora", BATCH, steps=2, extra=val)
    two = _run(root, store, tmp_path / "two", "lora", BATCH, steps=2, extra=[*val, "--nproc", "2", "--stages", "2"])
    assert [r["val_loss"] for r in one] == pytest.approx([r["val_loss"] for r in two], rel=1e-6)
    assert one[0]["val_loss"] != one[1]["val_loss"]  # it moved: the adapters were trained between


def test_a_silent_stage_times_out(prepared, tmp_path):
    """A stage that stops answering (SIGSTOP: its sockets stay open) is waited for dist_timeout
    seconds, then the others stop with an error, not a hang."""
    root, store, _ = prepared
    cmd = finetune_cmd(root, store, tmp_path / "run", "lora", 2, steps=10_000,
                       extra=["--stages", "2", "--set", "dist_timeout=8"])
    code, waited, err = signal_rank_one(cmd, tmp_path / "run" / "metrics.jsonl", signal.SIGSTOP)
    assert code == 1 and "lost contact" in err and "Traceback" not in err
    assert 7 < waited < 60
