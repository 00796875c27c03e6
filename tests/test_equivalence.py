"""Invariant 1 and 2: a paged step equals plain in-memory autograd, dropout on, RNG replayed."""

import contextlib
import tempfile
from pathlib import Path

import pytest
import torch
from blocktune import Engine, EngineConfig, LoraConfig, ModelArgs, OptimizerConfig
from blocktune.model.units import unit_prefix
from blocktune.paging.loader import resident_sizes
from blocktune.store.store import BlockStore
from blocktune_bench.reference import ReferenceTrainer, trained_tensors
from blocktune_bench.synthetic import make_store
from conftest import random_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TOL = 1e-6
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item() or 1.0
    return (a.double() - b.double()).abs().max().item() / scale


def one_unit_budget(store: BlockStore) -> int:
    return max(store.unit_bytes(u) for u in store.units)


def run_pair(store, method, opt, steps=3, micro=1, budget=None, replay=True, seed=0, lr=1e-2,
             device="cpu", host_budget=None, keep_budget=0, dtype="fp32"):
    # SGD moves each weight by its gradient, so it shows gradients to rounding: the loss is cut
    # into chunks of 7 positions to test the chunked cross-entropy too. AdamW's first steps move
    # each weight by about ±lr whatever the gradient's size, which turns last-bit differences in
    # near-zero gradients into lr-sized ones; for AdamW the head's matmul sees the same rows as
    # the reference's (one chunk per micro-batch), so the arithmetic is the same.
    chunk = 7 if opt == "sgd" else 4096
    ocfg = OptimizerConfig(opt, lr=lr, weight_decay=0.01)
    cfg = EngineConfig(method=method, lora=LORA, optimizer=ocfg, device=device, host_budget=host_budget,
                       device_budget=budget, replay_rng=replay, seed=seed, loss_chunk=chunk,
                       keep_budget=keep_budget, compute_dtype=dtype)
    engine = Engine(store, cfg)
    ref = ReferenceTrainer(store, method, LORA, ocfg, seed=seed, dtype=engine.dtype)
    losses = []
    for s in range(steps):
        mbs = [random_batch(store.args, 2, 12, seed=100 * s + m) for m in range(micro)]
        got = engine.train_step(mbs)
        want = ref.train_step(mbs)
        losses.append((got.loss, want))
    return engine, ref, losses


def assert_matches(store_path, engine, ref, method, losses, tol=TOL):
    for got, want in losses:
        print(f"loss paged {got:.9f} reference {want:.9f}")
        assert abs(got - want) <= tol * abs(want)
    if method == "lora":
        mine, theirs = engine.adapter_state(), ref.adapter_state()
        assert set(mine) == set(theirs)
        worst = max(rel_err(mine[k], theirs[k]) for k in theirs)
        print(f"adapters: worst relative error {worst:.2e}")
        assert worst <= tol
        ref_state = ref.optimizer_state()
        opt = engine.lora_optimizer
        names = {id(p): n for n, p in zip(mine, engine.adapter_params())}
        for p, s in opt.state.items():
            for k in ("exp_avg", "exp_avg_sq"):
                assert rel_err(s[k], ref_state[names[id(p)]][k]) <= tol
        return
    engine.close()
    store = BlockStore.open(store_path)
    assert store.step == len(losses)
    worst = 0.0
    compared = 0  # optimizer states compared: AdamW has two per parameter, SGD none
    ref_opt = ref.optimizer_state()
    for unit in store.units:
        weights = store.read_unit(unit)
        for k, w in ref.unit_state(unit).items():
            worst = max(worst, rel_err(weights[k], w))
        state = store.read_state(unit)
        prefix = unit_prefix(unit) or f"{unit}."
        for k in weights:
            ref_s = ref_opt.get(prefix + k, {})
            for name in ("exp_avg", "exp_avg_sq"):
                if name in ref_s:
                    worst = max(worst, rel_err(state[f"{name}.{k}"], ref_s[name]))
                    compared += 1
    print(f"weights and optimizer state: worst relative error {worst:.2e}")
    assert worst <= tol
    if "exp_avg" in next(iter(ref_opt.values()), {}):  # AdamW: every parameter's moments were there to compare
        assert compared == 2 * len(ref_opt)


