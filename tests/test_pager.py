"""Reading ahead by bytes: the pager loads the planned units that are not resident, as many as
its budget holds, and never evicts a unit that is needed before the one it loads."""

import subprocess
import sys

import pytest
import torch
from blocktune import Engine, EngineConfig
from blocktune.machine.devices import resolve_device
from blocktune.paging.pager import Pager, resident_sizes
from conftest import random_batch
from test_equivalence import one_unit_budget

B0, B1, B2, B3 = "block_00", "block_01", "block_02", "block_03"


def _pager(store, blocks: int, device: str = "cpu") -> Pager:
    dev = resolve_device(device)
    block = resident_sizes(store, torch.float32, device=dev)[B0]
    return Pager(store, dev, budget=blocks * block, mutable=False)


@pytest.mark.parametrize("device", ["cpu", "emu"])
def test_reads_ahead_as_many_units_as_the_budget_holds(tiny_store, device):
    pager = _pager(tiny_store, 3, device)
    try:
        pager.plan([B0, B1, B2, B3])
        assert pager.held == {B0, B1, B2}  # three ahead, not one
        pager.get(B0)
        # block_03 would need block_01's or block_02's room, and both are needed before it
        assert pager.held == {B0, B1, B2}
        pager.get(B1)
        assert pager.held == {B1, B2, B3}  # block_00 is done: its room goes to block_03
        pager.get(B2)
        pager.get(B3)
        assert pager.stats.demand_reads == 0
        assert pager.stats.unit_reads == 4
        assert pager.stats.peak_resident <= pager.budget
    finally:
        pager.close()


def test_the_turn_into_the_backward_is_read_ahead(tiny_store):
    """Forward then backward over four blocks, three resident (a pipeline stage without the
    head turns so): the backward's first missing unit is loaded as soon as a unit that is not
    needed again can make room — at block_02, not at block_01 as one unit ahead would."""
    pager = _pager(tiny_store, 3)
    try:
        pager.plan([B0, B1, B2, B3, B3, B2, B1, B0])
        for name in (B0, B1, B2, B3, B3):
            pager.get(name)
        assert B0 not in pager.held
        pager.get(B2)
        assert pager.held == {B2, B1, B0}  # block_03 (done) made room for block_00
        pager.get(B1)
        pager.get(B0)
        assert pager.stats.unit_reads == 5  # the least a 3-unit budget allows (Belady)
        assert pager.stats.demand_reads == 0
    finally:
        pager.close()


def test_an_unplanned_get_and_close_do_not_hang_where_only_the_compute_copies(tiny_store):
    """emu-mps: loads read ahead land in staging slots that only a get frees. A get off the
    plan, and a close with loads never asked for, must not wait for one another. (In a fresh
    interpreter, whose main thread is the computing one, so that a deadlock fails the test.)"""
    script = f"""
import torch
from blocktune.machine.devices import resolve_device
from blocktune.paging.pager import Pager, resident_sizes
from blocktune.store.store import BlockStore
store = BlockStore.open({str(tiny_store.path)!r})
sizes = resident_sizes(store, torch.float32, device=resolve_device("emu-mps"))
blocks = ["block_00", "block_01", "block_02", "block_03"]
def fresh():  # room for the four blocks and the head
    return Pager(store, resolve_device("emu-mps"), budget=4 * sizes["block_00"] + sizes["head"], mutable=False)
pager = fresh(); pager.plan(blocks); pager.get("head"); pager.close()  # a get off the plan
pager = fresh(); pager.plan(blocks); pager.get("block_02"); pager.close()  # out of the plan's order
pager = fresh(); pager.plan(blocks); pager.close()  # loads read ahead and never got
print("closed")
"""
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the pager deadlocked")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "closed"


