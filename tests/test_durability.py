"""Invariant 4: the store on disk is always exactly one committed step, and every file is checked."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from blocktune import BlockStore, ChecksumError, Engine, EngineConfig, OptimizerConfig
from blocktune_bench.reliability import SCRIPT, STEPS  # the campaign's own training process
from blocktune_bench.synthetic import SHAPES as PRESETS
from blocktune_bench.synthetic import make_store
from conftest import random_batch
from safetensors import safe_open


def _fingerprint(store: BlockStore) -> tuple:
    return tuple(store.record(u).crc32 for u in store.units)


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """Fingerprints of every step of an uninterrupted run."""
    root = tmp_path_factory.mktemp("dur")
    store = make_store(root / "s", PRESETS["tiny-7b"].with_dropout(0.1), seed=2)
    seen = {0: _fingerprint(store)}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(store.path), str(STEPS)], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        step = int(line)
        seen[step] = _fingerprint(BlockStore.open(store.path))
    assert proc.wait() == 0
    assert len(set(seen.values())) == STEPS + 1  # every step changed the weights
    return seen


def test_kill_at_any_instant_leaves_one_step(history, tmp_path):
    """SIGKILL a real full fine-tune at random instants: the store opens, verifies, and is
    exactly some step of the uninterrupted run; resuming it reaches the same final step."""
    rng = random.Random(0)
    survived = []
    for trial in range(6):
        store = make_store(tmp_path / f"t{trial}", PRESETS["tiny-7b"].with_dropout(0.1), seed=2)
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(store.path), str(STEPS)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        # wait for the first step, then kill somewhere inside a later one
        proc.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reopened = BlockStore.open(store.path)
        assert reopened.verify() == []
        fp = _fingerprint(reopened)
        matches = [k for k, v in history.items() if v == fp]
        assert matches == [reopened.step], (reopened.step, matches)
        survived.append(reopened.step)
        # the resumed run ends where the uninterrupted one did
        subprocess.run([sys.executable, "-c", SCRIPT, str(store.path), str(STEPS)], check=True, capture_output=True)
        assert _fingerprint(BlockStore.open(store.path)) == history[STEPS]
        leftovers = [p.name for p in store.path.iterdir() if ".tmp-" in p.name]
        assert leftovers == []
    print(f"killed at committed steps {survived}; every store was one step of the straight run")


def test_files_are_plain_safetensors(tiny_store):
    """Any safetensors reader can open a unit file: the store is not a private format."""
    with safe_open(str(tiny_store.path / "block_00.safetensors"), framework="pt") as f:
        w = f.get_tensor("attention.wq.weight")
    assert torch.equal(w, tiny_store.read_unit("block_00")["attention.wq.weight"])
    engine = Engine(tiny_store, EngineConfig(method="full", device="cpu",
                                             optimizer=OptimizerConfig("sgd", 1e-2)))
    tok = torch.randint(0, 1024, (1, 9))
    engine.train_step([(tok[:, :-1], tok[:, 1:])])
    engine.close()
    store = BlockStore.open(tiny_store.path)
    with safe_open(str(store.path / store.record("block_00").file), framework="pt") as f:
        assert torch.equal(f.get_tensor("attention.wq.weight"), store.read_unit("block_00")["attention.wq.weight"])


def test_verify_once_and_always(tiny_store):
    tiny_store.read_unit("block_01", verify="once")
    path = tiny_store.path / "block_01.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    tiny_store.read_unit("block_01", verify="once")  # already checked in this process
    with pytest.raises(ChecksumError, match="block_01"):
        tiny_store.read_unit("block_01", verify="always")
    with pytest.raises(ChecksumError, match="block_01"):
        BlockStore.open(tiny_store.path).read_unit("block_01", verify="once")  # a new process's first read


def test_manifest_is_json_with_versions(tiny_store):
    m = json.loads((tiny_store.path / "manifest.json").read_text())
    assert m["format"] == "blocktune-store" and all("crc32" in r for r in m["units"].values())


def test_a_damaged_state_file_stops_the_step_and_loses_nothing(tiny_store):
    """A full fine-tune reads each unit's optimizer state back (streamed, its crc32 checked as the
    last piece arrives). A state file damaged on disk since the last step: the next step raises a
    ChecksumError that names it, and the store keeps its last step, weights and state as they
    were. The same step from the undamaged store goes through."""
    def engine():
        e = Engine(BlockStore.open(tiny_store.path), EngineConfig(
            method="full", device="cpu", optimizer=OptimizerConfig("adamw", lr=1e-2)))
        e.pager.writes.in_ram.budget = 0  # every state file read back, as past the RAM's budget
        return e

    batch = [random_batch(tiny_store.args, 2, 12, seed=0)]
    first = engine()
    first.train_step(batch)
    first.close()
    first.store.close()
    store = BlockStore.open(tiny_store.path)
    before = (_fingerprint(store), tuple(store.state_record(u).crc32 for u in store.units), store.step)
    path = store.path / store.state_record("block_01").file
    good = path.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    second = engine()  # a new process's first read of the file
    with pytest.raises(ChecksumError, match=path.name):
        second.train_step(batch)
    second.close()
    second.store.close()
    store = BlockStore.open(tiny_store.path)
    assert (_fingerprint(store), tuple(store.state_record(u).crc32 for u in store.units), store.step) == before
    path.write_bytes(good)
    third = engine()
    third.train_step(batch)
    third.close()
    third.store.close()
    assert BlockStore.open(tiny_store.path).step == before[2] + 1