@pytest.mark.parametrize("method,opt", [("full", "sgd"), ("full", "adamw"), ("lora", "adamw")])
@pytest.mark.parametrize("micro", [1, 4])
def test_paged_equals_reference(tmp_path, tiny_args, method, opt, micro):
    store = make_store(tmp_path / "s", tiny_args.with_dropout(0.1), seed=3)
    engine, ref, losses = run_pair(store, method, opt, micro=micro, budget=one_unit_budget(store))
    assert_matches(store.path, engine, ref, method, losses)
    assert engine.pager.stats.peak_resident <= one_unit_budget(store)


def test_first_forward_is_bitwise(tiny_store):
    from blocktune_bench.reference import ReferenceTrainer

    tok, _ = random_batch(tiny_store.args, 2, 16)
    engine = Engine(tiny_store, EngineConfig(method="full", device="cpu",
                                             device_budget=one_unit_budget(tiny_store)))
    ref = ReferenceTrainer(tiny_store, "full")
    assert torch.equal(engine.logits(tok), ref.logits(tok))


def test_replay_off_breaks_equivalence(tmp_path, tiny_args):
    """The equivalence test can fail: without the RNG replay the recompute draws other masks."""
    store = make_store(tmp_path / "s", tiny_args.with_dropout(0.1), seed=3)
    engine, ref, losses = run_pair(store, "full", "sgd", steps=2, replay=False)
    engine.close()
    weights = BlockStore.open(store.path).read_unit("block_01")
    err = max(rel_err(weights[k], v) for k, v in ref.unit_state("block_01").items())
    print(f"without replay: relative error {err:.2e}")
    assert err > 1e-4


def test_eval_mode_ignores_dropout(tmp_path, tiny_args):
    with_dropout = make_store(tmp_path / "a", tiny_args.with_dropout(0.1), seed=2)
    without = make_store(tmp_path / "b", tiny_args, seed=2)
    tok, tgt = random_batch(tiny_args, 2, 16)
    a = Engine(with_dropout, EngineConfig(method="full", device="cpu"))
    b = Engine(without, EngineConfig(method="full", device="cpu"))
    assert torch.equal(a.logits(tok), b.logits(tok))
    assert a.eval_loss(tok, tgt) == b.eval_loss(tok, tgt)


@pytest.mark.parametrize("micro", [1, 4])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_bytes_read_per_step_is_predicted(tmp_path, tiny_args, micro, method):
    store = make_store(tmp_path / "s", tiny_args, seed=1)
    budget = one_unit_budget(store)
    engine = Engine(store, EngineConfig(method=method, lora=LORA, device="cpu", device_budget=budget,
                                        optimizer=OptimizerConfig("adamw", 1e-3)))
    all_units = sum(store.unit_bytes(u) for u in store.units)
    blocks = sum(store.unit_bytes(u) for u in store.units[1:-1])
    for step in range(2):
        res = engine.train_step([random_batch(tiny_args, 1, 8, seed=m) for m in range(micro)])
        # forward reads every unit; the head is still resident at the turn; the backward re-reads
        # the blocks (and, for a full fine-tune, the embeddings) once, whatever the accumulation
        predicted = all_units + blocks
        if method == "full":
            predicted += store.unit_bytes("embed")
            if step > 0:  # optimizer state from the previous step, read beside each unit;
                # the embeddings, last in the backward, are still resident for the next forward
                predicted += sum(engine.store.state_record(u).nbytes for u in store.units)
                predicted -= store.unit_bytes("embed")
        print(f"{method} micro={micro} step {step}: read {res.bytes_read} predicted {predicted}")
        assert res.bytes_read == predicted
        assert engine.pager.stats.peak_resident <= budget
    engine.close()