@pytest.mark.parametrize("device", ["cpu", "emu"])
@pytest.mark.parametrize("units", [2, 3])
def test_lora_steps_wait_for_no_unit_after_the_first(tiny_store, tiny_args, device, units):
    """Every unit of a LoRA step, the next step's embeddings included, is read ahead: from the
    second step on none is read only when asked for."""
    cfg = EngineConfig(method="lora", device=device, device_budget=units * one_unit_budget(tiny_store))
    engine = Engine(tiny_store, cfg)
    results, ahead = [], []
    try:
        for s in range(3):
            results.append(engine.train_step([random_batch(tiny_args, 2, 16, seed=s)], lr=1e-3, step=s))
            ahead.append("embed" in engine.pager.held)  # the next step's first unit, read in this one
    finally:
        engine.close()
    assert ahead == [True] * 3
    assert [r.demand_reads for r in results[1:]] == [0, 0]
    assert results[0].demand_reads <= 1  # at most the very first unit: nothing was planned before it
    assert engine.pager.stats.peak_resident <= engine.pager.budget


def test_a_one_unit_budget_still_reads_the_next_file_ahead(tmp_path, tiny_args):
    """bf16 store, fp32 compute, direct reads, room for one unit: the next unit's file is read
    during this unit's compute (outside the budget, as raw bytes) and converted at its turn."""
    from blocktune_bench.synthetic import make_store

    store = make_store(tmp_path / "s", tiny_args, seed=1, dtype=torch.bfloat16)
    one = max(resident_sizes(store, torch.float32).values())  # the head's: one block fits, two do not
    pager = Pager(store, resolve_device("cpu"), budget=one, mutable=False, frozen_reads="direct")
    try:
        pager.plan([B0, B1, B2, B3])
        seen = []
        for name in (B0, B1, B2, B3):
            got = pager.get(name)
            seen.append((set(pager.held), pager.raw_ahead))
            assert all(t.dtype == torch.float32 for t in got.values())
        assert seen == [({B0}, B1), ({B1}, B2), ({B2}, B3), ({B3}, None)]
        assert pager.stats.demand_reads == 0 and pager.stats.unit_reads == 4
        assert pager.stats.staged_reads == 3
        assert pager.stats.peak_resident <= pager.budget
    finally:
        pager.close()


def test_with_room_for_one_unit_the_converted_units_files_are_read_into_one_buffer(tmp_path, tiny_args):
    """bf16 store, fp32 compute on the CPU, room for one unit, direct reads: the blocks' files
    (converted into the slot, their buffer free again at once) are all read into one buffer, not
    a fresh one each (its 4 KiB pages faulted in and pinned for direct IO on every read: 8 s of
    kernel time a step for the 7B shape under 2 GiB); a unit kept as stored (the head: its
    tensors are views of the buffer it was read into) reads into its own."""
    from blocktune_bench.synthetic import make_store

    store = make_store(tmp_path / "s", tiny_args, seed=1, dtype=torch.bfloat16)
    one = max(resident_sizes(store, torch.float32, frozenset({"head"})).values())
    pager = Pager(store, resolve_device("cpu"), budget=one, mutable=False, frozen_reads="direct",
                  as_stored=frozenset({"head"}))
    try:
        order = [B0, B1, B2, B3, "head", B3, B2, B1, B0]
        pager.plan(order)
        head = None
        for name in order:
            got = pager.get(name)
            if name == "head":
                head = got["output.weight"].untyped_storage().data_ptr()
            del got
        assert not pager.holds_two_units and pager.loader._pool.allocated == 1  # eight block reads, one buffer
        assert head is not None and all(head != b.untyped_storage().data_ptr() for b, _ in pager.loader._pool._bufs)
    finally:
        pager.close()


