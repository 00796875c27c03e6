"""Invariant 6: no run hurts another. A full fine-tune records which run owns the store's tuned
state (its id and run folder, with the base it keeps) before it writes anything else; a new run,
a resume, a requeue or a kill in any order never loses the base, restarts a run, or rewrites
another run's records (#28 item 1, #29 A)."""

import json
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from blocktune import BlockStore
from conftest import bt, prepared_root

STEPS = 4


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny Meta checkpoint with its tokenizer prepared into an fp32 store, a text, a config."""
    return prepared_root(tmp_path_factory.mktemp("runs"))


def _store(prepared, dst: Path) -> Path:
    shutil.copytree(prepared / "store", dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def _ft(prepared, store, out, steps=STEPS, *extra) -> list[str]:
    return [sys.executable, "-m", "blocktune", "finetune", "--store", str(store), "--data",
            str(prepared / "text.txt"), "--config", str(prepared / "run.toml"), "--out", str(out),
            "--method", "full", "--steps", str(steps), "--seq-len", "16", "--batch-size", "2",
            "--grad-accum", "1", "--lr", "3e-3", "--checkpoint-every", "1", "--device", "cpu", *extra]


def _run(cmd, code=0) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == code, r.stderr[-2000:]
    return r


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _crcs(store: BlockStore) -> dict[str, int]:
    return {u: store.record(u).crc32 for u in store.units}


def _base_crcs(path: Path) -> dict[str, int]:
    """The kept base model's units, each file read and checked against its checksum."""
    with BlockStore.open_base(path) as base:
        for u in base.units:
            base.read_unit(u)
        return _crcs(base)


def _run_id(out: Path) -> str:
    return tomllib.loads((out / "config.toml").read_text())["run_id"]


def _manifest(store: Path) -> bytes:
    return (store / "manifest.json").read_bytes()


def test_resume_on_a_fresh_store_starts_the_run_and_keeps_the_base(prepared, tmp_path):
    """A requeue script's `--resume` on a store and a run folder where nothing started: the
    run starts properly (base kept, run recorded), it does not train without a record."""
    store = _store(prepared, tmp_path / "s")
    with BlockStore.open(store) as s:
        before = _crcs(s)
    r = _run(_ft(prepared, store, tmp_path / "run", STEPS, "--resume"))
    assert _base_crcs(store) == before  # before the fix: "no base model is kept", its files deleted
    with BlockStore.open(store) as s:
        assert s.step == STEPS and s.verify() == []
        run = s.run_record()
    assert "no full fine-tune had started" in r.stderr
    assert run == {"id": _run_id(tmp_path / "run"), "out": str((tmp_path / "run").resolve()), "first_step": 0}
    assert [row["step"] for row in _rows(tmp_path / "run")] == list(range(1, STEPS + 1))