def test_bytes_read_count_the_masters_read_for_the_step(tmp_path, tiny_args):
    """An fp32 store computed in bf16: the masters are the stored weights, and each unit's
    optimizer step reads its file again (the pager's copy was narrowed): those bytes count."""
    store = make_store(tmp_path / "s", tiny_args, seed=1)
    budget = max(resident_sizes(store, torch.bfloat16).values())  # one unit, as it computes
    engine = Engine(store, EngineConfig(method="full", device="cpu", device_budget=budget, compute_dtype="bf16",
                                        optimizer=OptimizerConfig("adamw", 1e-3)))
    all_units = sum(store.unit_bytes(u) for u in store.units)
    blocks = sum(store.unit_bytes(u) for u in store.units[1:-1])
    for step in range(2):
        res = engine.train_step([random_batch(tiny_args, 1, 8)])
        # as `test_bytes_read_per_step_is_predicted`, and each unit's file again for its masters
        predicted = all_units + blocks + store.unit_bytes("embed") + all_units
        if step > 0:
            predicted += sum(engine.store.state_record(u).nbytes for u in store.units) - store.unit_bytes("embed")
        print(f"step {step}: read {res.bytes_read} predicted {predicted}")
        assert res.bytes_read == predicted
    engine.close()


def test_all_resident_reads_once(tiny_store):
    engine = Engine(tiny_store, EngineConfig(method="lora", lora=LORA, device="cpu"))
    first = engine.train_step([random_batch(tiny_store.args)])
    second = engine.train_step([random_batch(tiny_store.args)])
    assert first.bytes_read == tiny_store.total_bytes()
    assert second.bytes_read == 0


def test_bf16_storage_keeps_small_updates(tmp_path, tiny_args):
    """bf16 weights with fp32 masters: 20 updates, each below half a bf16 ulp of most weights,
    add up; the control, the same steps without masters, rounds each away. One unit resident,
    so every step reads the units back from their bf16 files (a unit that stayed resident in
    fp32 would accumulate like a master)."""

    def run(name, master):
        store = make_store(tmp_path / name, tiny_args, seed=1, dtype=torch.bfloat16)
        one_unit = 2 * max(store.unit_bytes(u) for u in store.units)  # one unit widened to fp32
        engine = Engine(store, EngineConfig(method="full", device="cpu", device_budget=one_unit,
                                            optimizer=OptimizerConfig("sgd", lr=1e-4, master_dtype=master)))
        batch = random_batch(tiny_args, 1, 8, seed=0)  # one batch: the updates point one way
        for _ in range(20):
            engine.train_step([batch])
        engine.close()
        return BlockStore.open(store.path)

    before = make_store(tmp_path / "start", tiny_args, seed=1, dtype=torch.bfloat16).read_unit("block_00")[
        "attention.wq.weight"].float()
    kept = run("masters", "fp32")
    master = kept.read_state("block_00")["master.attention.wq.weight"]
    after = kept.read_unit("block_00")["attention.wq.weight"]
    assert torch.equal(after, master.to(torch.bfloat16))  # the stored weight is the master rounded
    lost = run("plain", None).read_unit("block_00")["attention.wq.weight"].float()
    changed, control = (after.float() != before).sum().item(), (lost != before).sum().item()
    print(f"bf16 elements changed after 20 small steps: {changed} with masters, {control} without")
    assert changed > 4 * control and changed > 20


@st.composite
def shapes(draw):
    n_heads = draw(st.sampled_from([1, 2, 4]))
    n_kv = draw(st.sampled_from([d for d in (1, 2, 4) if n_heads % d == 0]))
    head_dim = draw(st.sampled_from([4, 8]))
    args = ModelArgs(dim=n_heads * head_dim, n_layers=draw(st.integers(1, 3)), n_heads=n_heads,
                     n_kv_heads=n_kv if n_kv != n_heads else None, vocab_size=draw(st.sampled_from([32, 61])),
                     multiple_of=draw(st.sampled_from([4, 16])), max_seq_len=32,
                     ffn_dim_multiplier=draw(st.sampled_from([None, 1.3]))).with_dropout(0.1)
    return args, draw(st.integers(1, 2)), draw(st.integers(2, 9)), draw(st.integers(1, 4)), \
        draw(st.floats(0.0, 1.0)), draw(st.sampled_from(["lora", "full"]))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes())
