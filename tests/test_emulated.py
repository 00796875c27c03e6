"""The accelerator path on the CPU (`device="emu"`): separate device tensors, the host tier,
staging buffers and a lazy copy stream ordered by events (a copy lands only when waited on;
memory taken again holds NaN). In fp32 the same equivalence, same tolerances; in bf16 (emu's
default, as CUDA's) against the in-memory reference in bf16."""

import gc

import pytest
import torch
from blocktune import Engine, EngineConfig, OptimizerConfig
from blocktune.machine.devices import resolve_device
from blocktune.paging.pager import resident_sizes
from blocktune.store.store import BlockStore
from blocktune_bench.synthetic import make_store
from conftest import random_batch
from test_equivalence import assert_matches, one_unit_budget, run_pair

CASES = [("full", "sgd"), ("full", "adamw"), ("lora", "adamw")]
BF16_TOL = {"sgd": 1e-2, "adamw": 5e-2}  # norm-relative, a full fine-tune against the bf16 reference (measured 3.3e-3, 2.0e-2)


@pytest.mark.parametrize("method,opt", CASES)
@pytest.mark.parametrize("units,host", [(1, "on"), (2, "on"), (1, "off"), (2, "off")])
def test_emulated_accelerator_equals_reference(tmp_path, tiny_args, method, opt, units, host):
    """Three steps at a budget of one or two units, host tier on (unbounded) or off. With the
    tier on, a full fine-tune's later steps load units the tier held before their write-back:
    it must hand out the new version."""
    store = make_store(tmp_path / "s", tiny_args.with_dropout(0.1), seed=3)
    budget = units * one_unit_budget(store)
    engine, ref, losses = run_pair(store, method, opt, steps=3, budget=budget, device="emu",
                                   host_budget=None if host == "on" else 0)
    stats = engine.pager.stats
    print(f"host hits {stats.host_hits}, unit reads {stats.unit_reads}, to device {stats.bytes_to_device:,} B")
    assert stats.bytes_to_device > 0  # the units went through the copy stream
    assert (stats.host_hits > 0) == (host == "on")
    assert stats.peak_resident <= budget
    assert_matches(store.path, engine, ref, method, losses)


@pytest.mark.parametrize("method,opt", CASES)
@pytest.mark.parametrize("units,host", [(1, "on"), (2, "off")])
def test_emulated_bf16_equals_the_bf16_reference(tmp_path, tiny_args, method, opt, units, host):
    """The accelerator's default path: bf16 compute (emu's default, as CUDA's), an fp32 store's
    raw bytes copied over and converted on the device, against the in-memory reference in bf16."""
    store = make_store(tmp_path / "s", tiny_args.with_dropout(0.1), seed=3)
    budget = units * max(resident_sizes(store, torch.bfloat16, device=resolve_device("emu")).values())
    engine, ref, losses = run_pair(store, method, opt, steps=3, budget=budget, device="emu", dtype=None,
                                   host_budget=None if host == "on" else 0)
    assert engine.dtype == torch.bfloat16
    assert engine.pager.stats.bytes_to_device > 0
    assert engine.pager.stats.peak_resident <= budget
    if method == "lora":  # the same bf16 arithmetic as the reference's, to the bit
        assert_matches(store.path, engine, ref, method, losses)
        return
    assert_bf16_full_matches(store.path, engine, ref, opt, losses)


def assert_bf16_full_matches(store_path, engine, ref, opt, losses) -> BlockStore:
    """A full fine-tune in bf16 against the reference in bf16: the engine steps fp32 masters where
    the reference steps bf16 weights, so they part by bf16's rounding of each update (AdamW's,
    about ±lr whatever the gradient, most visibly). Returns the store after the steps."""
    for got, want in losses:
        print(f"loss paged {got:.9f} reference {want:.9f}")
        assert abs(got - want) <= 1e-3 * abs(want)
    engine.close()
    st = BlockStore.open(store_path)
    worst = max(_norm_rel(st.read_unit(u)[k], w) for u in st.units for k, w in ref.unit_state(u).items())
    print(f"weights: worst relative error (norm) {worst:.2e}")
    assert worst <= BF16_TOL[opt]
    return st