def test_a_converted_unit_goes_into_the_memory_the_last_one_left(tmp_path, tiny_args):
    """bf16 store, fp32 compute on the CPU, room for one unit: each block is converted into the
    slot the block before it left (a fresh fp32 allocation costs a page fault per 4 KiB: 0.27 s
    against 0.06 s for a 7B block), and a unit held as stored (the engine widens it at use)
    makes the idle slot go, so the slots and what is held beside them stay within the budget."""
    from blocktune_bench.synthetic import make_store

    store = make_store(tmp_path / "s", tiny_args, seed=1, dtype=torch.bfloat16)
    one = max(resident_sizes(store, torch.float32, frozenset({"head"})).values())  # a block: two do not fit
    pager = Pager(store, resolve_device("cpu"), budget=one, mutable=False, frozen_reads="direct",
                  as_stored=frozenset({"head"}))
    try:
        pager.plan([B0, B1, B2, "head", B3])
        where, held = [], []
        for name in (B0, B1, B2, "head", B3):
            got = pager.get(name)
            if name != "head":
                assert torch.equal(got["attention.wq.weight"], store.read_unit(name)["attention.wq.weight"].float())
                where.append(got["attention.wq.weight"].data_ptr())
            else:
                assert got["output.weight"].dtype == torch.bfloat16
                held.append(pager.slots.bytes)
            del got
        assert len(set(where[:3])) == 1  # one block's memory, used three times
        assert held == [0]  # the idle block slot went when the head came in
        assert pager.slots.made == 2 and pager.slots.overflows == 0  # the block slot, again after the head
    finally:
        pager.close()


def test_converting_a_file_read_ahead_waits_for_a_held_slot_as_a_demand_load(tmp_path, tiny_args):
    """The computing thread converts the file read ahead into a slot and waits for it: where the
    caller still views the last unit, the slot is waited for briefly (DEMAND_WAIT_S), then a
    buffer outside the slots is taken, not the slots' own wait (here 120 s)."""
    import threading

    from blocktune_bench.synthetic import make_store

    store = make_store(tmp_path / "s", tiny_args, seed=1, dtype=torch.bfloat16)
    one = max(resident_sizes(store, torch.float32).values())
    pager = Pager(store, resolve_device("cpu"), budget=one, mutable=False, frozen_reads="direct")
    pager.slots.wait_s = 120.0
    try:
        pager.plan([B0, B1])
        held = pager.get(B0)  # still viewed here
        got = threading.Thread(target=pager.get, args=(B1,), daemon=True)
        got.start()
        got.join(30)
        assert not got.is_alive(), "the get waited the slots' own wait, not a demand load's"
        assert pager.stats.staged_reads == 1 and pager.slots.overflows == 1
        del held
    finally:
        pager.close()


def test_without_a_view_count_converted_units_take_fresh_memory(tmp_path, tiny_args, monkeypatch):
    """A torch that does not count a storage's views (CPU builds before 2.8) could never see a
    slot come free: converted units then take fresh memory, as before slots, and never wait."""
    from blocktune_bench.synthetic import make_store

    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    store = make_store(tmp_path / "s", tiny_args, seed=1, dtype=torch.bfloat16)
    one = max(resident_sizes(store, torch.float32).values())
    pager = Pager(store, resolve_device("cpu"), budget=one, mutable=False, frozen_reads="direct")
    try:
        assert pager.slots is None
        pager.plan([B0, B1, B2])
        for name in (B0, B1, B2):
            got = pager.get(name)
            assert torch.equal(got["attention.wq.weight"], store.read_unit(name)["attention.wq.weight"].float())
            del got
        assert pager.stats.staged_reads == 2
    finally:
        pager.close()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_reading_ahead_changes_no_number(tmp_path, tiny_args, method):
    """A one-unit budget on a bf16 store computed in fp32 (the file read ahead, converted at
    its turn) gives bit for bit the step of the same engine without any read ahead."""
    import shutil

    from blocktune_bench.synthetic import make_store

    base = make_store(tmp_path / "s", tiny_args.with_dropout(0.1), seed=1, dtype=torch.bfloat16)
    out = []
    for prefetch in (True, False):
        path = tmp_path / f"run-{prefetch}"
        shutil.copytree(base.path, path)
        from blocktune.store.store import BlockStore

        store = BlockStore.open(path)
        unit = max(resident_sizes(store, torch.float32).values())  # one block fits, two do not
        engine = Engine(store, EngineConfig(method=method, device="cpu", device_budget=unit, prefetch=prefetch,
                                            frozen_reads="direct"))
        try:
            losses = [engine.train_step([random_batch(tiny_args, 2, 16, seed=s)], lr=1e-3, step=s).loss
                      for s in range(3)]
            staged = engine.pager.stats.staged_reads
            weights = engine.adapter_state() if method == "lora" else store.read_unit(B1)
        finally:
            engine.close()
        out.append((losses, weights, staged))
    (l1, w1, staged), (l0, w0, _) = out
    assert staged >= 3 * (tiny_args.n_layers - 1)  # the read ahead did happen, every step
    assert l1 == l0
    assert w1.keys() == w0.keys() and all(torch.equal(w1[k], w0[k]) for k in w1)