def test_property_paged_gradients_equal_reference(case):
    """Over shapes and budgets (one unit up to all), one SGD step at lr=1 moves every trained
    tensor by exactly its gradient: paged and reference must agree."""
    args, batch, seq, rank, frac, method = case
    lora = LoraConfig(rank=rank, alpha=2.0 * rank, dropout=0.1, targets=("wq", "wv", "w2"))
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "s", args, seed=5)
        sizes = [store.unit_bytes(u) for u in store.units]
        budget = int(max(sizes) + frac * (sum(sizes) - max(sizes)))
        ocfg = OptimizerConfig("sgd", lr=1.0)
        engine = Engine(store, EngineConfig(method=method, lora=lora, optimizer=ocfg, device="cpu",
                                            device_budget=budget, loss_chunk=5))
        ref = ReferenceTrainer(store, method, lora, ocfg)
        g = torch.Generator().manual_seed(seq)
        tok = torch.randint(0, args.vocab_size, (batch, seq + 1), generator=g)
        mb = [(tok[:, :-1], tok[:, 1:])]
        got, want = engine.train_step(mb).loss, ref.train_step(mb)
        assert abs(got - want) <= TOL * abs(want)
        assert engine.pager.stats.peak_resident <= budget
        if method == "lora":
            mine, theirs = engine.adapter_state(), ref.adapter_state()
            assert max(rel_err(mine[k], theirs[k]) for k in theirs) <= 1e-5
        else:
            engine.close()
            reopened = BlockStore.open(store.path)
            for unit in reopened.units:
                w = reopened.read_unit(unit)
                for k, v in ref.unit_state(unit).items():
                    assert rel_err(w[k], v) <= 1e-5, (unit, k)


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("keep_budget", [None, 1])
def test_kept_activations_equal_recompute(tmp_path, tiny_args, keep_budget, method):
    """Activations kept from the first forward (all units, or only the first one the budget
    admits) give what the recompute gives; the kept graph holds handles, not weights (full
    fine-tune: its parameters point at placeholders until their backward), so the one-unit
    budget still holds."""
    args = tiny_args.replace(n_layers=8)
    results, held = [], []
    for keep in (0, keep_budget):
        store = make_store(tmp_path / f"s{keep}", args.with_dropout(0.1), seed=3)
        budget = one_unit_budget(store)
        engine = Engine(store, EngineConfig(method=method, lora=LORA, device="cpu", device_budget=budget,
                                            keep_budget=keep, optimizer=OptimizerConfig("adamw", 1e-2)))
        steps = [engine.train_step([random_batch(args, 2, 12, seed=10 * s + m) for m in range(2)])
                 for s in range(3)]
        losses = [r.loss for r in steps]
        assert steps[0].kept_units == {0: 0, None: args.n_layers, 1: 1}[keep]
        held.append(engine.pager.buffers_in_use_peak)
        assert engine.pager.stats.peak_resident <= budget
        trained = trained_tensors(engine)
        results.append((losses, trained))
    (l0, a0), (l1, a1) = results
    print(f"recompute {l0}\nkept      {l1}\nread buffers held at once {held}")
    assert (method == "lora" or 0 < held[0]) and held[1] <= held[0] + 3  # full: were the kept graphs pinning units, that would be 8 more
    assert all(abs(x - y) <= TOL * abs(x) for x, y in zip(l0, l1))
    assert max(rel_err(a1[k], a0[k]) for k in a0) <= TOL


@pytest.mark.parametrize("method,opt", [("full", "sgd"), ("lora", "adamw")])
def test_family_fields_paged_equals_reference(tmp_path, method, opt):
    """The families' fields (q/k/v biases, q/k norms, an explicit head_dim, tied embeddings,
    llama3 RoPE scaling) through the paged engine with dropout, against the in-memory model:
    one unit resident, every unit recomputed."""
    from blocktune.model.args import ModelArgs

    args = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_dim=160, max_seq_len=256,
                     explicit_head_dim=24, qkv_bias=True, qk_norm=True, tie_embeddings=True, family="qwen3",
                     rope_theta=5e5, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    store = make_store(tmp_path / "s", args.with_dropout(0.1), seed=3)
    engine, ref, losses = run_pair(store, method, opt, budget=one_unit_budget(store))
    assert_matches(store.path, engine, ref, method, losses)