def _norm_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_emulated_grad_accumulation_and_kept_activations(tmp_path, tiny_args, method):
    store = make_store(tmp_path / "s", tiny_args.with_dropout(0.1), seed=3)
    engine, ref, losses = run_pair(store, method, "adamw", steps=3, micro=3, budget=2 * one_unit_budget(store),
                                   device="emu", keep_budget=None)
    assert sum(1 for _ in losses) == 3
    assert_matches(store.path, engine, ref, method, losses)


def test_a_missing_wait_is_caught(tmp_path, tiny_args, monkeypatch):
    """The emulation has teeth: a copy lands only when an event after it is waited on, so with
    the compute no longer waiting for the copy stream the forward reads slots that still hold
    what they were scribbled with (NaN), every time."""
    store = make_store(tmp_path / "s", tiny_args, seed=3)
    tok = random_batch(tiny_args, 2, 12)[0]
    want = Engine(store, EngineConfig(method="full", device="cpu")).logits(tok)
    dev = resolve_device("emu")
    got = Engine(store, EngineConfig(method="full", device=dev, compute_dtype="fp32")).logits(tok)
    assert torch.equal(got, want)  # the emulated path, waiting as it should
    monkeypatch.setattr(type(dev), "wait_event", lambda self, event: None)
    broken = Engine(store, EngineConfig(method="full", device=dev, compute_dtype="fp32")).logits(tok)
    assert broken.isnan().any()


def test_lazy_copies_land_when_waited_on():
    """A copy on the emulated copy stream lands when an event after it is waited on, in order,
    not before; its destination holds NaN until then; a copy whose destination is gone is
    dropped (as a GPU's copy holds no reference); `synchronize` lands everything."""
    dev = resolve_device("emu")
    stream = dev.copy_stream()
    src = torch.arange(4, dtype=torch.float32)
    with dev.stream(stream):
        a = dev.to_device(src, torch.bfloat16)
        first = dev.record_event(stream)
        b = torch.empty(4)
        dev.copy_into(b, src * 2)
        second = dev.record_event(stream)
    assert a.isnan().all() and not first.query()
    dev.wait_event(first)
    assert torch.equal(a, src.to(torch.bfloat16)) and first.query() and not second.query()
    with dev.stream(stream):
        dev.copy_into(torch.empty(4), src)  # its destination is dropped at once
    dev.synchronize()
    assert torch.equal(b, src * 2) and second.query()


