"""Invariant 6 against a hostile or careless neighbour, with real processes (#29): no write follows
a link; a damaged checkpoint or manifest is named, never used; SIGTERM stops a run as Ctrl-C
does; one run folder has one live run."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from blocktune import BlockStore
from blocktune.store.lock import LOCK_DIR
from blocktune_bench.attacks import flip, flip_text
from conftest import multi_process_root

PY = sys.executable
RUN_TOML = ("eval_every = 0\nsample_every = 0\nplot = false\nval_ratio = 0.0\nseq_len = 16\n"
            "batch_size = 2\ngrad_accum = 1\nlr = 3e-3\ndevice = \"cpu\"\nprogress = false\n")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny-7b store (fp32, with its tokenizer), text.txt and run.toml."""
    root = tmp_path_factory.mktemp("attacks")
    multi_process_root(root, RUN_TOML)
    return root


def _store(root: Path, dst: Path) -> Path:
    shutil.copytree(root / "store", dst, ignore=shutil.ignore_patterns(LOCK_DIR))
    return dst


def _finetune(root: Path, store: Path, out: Path, method: str, steps: int, *extra: str) -> list[str]:
    return ["finetune", "--config", str(root / "run.toml"), "--store", str(store), "--data",
            str(root / "text.txt"), "--out", str(out), "--method", method, "--steps", str(steps), *extra]