def test_state_in_pieces_equals_reference(tmp_path, tiny_args, monkeypatch):
    """A full fine-tune's optimizer state is stepped and stored a piece at a time: with pieces
    of 64 elements (every tensor but the norms cut; a multiple of the vector width, as the
    real size is) three AdamW steps equal torch.optim's over the whole model, and the state
    files hold the pieces. (Cut at 37, the fused kernel's scalar tails round some moments an
    ulp apart, and AdamW's first steps carry that to 2.6e-6.)"""
    import blocktune.engine.optim

    monkeypatch.setattr(blocktune.engine.optim, "STATE_PIECE", 64)
    store = make_store(tmp_path / "s", tiny_args.with_dropout(0.1), seed=3)
    engine, ref, losses = run_pair(store, "full", "adamw", budget=one_unit_budget(store))
    assert_matches(store.path, engine, ref, "full", losses)
    stored = BlockStore.open(store.path)
    rec = stored.state_record("block_00")
    pieces = stored.read_file(rec)
    wq = stored.read_unit("block_00")["attention.wq.weight"].numel()
    assert sum(k.startswith("exp_avg.attention.wq.weight#") for k in pieces) == -(-wq // 64) > 1


@pytest.mark.parametrize("dtype,compute", [(torch.float32, "fp32"), (torch.bfloat16, "fp32"), (torch.float32, "bf16")])
def test_state_kept_in_ram_equals_state_read_back(tmp_path, tiny_args, dtype, compute):
    """Where `auto` leaves room, a full fine-tune keeps each unit's optimizer state in RAM between
    steps and steps it there in place, instead of reading its file back: after four AdamW steps
    the store's weights and state files are bit for bit those of the same run reading the state
    back, and no state file is read after the first step. A bf16 store keeps fp32 masters in its
    state, made from the stored weights on the first step; an fp32 store computed in bf16 keeps
    its masters in RAM, and on disk only as the unit file (which is them): its state files hold
    the moments alone, and a step that reads its state back reads the masters from the unit file."""

    def run(name, in_ram):
        store = make_store(tmp_path / name, tiny_args.with_dropout(0.1), seed=3, dtype=dtype)
        engine = Engine(store, EngineConfig(method="full", device="cpu", device_budget="auto", keep_budget="auto",
                                            compute_dtype=compute, optimizer=OptimizerConfig("adamw", lr=1e-2, weight_decay=0.01)))
        assert engine.budgets.state > 0  # the tiny model's state fits anywhere
        if not in_ram:
            engine.pager.writes.in_ram.budget = 0
        mapped: list[list[str]] = []  # the units whose state file each step read back
        for how in ("map_state", "stream_state"):
            read = getattr(engine.store, how)
            setattr(engine.store, how, lambda unit, _read=read, **kw: mapped[-1].append(unit) or _read(unit, **kw))
        losses = []
        for s in range(4):
            mapped.append([])
            losses.append(engine.train_step([random_batch(tiny_args, 2, 12, seed=s)]).loss)
        kept = engine.pager.writes.in_ram.nbytes
        engine.close()
        return BlockStore.open(store.path), losses, mapped, kept

    ram, ram_losses, ram_mapped, kept = run("ram", True)
    disk, disk_losses, disk_mapped, _ = run("disk", False)
    assert ram_losses == disk_losses
    units = ram.units
    assert ram_mapped[1:] == [[], [], []] and all(sorted(m) == sorted(units) for m in disk_mapped[1:])
    # what RAM held at the end: every unit's last state, as its file holds it, and the masters
    # where the unit file holds those
    masters_in_unit = dtype == torch.float32 and compute == "bf16"
    files = [ram.read_file(ram.state_record(u)) for u in units]
    assert any(k.startswith("master.") for f in files for k in f) == (dtype == torch.bfloat16)
    unit_bytes = sum(t.numel() * 4 for u in units for t in ram.read_unit(u).values() if t.is_floating_point())
    assert kept == sum(t.numel() * t.element_size() for f in files for t in f.values()) + (
        unit_bytes if masters_in_unit else 0)
    for u in units:
        assert all(torch.equal(a, b) for a, b in zip(ram.read_unit(u).values(), disk.read_unit(u).values())), u
        mine, theirs = ram.read_file(ram.state_record(u)), disk.read_file(disk.state_record(u))
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), u