def _kill_when(proc: subprocess.Popen, ready, delay: float) -> None:
    deadline = time.time() + 120
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kills_around_the_first_commit_and_requeues_lose_nothing(prepared, tmp_path):
    """SIGKILL a full fine-tune as its run folder appears (before, during or just after its
    first bookkeeping commit), requeue it with `--resume`, kill that at its second step and
    requeue again: every time the store keeps the base and ends at the straight run's step and
    weights, with the straight run's losses."""
    straight = _store(prepared, tmp_path / "straight")
    _run(_ft(prepared, straight, tmp_path / "straight-run"))
    with BlockStore.open(straight) as s:
        want = _crcs(s)
    want_losses = [row["loss"] for row in _rows(tmp_path / "straight-run")]
    # while it starts (before its run folder exists), as the folder appears, a little after
    for trial, (ready, delay) in enumerate([(lambda out: True, 1.0), (Path.exists, 0.0), (Path.exists, 0.03)]):
        store, out = _store(prepared, tmp_path / f"s{trial}"), tmp_path / f"run{trial}"
        with BlockStore.open(store) as s:
            base = _crcs(s)
        first = subprocess.Popen(_ft(prepared, store, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _kill_when(first, lambda o=out, r=ready: r(o), delay)
        with BlockStore.open(store) as s:
            at_kill = (s.step, "run" in s.manifest)
        again = subprocess.Popen(_ft(prepared, store, out, STEPS, "--resume"),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _kill_when(again, lambda m=out / "metrics.jsonl": m.exists() and m.read_text().count("\n") >= 2, 0.0)
        _run(_ft(prepared, store, out, STEPS, "--resume"))
        print(f"trial {trial}: killed at store step {at_kill[0]} (run recorded: {at_kill[1]}); requeued to the end")
        assert _base_crcs(store) == base
        with BlockStore.open(store) as s:
            assert s.step == STEPS and _crcs(s) == want and s.verify() == []  # before the fix: 6 (restarted)
            assert s.run_record()["id"] == _run_id(out)
        assert [row["loss"] for row in _rows(out)] == want_losses


def test_a_second_full_run_neither_stacks_nor_steals(prepared, tmp_path):
    """Run A finishes; run B on the same store is refused until it says where to start; B from
    the base trains as A did; A's resume is then refused, naming both runs, and its records stay
    as they were; `info` and the run folder say where the tuned weights live."""
    store = _store(prepared, tmp_path / "s")
    with BlockStore.open(store) as s:
        base = _crcs(s)
    a, b, c = tmp_path / "A", tmp_path / "B", tmp_path / "C"
    _run(_ft(prepared, store, a, 3))
    a_rows, a_manifest = (a / "metrics.jsonl").read_bytes(), _manifest(store)

    refused = _run(_ft(prepared, store, b, 2), code=2)  # before the fix: 0, B trained on A's weights
    a_id = _run_id(a)
    print(refused.stderr.strip().splitlines()[-1])
    assert a_id in refused.stderr and str(a.resolve()) in refused.stderr
    assert "--start-from base" in refused.stderr and "--start-from tuned" in refused.stderr
    assert _manifest(store) == a_manifest and not (b / "metrics.jsonl").exists()

    _run(_ft(prepared, store, b, 2, "--start-from", "base"))
    b_id = _run_id(b)
    assert b_id != a_id
    assert [row["loss"] for row in _rows(b)] == [row["loss"] for row in _rows(a)[:2]]  # from the base
    assert _base_crcs(store) == base
    info = json.loads(bt("info", store, check=True).stdout)
    assert info["tuned_by"] == {"run_id": b_id, "out": str(b.resolve()), "first_step": 3, "steps_done": 2}
    assert info["base_kept"] and info["base_step"] == 0 and info["holds_tuned"]
    assert str(store.resolve()) in (b / "config.toml").read_text().splitlines()[0]

    b_manifest = _manifest(store)
    stolen = _run(_ft(prepared, store, a, 5, "--resume"), code=2)
    print(stolen.stderr.strip().splitlines()[-1])
    assert a_id in stolen.stderr and b_id in stolen.stderr
    assert (a / "metrics.jsonl").read_bytes() == a_rows and _manifest(store) == b_manifest

    _run(_ft(prepared, store, c, 1, "--start-from", "tuned"))
    assert _rows(c)[0]["loss"] < _rows(b)[0]["loss"]  # B's tuned weights, on B's first batch
    assert _base_crcs(store) == base
    _run(_ft(prepared, store, b, 3, "--resume"), code=2)


def test_a_kill_between_the_store_claim_and_the_run_folder(prepared, tmp_path):
    """What a kill leaves between the run's commit in the store and its config.toml: the store
    names the run folder, the folder has no id. A resume from another folder is refused; the
    run's own resume takes it on (the id from the store). A new run takes over such a claim on
    another store copy: nothing was tuned under it."""
    store, out = _store(prepared, tmp_path / "s"), tmp_path / "run"
    for path in (store, _store(prepared, tmp_path / "s2")):
        with BlockStore.open(path, writer=True) as s:
            s.start_run(keep_base=True, run_id="killed-run", out=str(out.resolve()))
    out.mkdir()
    refused = _run(_ft(prepared, store, tmp_path / "other", 1, "--resume"), code=2)
    assert "killed-run" in refused.stderr and not (tmp_path / "other" / "metrics.jsonl").exists()
    _run(_ft(prepared, store, out, 2, "--resume"))
    assert _run_id(out) == "killed-run" and [row["step"] for row in _rows(out)] == [1, 2]
    _run(_ft(prepared, tmp_path / "s2", tmp_path / "new", 1))
    with BlockStore.open(tmp_path / "s2") as s:
        assert s.run_record()["id"] == _run_id(tmp_path / "new") and s.step == 1


def test_a_full_resume_with_other_steps_says_the_schedule_changed(prepared, tmp_path):
    """As a LoRA resume does (#28 item 1): before the fix the store's resume rewrote config.toml
    before the note read it, and a full run said nothing."""
    store, out = _store(prepared, tmp_path / "s"), tmp_path / "run"
    _run(_ft(prepared, store, out, 2))
    r = _run(_ft(prepared, store, out, 4, "--resume"))
    note = [line for line in r.stderr.splitlines() if line.startswith("note: resuming")]
    print(note)
    assert len(note) == 1 and "steps 2 -> 4" in note[0] and "schedule" in note[0]
    assert tomllib.loads((out / "config.toml").read_text())["steps"] == 4
    assert [row["step"] for row in _rows(out)] == [1, 2, 3, 4]


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_a_refused_run_leaves_no_run_folder_behind(prepared, tmp_path):
    """A run refused before its first step leaves nothing that was not there (#28): before the fix
    each case left its run folder holding .lock/ (runs/<date-time>/ without --out). A folder that
    was there stays, as it was."""
    store = _store(prepared, tmp_path / "s")
    _run(_ft(prepared, store, tmp_path / "owner", 1))  # the store now holds that run's tuned weights
    (tmp_path / "rows.csv").write_text("prompt,response\nhi,there\n")
    (tmp_path / "obj.json").write_text('{"prompt": "hi", "response": "there"}')
    (tmp_path / "keys.jsonl").write_text('{"question": "hi", "answer": "there"}\n')
    text = str(prepared / "text.txt")
    cases = {  # what refuses it: (the command's extra arguments, what the message names)
        "a resume on another run's store": ((text, "--resume"), "Nothing was written to"),
        "a store another run tuned": ((text,), "--start-from base"),
        "a .csv": ((tmp_path / "rows.csv",), "rows.csv"),
        "a JSON object": ((tmp_path / "obj.json",), "obj.json"),
        "unknown keys": ((tmp_path / "keys.jsonl",), "keys.jsonl"),
        "a missing file": ((tmp_path / "nothing.txt",), "nothing.txt"),
        "--adapter on a full run": ((text, "--adapter", tmp_path / "a.safetensors"), "--method lora"),
    }
    for i, (case, ((data, *extra), said)) in enumerate(cases.items()):
        out = tmp_path / "new" / f"run{i}"
        cmd = _ft(prepared, store, out, 2, *map(str, extra))
        cmd[cmd.index("--data") + 1] = str(data)
        r = _run(cmd, code=2)
        assert said in r.stderr, (case, r.stderr[-500:])
        assert not (tmp_path / "new").exists(), (case, _tree(tmp_path / "new"))
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    cmd = _ft(prepared, store, kept, 2, "--resume")
    _run(cmd, code=2)
    assert _tree(kept) == ["notes.txt"]  # the folder stays, and no .lock/ in it
    # without --out: runs/<date-time>/ under the working directory, and runs/ itself
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cmd = _ft(prepared, store, "x", 2)
    del cmd[cmd.index("--out"):cmd.index("--out") + 2]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 2 and "run folder: runs/" in r.stderr, r.stderr[-500:]
    assert _tree(cwd) == []


def test_lora_on_a_tuned_store_says_which_weights_and_honours_start_from(prepared, tmp_path):
    """On a store holding a full run's tuned weights (base kept), a LoRA run says which weights it
    adapts; --start-from base adapts the kept base (before the fix: ignored, the tuned weights, in
    silence). --start-from tuned where no run tuned the store is refused, for both methods (the
    likely cause is the wrong --store: stopping costs less than a run on weights not meant)."""
    store = _store(prepared, tmp_path / "s")
    fresh = _store(prepared, tmp_path / "fresh")
    _run(_ft(prepared, store, tmp_path / "full", 1))
    base_loss = _rows(tmp_path / "full")[0]["loss"]  # the first step's loss is the base model's

    def lora(out, on=store, *extra, code=0):
        return _run(_ft(prepared, on, tmp_path / out, 1, "--method", "lora", *extra), code=code)

    tuned = lora("tuned")
    said = [line for line in tuned.stderr.splitlines() if line.startswith("LoRA adapts")]
    print(said)
    assert said == [f"LoRA adapts the tuned weights of run {_run_id(tmp_path / 'full')} ({(tmp_path / 'full').resolve()}) "
                    "(store step 1); --start-from base adapts the kept base model instead"]
    assert _rows(tmp_path / "tuned")[0]["loss"] < base_loss
    based = lora("based", store, "--start-from", "base")
    assert "LoRA adapts the base model kept at step 0 (--start-from base)" in based.stderr
    assert _rows(tmp_path / "based")[0]["loss"] == pytest.approx(base_loss, rel=1e-5)
    assert "LoRA adapts" not in lora("plain", fresh).stderr  # one set of weights: nothing to say
    for method in ("lora", "full"):
        r = _run(_ft(prepared, fresh, tmp_path / f"t-{method}", 1, "--method", method, "--start-from", "tuned"), code=2)
        assert "--start-from tuned, but no full fine-tune has tuned this store" in r.stderr, r.stderr[-500:]
        assert not (tmp_path / f"t-{method}").exists()
