"""Faults injected through the store's IO seam, and fuzzed readers: clear errors, nothing lost."""

import errno
import json

import pytest
import torch
from blocktune import BlockStore, Engine, EngineConfig, OptimizerConfig, StoreError
from blocktune.formats.adapters import load_adapter, save_adapter
from blocktune.model.args import LoraConfig
from blocktune.store.lock import LOCK_DIR
from blocktune_bench.reliability import FaultyOpener
from blocktune_bench.synthetic import SHAPES as PRESETS
from blocktune_bench.synthetic import make_store
from conftest import random_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("after", [0, 150_000, 900_000])
def test_write_fault_keeps_last_step(tmp_path, tiny_args, err, after):
    store = make_store(tmp_path / "s", tiny_args, seed=1)
    engine = Engine(store, EngineConfig(method="full", device="cpu", optimizer=OptimizerConfig("adamw", 1e-3)))
    engine.train_step([random_batch(tiny_args, seed=0)])
    committed = {u: store.record(u).crc32 for u in store.units}
    opener = FaultyOpener(err, write_budget=after)
    store.opener = opener
    with pytest.raises(StoreError, match="write failed") as info:
        engine.train_step([random_batch(tiny_args, seed=1)])
    print(info.value)
    assert opener.faults >= 1 and "step 1" in str(info.value)
    reopened = BlockStore.open(store.path)
    assert reopened.step == 1 and reopened.verify() == []
    assert {u: reopened.record(u).crc32 for u in reopened.units} == committed
    names = {p.name for p in store.path.iterdir()} - {LOCK_DIR}
    assert names == reopened.referenced_files(), names - reopened.referenced_files()
    # the disk recovers: training goes on from the committed step
    store.opener = open
    engine.train_step([random_batch(tiny_args, seed=1)])
    assert BlockStore.open(store.path).step == 2


def test_read_fault_is_named(tiny_store):
    tiny_store.opener = FaultyOpener(errno.EIO, fail_reads=True)
    with pytest.raises(StoreError, match=r"embed\.safetensors: read failed"):
        Engine(tiny_store, EngineConfig(method="full", device="cpu")).logits(random_batch(tiny_store.args)[0])


def _manifest_bytes(tmp_path_factory):
    store = make_store(tmp_path_factory.mktemp("fz") / "s", PRESETS["tiny-7b"], seed=0)
    return store.path, (store.path / "manifest.json").read_bytes(), {u: store.read_unit(u) for u in store.units}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return _manifest_bytes(tmp_path_factory)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10_000), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=4))
def test_fuzzed_manifest_gives_only_clear_errors(manifest, cut, flips):
    """A damaged manifest is refused with a StoreError, or verify names a problem, or what the
    store then reads is exactly the model (a mutation that changed nothing that matters):
    never a raw exception, never other weights."""
    path, good, weights = manifest
    data = bytearray(good[: cut % (len(good) + 1)] if cut % 3 == 0 else good)
    for pos, x in flips:
        if data:
            data[pos % len(data)] ^= x
    try:
        (path / "manifest.json").write_bytes(bytes(data))
        try:
            store = BlockStore.open(path)
        except StoreError:
            return
        if store.verify():
            return
        for unit, want in weights.items():
            try:
                got = store.read_unit(unit)
            except StoreError:
                return
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), unit
    finally:  # each example starts from the good manifest, whatever ran before
        (path / "manifest.json").write_bytes(good)
        assert BlockStore.open(path).verify() == []


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(0, 4000), flip=st.integers(0, 4000))
def test_fuzzed_adapter_gives_only_clear_errors(tmp_path_factory, cut, flip):
    args = PRESETS["tiny-7b"]
    path = tmp_path_factory.mktemp("ad") / "a.safetensors"
    original = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    save_adapter(path, {"layers.0.attention.wq.lora_a": original}, LoraConfig(rank=2), args)
    data = bytearray(path.read_bytes())
    data[flip % len(data)] ^= 0x5A
    path.write_bytes(bytes(data[: max(1, cut)] if cut < len(data) else data))
    try:
        got = load_adapter(path, args)
    except StoreError:
        return
    # it loaded: then the damage missed the tensors and their checksum, and they are the originals
    assert torch.equal(got.tensors["layers.0.attention.wq.lora_a"], original)


def test_checksums_in_manifest_are_json_numbers(tiny_store):
    m = json.loads((tiny_store.path / "manifest.json").read_text())
    assert all(isinstance(r["crc32"], int) for r in m["units"].values())