def test_state_in_ram_is_used_only_for_the_file_the_store_records():
    """The state kept in RAM is keyed by the file it was written to: asked for with another
    record (the store rolled back, or a step aborted), it is not handed out, and its memory is
    let go; a unit's entry is out while its step updates it in place."""
    from blocktune.paging.writeback import StateInRam
    from blocktune.store.records import FileRecord

    rec = FileRecord("block_00-000002.state.safetensors", 100, 7, {})
    older = FileRecord("block_00-000001.state.safetensors", 100, 5, {})
    ram = StateInRam(budget=1 << 20)
    pieces = {"step": torch.tensor(2.0), "exp_avg.w#0": torch.ones(8)}
    ram.put("block_00", rec, pieces)
    assert ram.nbytes == 36 and ram.room(1 << 19) and not ram.room(1 << 20)
    assert ram.take("block_00", rec) is pieces and ram.nbytes == 0
    assert ram.take("block_00", rec) is None  # taken: being stepped
    ram.put("block_00", rec, pieces)
    assert ram.take("block_00", older) is None and ram.nbytes == 0
    assert ram.take("block_00", rec) is None  # dropped with the mismatch
    assert not StateInRam(0).room(1)


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("overlap", [True, False])
def test_activations_spilled_to_disk_equal_kept_in_ram(tmp_path, tiny_args, method, overlap, monkeypatch):
    """Blocks past the RAM's keep budget whose activations go to disk and come back
    (`paging.spill`) train bit for bit as blocks kept in RAM, two micro-batches a step, with or
    without the overlap; their graphs hold no activation in RAM between forward and backward, and
    the file is one no other process can see."""
    from blocktune.paging import spill as spill_mod

    args = tiny_args.replace(n_layers=6)
    opened = []
    monkeypatch.setattr(spill_mod, "_open_nameless", lambda folder, f=spill_mod._open_nameless: (
        opened.append(folder) or f(folder)))
    results = []
    for keep, spill in ((None, 0), (0, None)):
        store = make_store(tmp_path / f"s{spill}", args.with_dropout(0.1), seed=3)
        before = sorted(p.name for p in store.path.iterdir())
        cfg = EngineConfig(method=method, lora=LORA, device="cpu", device_budget=one_unit_budget(store),
                           keep_budget=keep, spill_budget=spill, optimizer=OptimizerConfig("adamw", 1e-2))
        engine = Engine(store, cfg)
        loss_of = engine._loss

        def hollow_at_the_loss(run, *a, spill=spill, loss_of=loss_of):  # between forward and backward: a spilled graph's ends hold no values
            held = [t.untyped_storage().nbytes() for (i, _), pair in run.kept.items() if i in run.spilled for t in pair]
            assert len(held) == (0 if spill == 0 else 2 * 2 * args.n_layers) and max(held, default=0) <= 4
            return loss_of(run, *a)

        monkeypatch.setattr(engine, "_loss", hollow_at_the_loss)
        if spill != 0:
            object.__setattr__(engine.budgets, "spill_overlap", overlap)
            engine.spill.overlap = overlap
        steps = [engine.train_step([random_batch(args, 2, 12, seed=10 * s + m) for m in range(2)])
                 for s in range(3)]
        assert [r.kept_units for r in steps] == [args.n_layers] * 3
        assert [r.spilled_units for r in steps] == [0 if spill == 0 else args.n_layers] * 3
        if spill != 0:
            assert engine.spill.bytes_read == engine.spill.bytes_written > 0
            if method == "lora":  # the store's folder holds no file of the spill
                assert sorted(p.name for p in store.path.iterdir()) == before
        results.append(([r.loss for r in steps], trained_tensors(engine)))
        engine.close()
    assert opened  # the spill was opened (in the store's folder, the first choice)
    (l0, a0), (l1, a1) = results
    assert l0 == l1
    assert all(torch.equal(a0[k], a1[k]) for k in a0)