def test_a_cpu_slot_is_a_huge_page_buffer():
    """A converted unit's slot on the CPU starts on a 2 MiB boundary with huge pages asked for:
    a 7B block's slot, made again after the head and the embeddings every step, faulted 197k
    times in 4 KiB pages (0.2-0.3 s each time)."""
    from blocktune.paging.slots import DeviceSlots
    from blocktune.store.fileio import HUGE_PAGE

    slots = DeviceSlots(resolve_device("cpu"), cap=64 << 20)
    slot = slots.take(5 << 20)
    assert slot.buf.data_ptr() % HUGE_PAGE == 0
    assert slot.unviewed()  # a view of a larger buffer, yet free as made
    views = slot.views({"w": (0, torch.float32, (1024, 1024))})
    assert not slot.unviewed()
    del views
    slots.give(slot, None)
    assert slots.take(5 << 20) is slot and slots.made == 1


def _narrowed(path) -> list:
    return [p.name for p in path.iterdir() if p.name.startswith(".narrowed")]


def test_a_wider_store_computed_narrower_is_read_from_a_copy_narrowed_once(tmp_path, tiny_args):
    """LoRA on the CPU, an fp32 store computed in bf16, its units paged: the engine reads a bf16
    copy of the store made once beside it (half the bytes a pass, no conversion at each read),
    and the steps are those of reading the fp32 files, bit for bit (dropout's RNG included).
    The copy is gone after `close`, and one that a killed process left is removed."""
    from blocktune.store.store import BlockStore
    from blocktune_bench.synthetic import make_store

    path = make_store(tmp_path / "s", tiny_args.with_dropout(0.1), seed=1).path  # fp32
    (path / ".narrowed.partial-4194305-left").mkdir()  # a pid past Linux's largest: its maker is gone
    with BlockStore.open(path) as store:
        assert any("narrowed copy of this store that a killed run left" in n for n in store.leftovers())
    out = {}
    for narrow in (True, False):
        store = BlockStore.open(path)
        unit = max(resident_sizes(store, torch.bfloat16).values()) * 3 // 2  # one unit fits, two do not
        engine = Engine(store, EngineConfig(method="lora", device="cpu", compute_dtype="bf16", device_budget=unit,
                                            frozen_reads="direct", narrow_frozen=narrow))
        try:
            assert (engine.narrow_note is not None) == narrow
            assert len(_narrowed(path)) == (1 if narrow else 0)  # the left one removed, its own made
            losses = [engine.train_step([random_batch(tiny_args, 2, 16, seed=s)], lr=1e-3, step=s).loss
                      for s in range(3)]
            read, adapters = engine.pager.stats.bytes_read, engine.adapter_state()
        finally:
            engine.close()
            store.close()
        assert _narrowed(path) == []
        out[narrow] = losses, adapters, read
    (l1, a1, r1), (l0, a0, r0) = out[True], out[False]
    assert l1 == l0
    assert a1.keys() == a0.keys() and all(torch.equal(a1[k], a0[k]) for k in a1)
    assert r1 == pytest.approx(r0 / 2, rel=0.05)  # the same reads, of half the bytes