def _blocktune(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
    """`blocktune ARGS` in a fresh interpreter; `prelude` runs first in that process (it may
    use os.getpid(): the pid the command's temp files are named after)."""
    code = f"import os, sys\n{prelude}\nfrom blocktune.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([PY, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_a_link_at_a_new_versions_name_is_never_written_through(root, tmp_path):
    """A full fine-tune at step 1 is resumed with links planted at the names of step 2's unit
    and optimizer-state versions (and then at the manifest's temp file) that point at a file
    outside the store. The run refuses to write through any of them (exit 1, the link named),
    the file they point at keeps its bytes, and the store still holds step 1, verified; with
    the links gone the run goes on. (Before #29: the file was overwritten, the run exited 0.)"""
    store, run = _store(root, tmp_path / "s"), tmp_path / "run"
    r = _blocktune(*_finetune(root, store, run, "full", 1))
    assert r.returncode == 0, r.stderr[-2000:]
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    units = BlockStore.open(store).units
    links = [store / f"{u}-000002{kind}.safetensors" for u in units for kind in ("", ".state")]
    for link in links:
        os.symlink(victim, link)
    r = _blocktune(*_finetune(root, store, run, "full", 2, "--resume"))
    assert r.returncode == 1, r.stderr[-2000:]
    print(r.stderr.strip().splitlines()[-1])
    assert "symbolic link" in r.stderr and "-000002" in r.stderr and "remove it" in r.stderr
    assert victim.read_text() == "precious\n"
    assert BlockStore.open(store).step == 1 and BlockStore.open(store).verify() == []

    for link in links:
        link.unlink(missing_ok=True)  # the failed step removed the ones it met
    plant = f"os.symlink({str(victim)!r}, os.path.join({str(store)!r}, f'.manifest.json.tmp-{{os.getpid()}}'))"
    r = _blocktune(*_finetune(root, store, run, "full", 2, "--resume"), prelude=plant)
    assert r.returncode == 1 and ".manifest.json.tmp-" in r.stderr and "symbolic link" in r.stderr, r.stderr[-2000:]
    assert victim.read_text() == "precious\n"
    assert BlockStore.open(store).step == 1 and BlockStore.open(store).verify() == []

    for p in store.glob(".manifest.json.tmp-*"):
        p.unlink()
    r = _blocktune(*_finetune(root, store, run, "full", 2, "--resume"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert BlockStore.open(store).step == 2 and victim.read_text() == "precious\n"


def test_a_damaged_lora_checkpoint_is_named_not_used(root, tmp_path):
    """One flipped bit in checkpoint.safetensors (in a tensor's data, then in the step recorded
    in its header) and `--resume` stops with exit 1, naming the file and the fix, before it
    trains or writes anything. (Before #29 it resumed from the damaged values, exit 0.)"""
    store, run = _store(root, tmp_path / "s"), tmp_path / "run"
    r = _blocktune(*_finetune(root, store, run, "lora", 2))
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = run / "checkpoint.safetensors"
    good = ckpt.read_bytes()
    head = int.from_bytes(good[:8], "little")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for offset, bit in ((8 + head + (len(good) - 8 - head) // 2, 3),  # a data bit
                        (good.index(b'"step":"2"') + 8, 0)):  # step 2 -> 3
        ckpt.write_bytes(good)
        flip(ckpt, offset, bit)
        r = _blocktune(*_finetune(root, store, run, "lora", 4, "--resume"))
        assert r.returncode == 1, r.stderr[-2000:]
        print(r.stderr.strip().splitlines()[-1][:300])
        assert f"{ckpt}: checksum mismatch" in r.stderr and "--adapter" in r.stderr
        after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        assert {k: v for k, v in after.items() if k != ckpt.name} == {
            k: v for k, v in before.items() if k != ckpt.name}  # nothing was written
    ckpt.write_bytes(good)
    r = _blocktune(*_finetune(root, store, run, "lora", 4, "--resume"))
    assert r.returncode == 0 and "resuming at step 2 of 4" in r.stderr, r.stderr[-2000:]


def test_a_damaged_manifest_is_named(root, tmp_path):
    """One flipped bit in a field of manifest.json (rope_theta 10000 -> 10010, norm_eps 1e-05 ->
    1e-04) and `verify` and `finetune` stop with exit 1 naming its checksum. A manifest written
    before it had one (the field removed) with vocab_size or multiple_of flipped: `verify` names
    the tensors the field no longer fits, and `finetune` stops with that line, no traceback.
    (Before #29 verify passed every one and finetune trained on, or crashed in load_state_dict.)"""
    store = _store(root, tmp_path / "s")
    mpath = store / "manifest.json"
    good = mpath.read_bytes()
    for text, at in (('"rope_theta": 10000.0', 17), ('"norm_eps": 1e-05', 16)):
        mpath.write_bytes(good)
        flip_text(mpath, text, at)
        for cmd in (["verify", str(store)], _finetune(root, store, tmp_path / "run", "lora", 1, "--overwrite")):
            r = _blocktune(*cmd)
            assert r.returncode == 1 and f"{mpath}: checksum mismatch" in r.stderr, r.stderr[-2000:]
            print(r.stderr.strip().splitlines()[-1][:200])
            assert "restore manifest.json" in r.stderr and "Traceback" not in r.stderr

    old = json.loads(good)
    del old["manifest_crc32"]
    for text, at, tensor in (('"vocab_size": 1024', 17, "tok_embeddings.weight: the model fields give [1025, 64]"),
                             ('"multiple_of": 32', 16, "feed_forward.w1.weight: the model fields give [198, 64]")):
        mpath.write_text(json.dumps(old, indent=1))
        r = _blocktune("verify", str(store))
        assert r.returncode == 0, r.stderr[-2000:]  # an old manifest, undamaged, still opens
        flip_text(mpath, text, at)
        r = _blocktune("verify", str(store))
        assert r.returncode == 1 and tensor in r.stderr, r.stderr[-2000:]
        print(r.stderr.strip().splitlines()[0][:300])
        r = _blocktune(*_finetune(root, store, tmp_path / "run", "lora", 1, "--overwrite"))
        assert r.returncode == 1 and tensor in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def _wait_for_rows(metrics: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= n):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be stopped"
        time.sleep(0.05)


def test_sigterm_stops_a_run_as_ctrl_c_does(root, tmp_path):
    """SIGTERM to a running LoRA finetune (what schedulers, docker stop and systemd send): the
    clean stop of Ctrl-C, with its message and exit code 130; the rows written are whole and
    --resume goes on from the last checkpoint. (Before #29: killed at once, exit -15/143, no message.)"""
    store, run = _store(root, tmp_path / "s"), tmp_path / "run"
    cmd = [PY, "-m", "blocktune", *_finetune(root, store, run, "lora", 1000, "--checkpoint-every", "2")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_rows(run / "metrics.jsonl", 3, proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    print(f"stopped {time.monotonic() - t0:.2f}s after SIGTERM, exit {proc.returncode}: {err.strip().splitlines()[-1]}")
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "blocktune finetune: interrupted", err[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    r = _blocktune(*_finetune(root, store, run, "lora", len(rows) + 2, "--resume"))
    assert r.returncode == 0, r.stderr[-2000:]
    at = int(re.search(r"resuming at step (\d+) of", r.stderr)[1])
    assert at % 2 == 0 and len(rows) - 1 <= at <= len(rows) + 1  # the last checkpoint (every 2 steps)


def test_two_resumes_of_one_lora_run_at_once(root, tmp_path):
    """Two `finetune --resume` of one LoRA run started together: one runs, the other stops at
    once (exit 1) naming the first's pid; the run's rows stay one per step. (Before #29 both ran,
    their rows interleaved in metrics.jsonl.)"""
    store, run = _store(root, tmp_path / "s"), tmp_path / "run"
    r = _blocktune(*_finetune(root, store, run, "lora", 2))
    assert r.returncode == 0, r.stderr[-2000:]
    cmd = [PY, "-m", "blocktune", *_finetune(root, store, run, "lora", 1000, "--resume")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        t0 = time.monotonic()
        while all(p.poll() is None for p in procs):  # the second stops at once; the first runs on
            assert time.monotonic() - t0 < 180, "neither run stopped: both are writing the run folder"
            time.sleep(0.05)
        stopped = time.monotonic() - t0
        loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
        winner = procs[1 - loser]
        _wait_for_rows(run / "metrics.jsonl", 4, winner)
        winner.send_signal(signal.SIGTERM)
        winner.communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    err = procs[loser].communicate()[1]
    print(f"the second resume stopped {stopped:.1f}s after both started: {err.strip().splitlines()[-1][:200]}")
    assert procs[loser].returncode == 1, err[-2000:]
    assert "another run is writing this run folder" in err and f"pid {winner.pid}" in err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 4