@pytest.mark.parametrize("overlap", [True, False])
def test_a_spilled_graph_gets_back_its_views_masks_and_shared_tensors(tmp_path, overlap):
    """What autograd saves comes back from the spill as it was saved: a transposed view with its
    strides, an expanded tensor, a bool mask, a 0-dim tensor; a tensor saved by two ops is
    written once, and so is a storage saved whole and as a view of another shape (the
    attention's output and wo's input). Gradients bit for bit those of the graph kept in RAM."""
    from blocktune.paging.spill import ActivationSpill, SpillHandles

    class NoPager:
        def get(self, unit):
            return {}

    def graph(x, w, s, hooks):
        with torch.autograd.graph.saved_tensors_hooks(*hooks) if hooks else contextlib.nullcontext():
            y = x.transpose(0, 2)  # saved by mul and by sin: one tensor, non-contiguous
            z = y * y.sin() * w.expand(5, 4, 3) * s
            u = x.exp()  # exp saves its output, a storage of its own
            v = u.reshape(12, 5)  # mul saves it as another shape
            return torch.where(z > 0, z, z * z).sum() + (v * s).sum()  # a bool mask saved by where

    inputs = [torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(1, 1, 3, dtype=torch.float64),
              torch.tensor(1.5, dtype=torch.float64)]
    grads = []
    spill = ActivationSpill(1 << 30, [tmp_path], overlap)
    assert spill.open()
    for spilled in (False, True):
        leaves = [t.clone().requires_grad_() for t in inputs]
        handles = SpillHandles(NoPager(), "block_00", spill) if spilled else None
        out = graph(*leaves, (handles.pack, handles.unpack) if spilled else None)
        if spilled:
            region = handles._open
            written = sum(-(-t.numel() * t.element_size() // 64) * 64 for t, _ in region.held if t is not None)
            handles.end(0)
            assert region.layout and len(region.layout) < region.packs  # y's twice, written once
            shared = [i for i, (_, _, shape, _) in enumerate(region.layout) if shape is None]
            assert len(shared) == 1 and region.nbytes == written  # v: u's bytes, not written again
        out.backward()
        grads.append([t.grad for t in leaves])
    spill.close()
    assert spill.bytes_written == spill.bytes_read > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_the_spills_disk_budget_holds_from_the_first_block(tmp_path, tiny_args):
    """Before any block has been written, the room a block needs on disk is the budgets'
    estimate (on the high side), not nothing: a disk budget of under one block's activations
    spills no block, the first step's first one included; one of two blocks' spills two in
    every step. The estimate covers what a block writes."""
    from blocktune.paging.budgets import working_set

    args = tiny_args.replace(n_layers=4)
    store = make_store(tmp_path / "s", args, seed=3)
    batches = [random_batch(args, 2, 12, seed=m) for m in range(2)]
    every = working_set(args, torch.float32, 2, 12, 2, 2048, False, "cpu", LORA)["kept"]
    spilled = {}
    for blocks in (0.5, 2):
        cfg = EngineConfig(method="lora", lora=LORA, device="cpu", device_budget=one_unit_budget(store),
                           keep_budget=0, spill_budget=int(blocks * every // args.n_layers))
        engine = Engine(store, cfg)
        try:
            spilled[blocks] = [engine.train_step(batches).spilled_units for _ in range(2)]
            written = max(engine._spill_estimate.values(), default=0)
        finally:
            engine.close()
        assert written <= every // args.n_layers
    assert spilled == {0.5: [0, 0], 2: [2, 2]}


def test_a_spill_whose_disk_fills_keeps_the_step(tmp_path, tiny_args, monkeypatch, caplog):
    """The disk fills while a block's activations are written (ENOSPC on the third write): that
    block's stay in RAM, the blocks after it are recomputed, a warning says so, and the step is
    the one kept in RAM (within the recompute's tolerance)."""
    import errno

    from blocktune.paging import spill as spill_mod

    args = tiny_args.replace(n_layers=6)
    writes = []

    def full_disk(self, mv, write=spill_mod._At.write):
        if self.pos not in writes:
            writes.append(self.pos)
        if len(writes) >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, mv)

    results = []
    for keep, spill in ((None, 0), (0, None)):
        if spill != 0:
            monkeypatch.setattr(spill_mod._At, "write", full_disk)
        store = make_store(tmp_path / f"s{spill}", args.with_dropout(0.1), seed=3)
        engine = Engine(store, EngineConfig(method="lora", lora=LORA, device="cpu", keep_budget=keep,
                                            spill_budget=spill, optimizer=OptimizerConfig("adamw", 1e-2)))
        with caplog.at_level("WARNING", logger="blocktune"):
            steps = [engine.train_step([random_batch(args, 2, 12, seed=10 * s + m) for m in range(2)])
                     for s in range(2)]
        results.append(([r.loss for r in steps], trained_tensors(engine), [r.spilled_units for r in steps]))
        engine.close()
    (l0, a0, _), (l1, a1, spilled) = results
    assert spilled == [2, 0]  # written: two regions; the third (block 1, micro-batch 0) failed and stayed in RAM
    assert "No space left on device" in caplog.text and "spill_activations = 0" in caplog.text
    assert all(abs(x - y) <= TOL * abs(x) for x, y in zip(l0, l1))
    assert max(rel_err(a1[k], a0[k]) for k in a0) <= TOL


def test_a_spilled_unit_holds_two_micro_batches_read_back_at_most(tmp_path, tiny_args, monkeypatch):
    """Four micro-batches a step: in the backward, what was read back for a micro-batch goes once
    its backward is through, and only the next one (or the next unit's first) is read ahead, so
    at most two micro-batches' activations are in memory, not all of a unit's (and the next's);
    the spill is never in a folder that lives in RAM (tmpfs)."""
    import weakref

    from blocktune.paging import spill as spill_mod

    args = tiny_args.replace(n_layers=4)
    live, most = [], []
    read = spill_mod.ActivationSpill._read

    def counted(self, region):
        buf = read(self, region)
        live.append(weakref.ref(buf))
        return buf

    def fetch(self, m, fetch=spill_mod.SpillHandles.fetch):
        most.append(sum(r() is not None for r in live))
        return fetch(self, m)

    monkeypatch.setattr(spill_mod.ActivationSpill, "_read", counted)
    monkeypatch.setattr(spill_mod.SpillHandles, "fetch", fetch)
    store = make_store(tmp_path / "s", args.with_dropout(0.1), seed=3)
    engine = Engine(store, EngineConfig(method="lora", lora=LORA, device="cpu", keep_budget=0, spill_budget=None,
                                        optimizer=OptimizerConfig("adamw", 1e-2)))
    engine.spill.folders.insert(0, Path("/dev/shm"))  # in RAM: passed over
    result = engine.train_step([random_batch(args, 2, 12, seed=m) for m in range(4)])
    assert engine.spill.where == store.path
    assert result.spilled_units == args.n_layers and len(live) == 4 * args.n_layers
    assert max(most) <= 2, most
    engine.close()


def test_a_full_steps_state_is_read_back_into_reused_buffers(tmp_path, tiny_args, monkeypatch):
    """The optimizer state a full fine-tune reads back each step (streamed with direct IO) goes
    into buffers the write-back reuses within the step, not into a fresh one for each read: the
    kernel zeroes a fresh buffer's pages as the direct read pins them (the laptop shape's full
    step under 1 GiB streamed 10.5 GB a step into fresh buffers, and zeroing was 11% of both
    cores' time). A buffer is reused only once no tensor views it: the bit-for-bit equality of
    the state read back and the state kept in RAM above holds with the reuse."""
    from blocktune.paging import buffers
    from blocktune.store import fileio

    fresh, reads = [], []
    make, pread = fileio.aligned_empty, fileio.StreamedTensors._pread

    def counted(nbytes):
        fresh.append(nbytes)
        return make(nbytes)

    def counted_read(self, offset, nbytes):
        reads.append(nbytes)
        return pread(self, offset, nbytes)

    for module in (fileio, buffers):
        monkeypatch.setattr(module, "aligned_empty", counted)
    monkeypatch.setattr(fileio.StreamedTensors, "_pread", counted_read)
    store = make_store(tmp_path / "s", tiny_args, seed=3)
    engine = Engine(store, EngineConfig(method="full", device="cpu", optimizer=OptimizerConfig("adamw", lr=1e-2)))
    engine.pager.writes.in_ram.budget = 0  # read back each step, not kept
    engine.train_step([random_batch(tiny_args, 2, 12, seed=0)])  # the first step writes the state
    del fresh[:], reads[:]
    for s in range(1, 4):
        engine.train_step([random_batch(tiny_args, 2, 12, seed=s)])
    engine.close()
    assert len(reads) >= 3 * 4 and len(fresh) * 4 <= len(reads), (len(fresh), len(reads))