def test_a_full_fine_tune_reads_a_narrowed_copy_its_steps_keep_up_to_date(tmp_path, tiny_args):
    """A full fine-tune on the CPU, an fp32 store computed in bf16, its units paged: the units are
    read from a bf16 copy beside the store, and each step writes its new weights there too,
    committed with the store's step. The steps are those of reading and converting the fp32
    files, bit for bit: losses, the store's weights (the fp32 masters) and optimizer state, and
    the copy's units are the store's rounded to bf16 after every step. The forward reads half
    the bytes. The copy is gone after `close`; a budget of under four units makes none."""
    from blocktune.engine.engine import NARROW_STEPS_UNITS
    from blocktune.engine.optim import OptimizerConfig
    from blocktune.store.store import BlockStore
    from blocktune_bench.synthetic import make_store

    out = {}
    for narrow in (True, False):
        path = make_store(tmp_path / f"s{narrow}", tiny_args.with_dropout(0.1), seed=1).path  # fp32
        store = BlockStore.open(path)
        unit = max(resident_sizes(store, torch.bfloat16).values())
        engine = Engine(store, EngineConfig(method="full", device="cpu", compute_dtype="bf16",
                                            device_budget=NARROW_STEPS_UNITS * unit + unit // 2,  # not all 6
                                            optimizer=OptimizerConfig("adamw", 1e-3), narrow_steps=narrow))
        try:
            assert engine.pager.budget < sum(resident_sizes(store, torch.bfloat16).values())
            assert (engine.narrow_note is not None) == narrow
            assert len(_narrowed(path)) == (1 if narrow else 0)
            losses, reads = [], []
            for s in range(3):
                res = engine.train_step([random_batch(tiny_args, 2, 16, seed=s)], lr=1e-3, step=s)
                losses.append(res.loss)
                reads.append(res.bytes_read)
                if narrow:  # the copy holds this step's weights, as the compute rounds them
                    copy = engine.pager.store
                    assert copy is not store and copy.step == store.step == s + 1
                    for u in store.units:
                        want = {k: v.to(torch.bfloat16) for k, v in store.read_unit(u).items()
                                if not (u == "head" and store.tied and k == "output.weight")}
                        got = copy.read_unit(u)
                        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), u
            weights = {u: store.read_unit(u) for u in store.units}
            state = {u: store.read_state(u) for u in store.units}
        finally:
            engine.close()
            store.close()
        assert _narrowed(path) == []
        out[narrow] = losses, weights, state, reads
    (l1, w1, s1, r1), (l0, w0, s0, r0) = out[True], out[False]
    assert l1 == l0
    for u in w0:
        assert all(torch.equal(w1[u][k], w0[u][k]) for k in w0[u]), u
        assert s1[u].keys() == s0[u].keys() and all(torch.equal(s1[u][k], s0[u][k]) for k in s0[u]), u
    assert all(a < b for a, b in zip(r1, r0))  # the units' reads are of half the bytes

    # a budget of under four units: the units are read from the store and converted
    path = make_store(tmp_path / "small", tiny_args, seed=1).path
    with BlockStore.open(path) as store:
        unit = max(resident_sizes(store, torch.bfloat16).values())
        engine = Engine(store, EngineConfig(method="full", device="cpu", compute_dtype="bf16",
                                            device_budget=(NARROW_STEPS_UNITS - 1) * unit, narrow_steps=True))
        try:
            assert engine.narrow_note is None and _narrowed(path) == [] and engine.pager.store is store
        finally:
            engine.close()


def test_a_budget_that_holds_the_store_but_not_its_narrowed_copy_keeps_the_store(tmp_path, tiny_args):
    """The narrowed copy's files carry their own headers, so its largest unit can be a few bytes
    over the fp32 store's resident size: a device budget set to exactly the latter runs, from the
    store as it is, says why, and leaves no copy behind."""
    from blocktune.store.store import BlockStore
    from blocktune_bench.synthetic import make_store

    path = make_store(tmp_path / "s", tiny_args, seed=1).path  # fp32
    copy = make_store(tmp_path / "b", tiny_args, seed=1, dtype=torch.bfloat16)  # what the narrowed copy will be
    narrowed = max(resident_sizes(copy, torch.bfloat16).values())
    with BlockStore.open(path) as store:
        budget = max(resident_sizes(store, torch.bfloat16).values())
        assert budget < narrowed  # the case this test is about
        engine = Engine(store, EngineConfig(method="lora", device="cpu", compute_dtype="bf16", device_budget=budget,
                                            frozen_reads="direct", narrow_frozen=True))
        try:
            assert "is over the device budget" in engine.narrow_note
            assert engine.store is store and _narrowed(path) == []
            engine.train_step([random_batch(tiny_args, 2, 16, seed=0)], lr=1e-3, step=0)
        finally:
            engine.close()