def test_host_tier_is_bounded_and_released(tmp_path, tiny_args):
    """The tier takes page-locked slots of exactly the largest unit's bytes (no power-of-two
    rounding), as many as the budget holds, and hands every one back on close."""
    from blocktune.machine.devices import emu_registered_bytes

    store = make_store(tmp_path / "s", tiny_args, seed=3)
    unit = one_unit_budget(store)
    gc.collect()  # engines other tests dropped unclosed go now, not in the middle of this test
    before = emu_registered_bytes()
    engine = Engine(store, EngineConfig(method="full", device="emu", device_budget=unit, host_budget=3 * unit,
                                        optimizer=OptimizerConfig("sgd", 1e-2), compute_dtype="fp32"))
    for s in range(3):
        engine.train_step([random_batch(tiny_args, seed=s)])
    pager = engine.pager
    slot = pager._tier.slot_bytes
    assert slot < 1.01 * max(store.unit_bytes(u) for u in store.units) + 4096
    assert pager.host_tier_bytes == (3 * unit // slot) * slot  # full, and within the budget
    assert emu_registered_bytes() - before == pager.host_tier_bytes  # what it says is what it holds
    assert pager.stats.host_hits > 0
    engine.close()
    assert pager.host_tier_bytes == 0 and emu_registered_bytes() == before


@pytest.mark.parametrize("method,opt", [("full", "adamw"), ("lora", "adamw")])
@pytest.mark.parametrize("units", [1, 2])
def test_emulated_mps_copies_on_one_thread(tmp_path, tiny_args, method, opt, units):
    """`emu-mps` behaves as MPS: one memory (no host tier), and a device copy off the computing
    thread is an error. Paged training still equals the reference."""
    store = make_store(tmp_path / "s", tiny_args.with_dropout(0.1), seed=3)
    budget = units * one_unit_budget(store)
    engine, ref, losses = run_pair(store, method, opt, steps=3, budget=budget, device="emu-mps",
                                   host_budget="auto")
    assert engine.budgets.host == 0 and engine.pager.stats.host_hits == 0
    assert engine.pager.stats.bytes_to_device > 0
    assert_matches(store.path, engine, ref, method, losses)


def test_emulated_mps_catches_a_copy_off_thread(tmp_path, tiny_args, monkeypatch):
    """The check has teeth: let the pager copy on its reader thread, as on CUDA, and the
    emulated MPS refuses."""
    from blocktune.machine.devices import Device

    store = make_store(tmp_path / "s", tiny_args, seed=3)
    monkeypatch.setattr(Device, "copies_on_any_thread", property(lambda self: True))
    engine = Engine(store, EngineConfig(method="lora", device="emu-mps"))
    try:
        with pytest.raises(RuntimeError, match="emu-mps: a device copy on thread 'blocktune-read"):
            engine.train_step([random_batch(tiny_args, seed=0)])
    finally:  # while the patch holds: the loads read ahead fail the same way, and none is left waiting
        engine.close()


def test_host_tier_of_an_engine_never_closed_is_released(tmp_path, tiny_args):
    """An engine dropped without close still unregisters its slots (before their memory is
    freed), and a later engine's count is its own (a freed slot's address can recur)."""
    from blocktune.machine.devices import emu_registered_bytes

    store = make_store(tmp_path / "s", tiny_args, seed=3)
    unit = one_unit_budget(store)
    gc.collect()  # engines other tests dropped unclosed go now, not in the middle of this test
    before = emu_registered_bytes()
    for _ in range(2):
        engine = Engine(store, EngineConfig(method="lora", device="emu", device_budget=unit, host_budget=3 * unit))
        engine.train_step([random_batch(tiny_args, seed=0)])
        held = engine.pager.host_tier_bytes
        assert held > 0 and emu_registered_bytes() - before == held
        engine.pager._reader.shutdown(wait=True)
        del engine
        gc.collect()
        assert emu_registered_bytes() == before


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("units", [1, 2])
def test_units_live_in_device_slots_within_the_budget(tmp_path, tiny_args, method, units, monkeypatch):
    """Every tensor a unit is computed with on the emulated device is a view of a device slot;
    the slot buffers alive at once (followed by their lifetimes, not by the slots' own count)
    never hold more than the budget; and slots are reused, not made per load."""
    import weakref

    from blocktune.paging.slots import DeviceSlots

    alive, peak, made = {}, [0], []
    make = DeviceSlots._make

    def tracked(self, nbytes):
        slot = make(self, nbytes)
        key = slot.buf.untyped_storage().data_ptr()
        alive[key] = nbytes
        weakref.finalize(slot.buf.untyped_storage(), alive.pop, key, None)
        peak[0] = max(peak[0], sum(alive.values()))
        made.append((key, nbytes))
        return slot

    monkeypatch.setattr(DeviceSlots, "_make", tracked)
    store = make_store(tmp_path / "s", tiny_args.with_dropout(0.1), seed=3)
    budget = units * max(resident_sizes(store, torch.bfloat16, device=resolve_device("emu")).values())  # emu: bf16
    engine = Engine(store, EngineConfig(method=method, device="emu", device_budget=budget, host_budget=0,
                                        optimizer=OptimizerConfig("adamw", 1e-2)))  # every load a read
    pager, homes = engine.pager, []
    get = pager.get

    def watched(name):
        tensors = get(name)
        homes.extend(t.untyped_storage().data_ptr() for t in tensors.values())
        return tensors

    pager.get = watched
    try:
        for s in range(3):
            engine.train_step([random_batch(tiny_args, seed=s), random_batch(tiny_args, seed=10 + s)])
    finally:
        engine.close()
    slots, block = pager.slots, pager._size["block_00"]
    loads = sum(n for u, n in pager.stats.reads_by_unit.items() if u.startswith("block"))
    blocks_made = sum(1 for _, n in made if n == block)
    print(f"block slots made {blocks_made}, block loads {loads}, peak {peak[0]:,} of {budget:,} B, "
          f"waits {slots.waits}, overflows {slots.overflows}")
    assert homes and set(homes) <= {key for key, _ in made}  # every unit computed with was in a slot
    assert slots.overflows == 0
    assert 0 < peak[0] <= budget
    assert blocks_made < loads / 2  # reused


def test_a_slot_still_viewed_is_never_overwritten(tiny_store):
    """A unit's tensors held past its eviction (as a write-back holds them while it steps them)
    keep their values: the next unit does not go into that slot while anything views it. Past
    the wait it goes into a buffer of its own, counted as an overflow."""
    from blocktune.paging.pager import Pager, resident_sizes

    dev = resolve_device("emu")
    one = max(resident_sizes(tiny_store, torch.float32, device=dev).values())
    pager = Pager(tiny_store, dev, budget=one, mutable=False, host_budget=0)
    pager.slots.wait_s = 0.2
    try:
        pager.plan(["block_00", "block_01", "block_02"])
        held = pager.get("block_00")
        want = {k: v.clone() for k, v in held.items()}
        other = pager.get("block_01")  # block_00 is evicted, its tensors still held here
        assert all(torch.equal(held[k], want[k]) for k in want)
        assert pager.slots.overflows == 1
        assert not torch.equal(other["attention.wq.weight"], want["attention.wq.weight"])
        del held
        pager.get("block_02")  # block_00's slot is free of views now: used again
        assert pager.slots.overflows == 1 and pager.slots.made == 1
    finally:
        pager.close()


@pytest.mark.parametrize("units", [1, 2])
def test_a_forward_pass_lets_each_slot_go_before_the_next_unit(tmp_path, tiny_args, units):
    """Logits and the evaluation loss at one and two units: no module outlives its unit into
    the next get, so no load waits for a slot the computing thread itself still views."""
    from blocktune.paging.pager import resident_sizes

    store = make_store(tmp_path / "s", tiny_args, seed=3)
    tok, tgt = random_batch(tiny_args, 2, 12)
    want = Engine(store, EngineConfig(method="full", device="cpu")).logits(tok)
    budget = units * max(resident_sizes(store, torch.float32, device=resolve_device("emu")).values())
    engine = Engine(store, EngineConfig(method="lora", device="emu", device_budget=budget, host_budget=0,
                                        compute_dtype="fp32"))
    try:
        got = engine.logits(tok)
        engine.eval_loss(tok, tgt)
        slots = engine.pager.slots
        assert (slots.waits, slots.overflows) == (0, 0)
        assert torch.equal(got, want)
    finally:
        engine.close()


def test_fp32_store_under_bf16_compute_keeps_fp32_masters(tmp_path, tiny_args):
    """A full fine-tune of an fp32 store computed in bf16 (a GPU's default) steps fp32 masters
    with fp32 moments: 20 SGD updates, each far below half a bf16 ulp of the weights, move the
    stored weights as an fp32 run moves them (to bf16's gradient noise). Without masters the
    bf16 weights round every update away and the store holds the start rounded to bf16."""

    def moved(device, dtype):
        store = make_store(tmp_path / f"{device}-{dtype}", tiny_args, seed=1)  # fp32
        engine = Engine(store, EngineConfig(method="full", device=device, compute_dtype=dtype,
                                            device_budget=one_unit_budget(store),
                                            optimizer=OptimizerConfig("sgd", lr=1e-4)))
        batch = random_batch(tiny_args, 1, 8, seed=0)  # one batch: the updates point one way
        for _ in range(20):
            engine.train_step([batch])
        engine.close()
        st = BlockStore.open(store.path)
        return st.read_unit("block_00")["attention.wq.weight"] - start, st.read_state("block_00")

    start = make_store(tmp_path / "start", tiny_args, seed=1).read_unit("block_00")["attention.wq.weight"]
    want, _ = moved("cpu", "fp32")
    got, state = moved("emu", "bf16")
    err = (got - want).norm() / want.norm()
    print(f"bf16 compute vs fp32 compute: weight movement differs by {err:.3e} (relative)")
    # the masters are the stored fp32 weights: the state file holds the moments alone
    assert not any(k.startswith("master.") for k in state) and state
    assert want.abs().max() < 2 ** -9 * start.abs().max()  # the updates are below a bf16 ulp
    assert err < 0.05