def test_non_finite_loss_stops_before_any_change(tmp_path, tiny_args):
    from blocktune import TrainingError
    from blocktune.store.build import build_store
    from blocktune_bench.synthetic import random_units

    def units():
        for name, t in random_units(tiny_args, seed=1):
            if name == "head":
                t["output.weight"][3, 5] = float("inf")
            yield name, t

    store = build_store(tmp_path / "s", tiny_args, units(), torch.float32)
    before = {p.name: p.stat().st_mtime_ns for p in store.path.iterdir() if p.name != LOCK_DIR}
    for method in ("full", "lora"):
        engine = Engine(store, EngineConfig(method=method, device="cpu"))
        with pytest.raises(TrainingError, match="at step 0; nothing of this step was applied"):
            engine.train_step([random_batch(tiny_args, seed=0)])
        engine.close()
    assert {p.name: p.stat().st_mtime_ns for p in store.path.iterdir() if p.name != LOCK_DIR} == before
    assert BlockStore.open(store.path).step == 0


def test_lora_rank_mismatch_is_refused(tiny_store):
    engine = Engine(tiny_store, EngineConfig(method="lora", lora=LoraConfig(rank=4), device="cpu"))
    wrong = {k: torch.zeros(8 if "lora_a" in k else v.shape[0], *(v.shape[1:] if "lora_a" in k else (8,)))
             for k, v in engine.adapter_state().items()}
    with pytest.raises(StoreError, match="LoRA rank or model differs"):
        engine.load_adapters(wrong)


def test_manifest_with_a_broken_tensor_layout_is_refused(tiny_store):
    """Found by the reliability campaign: a mangled "shape" key reached verify() as a KeyError."""
    m = json.loads((tiny_store.path / "manifest.json").read_text())
    m["units"]["block_01"]["tensors"]["attention.wq.weight"] = {"dtype": "fp32", "shapf": [64, 64]}
    del m["manifest_crc32"]  # as a manifest written before it had a checksum (which names this damage)
    (tiny_store.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="malformed manifest"):
        BlockStore.open(tiny_store.path)


@pytest.mark.parametrize("compute", [None, "bf16"])
def test_write_fault_at_every_call_leaves_nothing_behind(tmp_path, tiny_args, compute):
    """Found by the reliability campaign: writes still in flight when an earlier one failed
    landed after the clean-up. Fail each write call of a step in turn. In bf16 the fp32 store's
    weights are the masters, and each unit file is written beside its state file, on a thread
    of its own: a fault in either stops both, and neither file stays."""
    def engine_after_one_step(path):
        store = make_store(path, tiny_args, seed=1)
        engine = Engine(store, EngineConfig(method="full", device="cpu", compute_dtype=compute,
                                            optimizer=OptimizerConfig("adamw", 1e-3)))
        engine.train_step([random_batch(tiny_args, seed=0)])
        return store, engine

    store, engine = engine_after_one_step(tmp_path / "count")
    store.opener = counter = FaultyOpener(errno.ENOSPC, fail_at=0)  # fails no call: counts them
    engine.train_step([random_batch(tiny_args, seed=1)])
    engine.close()
    assert counter.calls >= 2 * len(store.units)  # every unit and its state, then the manifest
    for k in range(1, counter.calls + 1):
        store, engine = engine_after_one_step(tmp_path / f"s{k}")
        store.opener = FaultyOpener(errno.ENOSPC, fail_at=k)
        with pytest.raises(StoreError):
            engine.train_step([random_batch(tiny_args, seed=1)])
        reopened = BlockStore.open(store.path)
        assert reopened.step == 1 and reopened.verify() == []
        assert {p.name for p in store.path.iterdir()} - {LOCK_DIR} == reopened.referenced_files(), k


@pytest.mark.parametrize("needle", [b"layers.0.attention.wq.lora_a", b'alpha\\": 16.0'])
def test_adapter_with_a_damaged_name_or_setting_is_refused(tmp_path, needle):
    """The adapter's checksum covered its tensor data only: a flipped byte in a key name or in
    the LoRA settings (alpha 16.0 -> 16.8: another scale) loaded without a word."""
    args = PRESETS["tiny-7b"]
    path = tmp_path / "a.safetensors"
    save_adapter(path, {"layers.0.attention.wq.lora_a": torch.randn(2, 64)}, LoraConfig(rank=2, alpha=16.0), args)
    data = bytearray(path.read_bytes())
    setting = needle.startswith(b"alpha")
    at = bytes(data).index(needle) + (len(needle) - 1 if setting else 7)
    data[at] = ord("8") if setting else ord("X")  # 16.0 -> 16.8; layers.0 -> layersX0
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum mismatch"):
        load_adapter(path, args)
