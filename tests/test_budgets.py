"""`auto` budgets: from the machine's free memory, and a run they choose fits (a real cgroup)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from blocktune import LoraConfig, ModelArgs
from blocktune.engine import loss as loss_module
from blocktune.engine.loss import chunked_cross_entropy
from blocktune.machine.devices import resolve_device
from blocktune.model.llama import Head
from blocktune.paging.budgets import AUTO, resolve, working_set
from blocktune_bench.corpus import demo_text, tokenizer_path
from blocktune_bench.cuda import StepBytes
from blocktune_bench.synthetic import make_store

PY = sys.executable
MiB = 1 << 20
ARGS = ModelArgs(dim=2048, n_layers=8, n_heads=16, vocab_size=32000, multiple_of=256)


def _resolve(monkeypatch, free, args=ARGS, **kw):
    monkeypatch.setattr("blocktune.paging.budgets.host_memory_free", lambda: free)
    sizes = {"embed": 262 * MiB, "block_00": 206 * MiB, "head": 262 * MiB}
    files = {k: v // 2 for k, v in sizes.items()}
    base = dict(method="lora", device_budget=AUTO, host_budget=AUTO, activation_budget=AUTO, batch=1, seq=64, micro=8)
    base.update(kw)
    return resolve(resolve_device("cpu"), args, sizes, files, torch.float32, **base)


def test_explicit_budgets_are_kept(monkeypatch):
    b = _resolve(monkeypatch, 8 << 30, device_budget=300 * MiB, host_budget=None, activation_budget=10 * MiB)
    assert (b.device, b.host, b.activation, b.notes) == (300 * MiB, None, 10 * MiB, ())


def test_auto_fits_the_room_and_says_why(monkeypatch):
    work = working_set(ARGS, torch.float32, 1, 64, 8, 2048, device_type="cpu")  # as _resolve's device
    for free in (842 * MiB, 2 << 30, 16 << 30):
        b = _resolve(monkeypatch, free)
        room = int(free * 0.9) - 192 * MiB
        fixed = work["block"] + work["loss"] + 2 * 131 * MiB
        print(f"free {free / MiB:.0f} MiB: units {b.device / MiB:.0f} MiB, stash {b.activation / MiB:.0f} MiB, tight {b.tight}")
        assert b.device >= 262 * MiB  # at least the largest unit
        if b.device > 262 * MiB:  # not at the floor: everything fits in the room
            assert b.device + b.activation + fixed <= room
        assert any(n.startswith("device_budget auto") for n in b.notes)
        assert b.tight == (b.device < 2 * 262 * MiB)
    short = _resolve(monkeypatch, 842 * MiB)
    assert short.activation < work["stash"] and "spills to disk" in " ".join(short.notes)
    roomy = _resolve(monkeypatch, 16 << 30)
    assert roomy.activation == work["stash"] and not roomy.tight


def test_units_paged_through_ram_keep_the_heap_lean(monkeypatch):
    """Where `auto` pages the units through RAM (they do not all fit) the run keeps the heap from
    growing (`Budgets.lean`: freed heap given back between units, `blocktune.machine.hostmem.LeanHeap`),
    with room for two units as with one: a 7B bf16 LoRA step under 2 GiB held two units, and
    glibc's heap kept 0.66 GB of freed activations in holes until the cgroup killed the run. Where
    every unit fits, or the budget was given, the heap is left alone."""
    units = (262 + 206 + 262) * MiB
    seen = {"tight": 0, "lean, two units or more": 0, "every unit resident": 0}
    for free in range(800 * MiB, 3 << 30, 64 * MiB):
        b = _resolve(monkeypatch, free)
        assert b.lean == (b.device < units), (free, b.device)
        assert b.lean or not b.tight  # tight is lean
        # LoRA's heap may grow by 5% of the free RAM (at most 128 MiB) before it is trimmed; a full
        # fine-tune's before every unit
        assert b.heap_slack == (min(128 * MiB, free // 20) if b.lean else 0), (free, b.heap_slack)
        if b.lean:
            assert _resolve(monkeypatch, free, method="full").heap_slack == 0
            # generation and eval (read-only, "full" where no adapter is given) are not a full step
            ro = _resolve(monkeypatch, free, method="full", kv_cache=True)
            assert ro.heap_slack == (min(128 * MiB, free // 20) if ro.lean else 0)
            seen["read-only, lean"] = seen.get("read-only, lean", 0) + ro.lean
        seen["tight" if b.tight else "lean, two units or more" if b.lean else "every unit resident"] += 1
        if b.lean and not b.tight:
            assert any("paged through RAM" in n for n in b.notes), b.notes
    assert all(seen.values()), seen  # each case was met
    assert not _resolve(monkeypatch, 1 << 30, device_budget=300 * MiB, host_budget=None, activation_budget=10 * MiB).lean


def test_one_unit_resident_warns_only_where_it_does_not_fit(monkeypatch):
    """With room for one unit, the next raw file is read once this one is converted into its
    slot: one file in flight beside it, not two. A room that holds that gets no warning; one
    that does not is told it may be killed."""
    work = working_set(ARGS, torch.float32, 1, 64, 8, 2048, device_type="cpu")
    one_beside = work["block"] + work["loss"] + 131 * MiB  # one raw file (the largest, 131 MiB)

    def free_for(room: int) -> int:
        return int((room + 192 * MiB) / 0.9) + 1

    fits = _resolve(monkeypatch, free_for(one_beside + 262 * MiB + 4 * MiB))
    assert fits.device == 262 * MiB and fits.tight
    assert not any(n.startswith("warning:") for n in fits.notes), fits.notes
    short = _resolve(monkeypatch, free_for(one_beside + 262 * MiB - 4 * MiB))
    assert any("may be killed" in n for n in short.notes), short.notes


def _cgroup_ok() -> bool:
    v1 = Path("/sys/fs/cgroup/memory")
    return os.access(v1 if v1.is_dir() else Path("/sys/fs/cgroup"), os.W_OK)


@pytest.mark.skipif(not _cgroup_ok(), reason="needs the right to make a memory cgroup")
def test_no_flags_fits_where_unlimited_is_killed(tmp_path):
    """A 1.1 GB bf16 store (2.2 GB computed in fp32) under a 900 MiB cgroup limit: with no budget
    flags the LoRA step runs; with `--device-budget inf` (every unit resident) the kernel kills it."""
    store = make_store(tmp_path / "s", ARGS, seed=0, dtype=torch.bfloat16, tokenizer=tokenizer_path())
    store.close()
    (tmp_path / "t.txt").write_text(demo_text())

    def run(*extra):
        cmd = [PY, "-m", "blocktune_bench.limited", "900MiB", "--", PY, "-m", "blocktune", "finetune",
               "--store", str(store.path), "--data", str(tmp_path / "t.txt"), "--steps", "1", "--batch-size", "1",
               "--seq-len", "64", "--grad-accum", "2", "--out", str(tmp_path / f"run{len(extra)}"), "--no-progress", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        report = json.loads(r.stderr.strip().splitlines()[-1])
        print(report["exit_code"], report["cgroup_peak_bytes"], [line for line in r.stderr.splitlines() if "auto:" in line])
        return report

    auto = run()
    assert auto["exit_code"] == 0 and auto["oom_kills"] == 0 and auto["cgroup_peak_bytes"] <= auto["limit_bytes"]
    unlimited = run("--device-budget", "inf")
    assert unlimited["exit_code"] != 0 and unlimited["oom_kills"] >= 1


def test_ranks_on_one_machine_share_its_memory(monkeypatch):
    """Under torchrun (--nproc) every rank on the machine resolves `auto` from the same free
    memory: each takes its share (two ranks each took 18.9 GB of 21 GB free before), and says so."""
    one = _resolve(monkeypatch, 16 << 30)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    two = _resolve(monkeypatch, 16 << 30)
    half = _resolve(monkeypatch, 8 << 30)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    alone_on_half = _resolve(monkeypatch, 8 << 30)
    print(f"device budget alone {one.device / MiB:.0f} MiB, each of two ranks {two.device / MiB:.0f} MiB")
    assert (two.device, two.activation) == (alone_on_half.device, alone_on_half.activation)
    assert (half.device, half.activation) != (alone_on_half.device, alone_on_half.activation)  # halved again
    assert 2 * two.device + 2 * two.activation <= 16 << 30
    assert any("2 ranks on this machine" in n for n in two.notes)


def test_emulated_device_memory_is_shared_by_the_ranks(monkeypatch):
    """The emulated accelerator's memory is the host's: each of two ranks gets half of its room too."""
    def budgets():
        sizes = {"embed": 262 * MiB, "block_00": 206 * MiB, "head": 262 * MiB}
        return resolve(resolve_device("emu"), ARGS, sizes, {k: v // 2 for k, v in sizes.items()}, torch.bfloat16,
                       method="lora", device_budget=AUTO, host_budget=AUTO, activation_budget=AUTO,
                       batch=1, seq=64, micro=8)

    monkeypatch.setattr("blocktune.paging.budgets.host_memory_free", lambda: 16 << 30)
    monkeypatch.setattr("blocktune.machine.devices.base.host_memory_free", lambda: 16 << 30)
    alone = budgets()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    shared = budgets()
    print(f"emu alone: device {alone.device / MiB:.0f} MiB, host {alone.host / MiB:.0f} MiB; "
          f"each of two: {shared.device / MiB:.0f}, {shared.host / MiB:.0f} MiB")
    assert shared.device < 0.55 * alone.device and shared.host < 0.55 * alone.host


def test_two_ranks_on_one_gpu_are_refused(monkeypatch):
    """More processes than GPUs would put two ranks on one GPU: an error that says how many to run."""
    from blocktune.errors import ConfigError
    from blocktune.machine.devices import EmuDevice

    class OneGpu(EmuDevice):  # a machine with one accelerator of its own memory
        def local_devices(self):
            return 1

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    sizes = {"embed": 262 * MiB, "block_00": 206 * MiB, "head": 262 * MiB}
    with pytest.raises(ConfigError, match="2 processes on this machine but 1 emu device.*--nproc 1"):
        resolve(OneGpu(), ARGS, sizes, sizes, torch.float32, method="lora", device_budget=1 << 30,
                host_budget=0, activation_budget=None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve(OneGpu(), ARGS, sizes, sizes, torch.float32, method="lora", device_budget=1 << 30,
                   host_budget=0, activation_budget=None).device == 1 << 30


def units_first(monkeypatch, free: int) -> int:
    """The keep budget left beside every unit resident (what `auto` kept before activations came
    first): the room less the working set, the stash and the units."""
    work = working_set(ARGS, torch.float32, 1, 64, 8, 2048, device_type="cpu")
    room = int(free * 0.9) - 192 * MiB
    return room - (work["block"] + work["loss"] + 2 * 131 * MiB) - work["stash"] - (262 + 206 + 262) * MiB


def test_auto_keeps_activations_where_memory_allows(monkeypatch):
    """`keep_activations auto` (the run's default): with room for every unit and every block's
    activations, all units resident and activations kept (no recompute); short of room for both,
    activations before units past the two a pass needs (the one computing, the one read ahead);
    short of room for one block's activations beside those, none kept, the units lose nothing,
    and the log says the backward recomputes."""
    work = working_set(ARGS, torch.float32, 1, 64, 8, 2048, device_type="cpu")  # as _resolve's device
    units = (262 + 206 + 262) * MiB
    roomy = _resolve(monkeypatch, 16 << 30, keep_budget=AUTO)
    print("\n".join(roomy.notes))
    assert roomy.device == units and roomy.keep >= work["kept"]
    assert "every block's activations" in " ".join(roomy.notes) and not roomy.tight
    some = _resolve(monkeypatch, 1600 * MiB, keep_budget=AUTO)
    print("\n".join(some.notes))
    assert some.device == 2 * 262 * MiB and 0 < some.keep < work["kept"] and "the rest recomputed" in " ".join(some.notes)
    assert some.keep - units_first(monkeypatch, 1600 * MiB) == units - some.device  # what the units gave
    assert "to kept activations" in " ".join(some.notes)
    short = _resolve(monkeypatch, 1200 * MiB, keep_budget=AUTO)
    print("\n".join(short.notes))
    assert short.keep == 0 and "each block is recomputed in the backward" in " ".join(short.notes)
    assert short.device == _resolve(monkeypatch, 1200 * MiB).device  # the units lose nothing to it
    explicit = _resolve(monkeypatch, 16 << 30, keep_budget=0)
    assert explicit.keep == 0 and explicit.device > units  # the library's default: always recompute


def test_auto_keeps_on_disk_the_activations_ram_cannot(monkeypatch):
    """`spill_activations auto` (the run's default) on the CPU: the blocks' activations that the
    RAM's keep budget leaves out go to disk (all of them where none fit, the rest where some do,
    none where all fit), and the log says so instead of "recomputed"; with room for a block's
    more the writes and reads overlap the compute (the RAM's keep budget gives a block's room to
    it), without, each is waited for; 0 recomputes; the emulated accelerator spills nothing (its
    host RAM is not the device)."""
    work = working_set(ARGS, torch.float32, 1, 64, 8, 2048, device_type="cpu")

    def spill(free, **kw):
        b = _resolve(monkeypatch, free, keep_budget=AUTO, spill_budget=AUTO, **kw)
        print("\n".join(b.notes))
        return b

    roomy = spill(16 << 30)
    assert roomy.spill == 0 and "spill_activations" not in " ".join(roomy.notes)
    some = spill(1600 * MiB)
    assert 0 < some.keep < work["kept"] and some.spill == work["kept"] - some.keep and some.spill_overlap
    assert f"after giving a block's ({work['kept'] // ARGS.n_layers / MiB:.0f} MiB) to the spill's overlap" in " ".join(some.notes)
    assert "the rest kept on disk (spill_activations)" in " ".join(some.notes)
    short = spill(1200 * MiB)
    assert short.keep == 0 and short.spill == work["kept"]
    assert "each block's are kept on disk" in " ".join(short.notes)
    assert "spill_activations auto: the blocks' activations past the RAM's" in " ".join(short.notes)
    assert not short.spill_overlap and "each write and read is waited for" in " ".join(short.notes)  # no room for more
    # SmolLM2-135M's shape: a block's recompute, ≈113 FLOPs a byte of its activations, beats the disk
    small = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, ffn_dim=1536)
    cheap = _resolve(monkeypatch, 1200 * MiB, args=small, batch=4, seq=256, micro=1, keep_budget=AUTO, spill_budget=AUTO)
    assert cheap.spill == 0 and "recomputing is quicker than the disk" in " ".join(cheap.notes)
    assert "recomputed in the backward" in " ".join(cheap.notes) and "kept on disk" not in " ".join(cheap.notes)
    assert _resolve(monkeypatch, 1200 * MiB, args=small, batch=4, seq=256, micro=1, keep_budget=AUTO,
                    spill_budget=1 << 30).spill == 1 << 30  # asked for: spilled
    # in bf16 a block keeps half the bytes, but the CPU recomputes it about 3x as fast: still recomputed
    sizes = {"embed": 57 * MiB, "block_00": 9 * MiB, "head": 57 * MiB}
    bf16 = resolve(resolve_device("cpu"), small, sizes, {k: 2 * v for k, v in sizes.items()}, torch.bfloat16,
                   method="lora", lora=LoraConfig(), device_budget=AUTO, host_budget=AUTO, activation_budget=AUTO,
                   keep_budget=AUTO, spill_budget=AUTO, batch=4, seq=256, micro=1)
    assert bf16.spill == 0 and "recomputing is quicker than the disk" in " ".join(bf16.notes), bf16.notes
    off = _resolve(monkeypatch, 1200 * MiB, keep_budget=AUTO, spill_budget=0)
    assert off.spill == 0 and "each block is recomputed in the backward" in " ".join(off.notes)
    assert _resolve(monkeypatch, 1200 * MiB, keep_budget=AUTO, spill_budget=5 << 30).spill == 5 << 30
    from blocktune.machine.devices import EmuDevice

    monkeypatch.setattr("blocktune.paging.budgets.host_memory_free", lambda: 1200 * MiB)
    sizes = {"embed": 262 * MiB, "block_00": 206 * MiB, "head": 262 * MiB}
    emu = resolve(EmuDevice(), ARGS, sizes, sizes, torch.float32, method="lora", device_budget=AUTO,
                  host_budget=AUTO, activation_budget=AUTO, keep_budget=AUTO, spill_budget=AUTO, batch=1, seq=64, micro=8)
    assert emu.spill == 0


def test_a_full_fine_tune_counts_its_fp32_state(monkeypatch):
    """The fp32 masters and moments a full fine-tune's step holds (pieces of each, old and new) are
    taken from the units' room: more kinds of state, a smaller device budget."""
    adam = _resolve(monkeypatch, 16 << 30, method="full", state_kinds=3)
    sgd = _resolve(monkeypatch, 16 << 30, method="full", state_kinds=0)
    lora = _resolve(monkeypatch, 16 << 30)
    assert lora.device > sgd.device > adam.device
    assert "optimizer step (fp32 state)" in " ".join(adam.notes)


def test_a_full_fine_tune_keeps_its_state_in_ram_after_units_and_activations(monkeypatch):
    """`auto` keeps a full fine-tune's optimizer state in RAM between steps from the room that
    every unit resident and every block's activations leave (they save compute, it saves reading
    the state back): all of it where it fits, part where part does, none (and the log says it is
    read back) where a unit's does not fit; the kept activations' budget gives up what it takes."""
    units = (262 + 206 + 262) * MiB
    whole = units // 4 * 3 * 4 + 3 * 4  # fp32 masters and two moments, and each unit's step count
    work = working_set(ARGS, torch.float32, 1, 64, 8, 2048, device_type="cpu")

    def full(free):
        return _resolve(monkeypatch, free, method="full", state_kinds=3, keep_budget=AUTO)

    roomy = full(32 << 30)
    print("\n".join(roomy.notes))
    assert roomy.state == whole and roomy.device == units and roomy.keep >= work["kept"]
    assert "(all of it: stepped there" in " ".join(roomy.notes)

    def past_units_and_activations(room):  # free RAM that leaves `room` past them
        return int((units_first_full() + units + work["kept"] + room + 192 * MiB) / 0.9) + 1

    part = full(past_units_and_activations(1536 * MiB))  # 1.5 GiB of the 2.1 GiB
    print("\n".join(part.notes))
    assert 1500 * MiB < part.state < whole and part.keep >= work["kept"]
    short = full(past_units_and_activations(700 * MiB))  # a unit's (the largest, 786 MiB) does not fit
    print("\n".join(short.notes))
    assert short.state == 0 and "read back from the store each step" in " ".join(short.notes)
    tied = _resolve(monkeypatch, 32 << 30, args=dataclasses.replace(ARGS, tie_embeddings=True), method="full",
                    state_kinds=3, keep_budget=AUTO)  # the head's matrix is embed's: stepped, and kept, once
    assert tied.state == whole - ARGS.vocab_size * ARGS.dim * 4 * 3
    assert _resolve(monkeypatch, 32 << 30, method="lora", keep_budget=AUTO).state == 0  # no state to keep
    assert _resolve(monkeypatch, 32 << 30, method="full", state_kinds=3).state == 0  # the library's keep 0


def units_first_full() -> int:
    """What a full fine-tune's fixed working set and stash take, as `resolve` counts them here."""
    work = working_set(ARGS, torch.float32, 1, 64, 8, 2048, device_type="cpu")
    from blocktune.paging.budgets import _full_step_bytes
    return work["block"] + work["loss"] + 2 * 131 * MiB + _full_step_bytes(262 * MiB // 4, 3) + work["stash"]


@pytest.mark.parametrize("dim,vocab,batch,seq,chunk", [(256, 8000, 2, 256, 128), (128, 32000, 1, 512, 512),
                                                       (512, 4000, 4, 128, 100)])
@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_the_loss_term_holds_what_the_chunked_loss_makes(dim, vocab, batch, seq, chunk, device_type, monkeypatch):
    """working_set's "loss" against the bytes the chunked cross-entropy and its backward make,
    alive at once (followed by their storages' lifetimes): three fp32 tensors of a chunk's logits
    (log-softmax and the gradients; two on the CPU, which writes them in place) with the head's
    bf16 output, and the head input's gradient, whole-size, with one chunk's part of it. Counting
    three of a chunk's logits and nothing else fell short by a third to a half. The GPU's path
    (autograd's) runs here on the CPU's tensors, chosen as the GPU chooses it."""
    if device_type != "cpu":
        monkeypatch.setattr(loss_module, "writes_in_place", lambda _type: False)
    args = ModelArgs(dim=dim, n_layers=1, n_heads=4, vocab_size=vocab, multiple_of=32)
    head = Head(args).to(torch.bfloat16).requires_grad_(False)  # frozen, as under LoRA
    h = torch.randn(batch, seq, dim, dtype=torch.bfloat16).requires_grad_(True)
    before = (h, *head.parameters())  # in the step: the stash's last entry and a unit's slot
    with StepBytes(held=before) as made:
        chunked_cross_entropy(head, h, torch.randint(0, vocab, (batch, seq)), batch * seq, chunk, True)
    measured = made.peak - sum(t.untyped_storage().nbytes() for t in before)
    formula = working_set(args, torch.bfloat16, batch, seq, 1, chunk, device_type=device_type)["loss"]
    print(f"{device_type}: dim {dim} vocab {vocab} {batch}x{seq} chunk {chunk}: measured {measured:,} B, formula {formula:,} B")
    assert 0.8 * formula <= measured <= formula


def test_the_loss_chunk_keeps_a_chunks_logits_within_32_mib(tmp_path, monkeypatch):
    """By default a frozen head's loss takes as many positions at a time as keep one chunk's fp32
    logits within 32 MiB (128 to 2048, in 64s): its buffers are held beside every kept block's activations, so
    they add to the step's peak (SmolLM2's LoRA step at 4 x 256 peaked at 2.38 GB with the old
    2048 positions, 2.08 GB with 256). The engine's step uses that chunk, and its budgets count it.
    A full fine-tune's head keeps 2048: its weight's gradient is summed over the chunks."""
    import blocktune.engine.engine as engine_module
    from blocktune import Engine, EngineConfig
    from blocktune.engine.loss import loss_chunk
    from conftest import random_batch

    assert [loss_chunk(v) for v in (49152, 32000, 128256, 262144, 1000)] == [128, 256, 128, 128, 2048]
    assert loss_chunk(128256, 4096) == 4096  # asked for
    assert loss_chunk(128256, head_trains=True) == 2048  # a trained head sums its gradient over the chunks
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=262144, multiple_of=32)
    store = make_store(tmp_path / "s", args, seed=0)
    chunks, counted = [], []
    real, real_set = engine_module.chunked_cross_entropy, engine_module.resolve_budgets

    def spy(head, h, targets, denom, chunk, backward):
        chunks.append(chunk)
        return real(head, h, targets, denom, chunk, backward)

    monkeypatch.setattr(engine_module, "chunked_cross_entropy", spy)
    monkeypatch.setattr(engine_module, "resolve_budgets", lambda *a, **kw: counted.append(kw["loss_chunk"]) or real_set(*a, **kw))
    engine = Engine(store, EngineConfig(method="lora", lora=LoraConfig(), device="cpu"))
    engine.train_step([random_batch(args, 2, 100, seed=0)])
    engine.close()
    assert engine.loss_chunk == 128 and chunks == [128] and counted == [128]
    assert Engine(store, EngineConfig(method="full", device="cpu")).loss_chunk == 2048


def test_generation_without_an_adapter_reserves_no_training_step(monkeypatch):
    """generate and eval without an adapter run as method "full", read-only (kv_cache): they
    reserved a full fine-tune's gradients and optimizer pieces, and kept optimizer state in RAM,
    which they never make; they now get the budgets generation with an adapter gets."""
    for free in (900 * MiB, 1200 * MiB, 2 << 30):
        ro_full = _resolve(monkeypatch, free, method="full", kv_cache=True)
        ro_lora = _resolve(monkeypatch, free, method="lora", kv_cache=True)
        assert (ro_full.device, ro_full.activation, ro_full.state) == (ro_lora.device, ro_lora.activation, 0), free
        assert not any("optimizer" in n for n in ro_full.notes), ro_full.notes
    trains = _resolve(monkeypatch, 1200 * MiB, method="full")
    assert trains.device < _resolve(monkeypatch, 1200 * MiB, method="full", kv_cache=True).device


def _kept_by_a_block(args, lora, dtype, batch, seq):
    """Bytes one training block's graph keeps for the backward, its parameters aside (the engine
    keeps those as handles)."""
    from blocktune.model.llama import Block
    from blocktune.model.lora import add_lora

    torch.manual_seed(0)
    block = Block(args) if lora is None else add_lora(Block(args), lora)
    block.train()
    for name, p in block.named_parameters():
        lora_param = ".lora_" in name
        p.requires_grad_(lora is None or lora_param)
        if not lora_param:
            p.data = p.data.to(dtype)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        block(torch.randn(batch, seq, args.dim, dtype=dtype, requires_grad=True))
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return sum(n for ptr, n in kept.items() if ptr not in params)


@pytest.mark.parametrize("family", ["llama", "gqa", "qwen3", "dropouts"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora", [None, LoraConfig(), LoraConfig(dropout=0.0), LoraConfig(targets=("all-linear",))],
                         ids=["full", "lora", "lora-nodrop", "lora-all"])
def test_the_kept_activations_estimate_covers_a_block_and_is_close(family, dtype, lora):
    """`working_set`'s "kept" (what `auto` sizes the kept and spilled activations by) covers what a
    block's graph keeps, whatever the method, adapters, dtype and attention, and is within a
    quarter of it: it had stayed at a fp32 graph's size (the norms' widened inputs, each adapter's
    widened input and its noise) after the blocks kept half of that, so `auto` kept half as many
    blocks in RAM as fitted."""
    args = ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=256, ffn_dim=352, max_seq_len=64)
    args = {"llama": args, "gqa": args.replace(n_kv_heads=2),
            "qwen3": args.replace(n_kv_heads=2, explicit_head_dim=48, qk_norm=True),
            "dropouts": args.replace(resid_dropout=0.1, attn_dropout=0.1)}[family]
    batch, seq = 2, 32
    actual = _kept_by_a_block(args, lora, dtype, batch, seq)
    estimate = working_set(args, dtype, batch, seq, 1, 2048, device_type="cpu", lora=lora)["kept"] // args.n_layers
    assert actual <= estimate <= 1.25 * actual, (actual, estimate)


def test_a_kept_block_is_counted_as_what_it_holds():
    """The keep budget's count of a kept block (`WeightHandles.activation_bytes`) is the bytes of
    the distinct storages its graph holds, its weights (handles) and adapters (their module holds
    them) aside: it had counted q, k and v's adapter input three times and the adapters as
    activations, so `auto` kept fewer blocks than the budget held."""
    from blocktune.engine.handles import WeightHandles
    from blocktune.model.llama import Block
    from blocktune.model.lora import add_lora

    args = ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=256, ffn_dim=352, max_seq_len=64)
    torch.manual_seed(0)
    block = add_lora(Block(args), LoraConfig())
    block.train()
    for name, p in block.named_parameters():
        p.requires_grad_(".lora_" in name)

    class Pager:  # the unit's weights, as the pager holds them
        def get(self, unit):
            return {n: p for n, p in block.named_parameters() if ".lora_" not in n}

    handles = WeightHandles(Pager(), "block_00", block.parameters())
    with torch.autograd.graph.saved_tensors_hooks(handles.pack, handles.unpack):
        out = block(torch.randn(2, 32, args.dim, requires_grad=True))
    assert handles.activation_bytes == _kept_by_a_block(args, LoraConfig(), torch.float32, 2, 32)
    out.sum().backward()  # the handles give the weights back


def _peak_of_a_block(args, dtype, batch, seq):
    """Peak bytes of the tensors one block's forward and backward make (a frozen block: its
    input's gradient), counted from torch's dispatcher (what a kernel allocates inside itself is
    not seen: SDPA's fused CPU kernel keeps a few small per-thread buffers)."""
    from blocktune.model.llama import Block
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    torch.manual_seed(0)
    block = Block(args).to(dtype)
    block.train()
    x = torch.randn(batch, seq, args.dim, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    old = {t.untyped_storage().data_ptr() for t in [*block.parameters(), x, grad]}

    class Live(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.made, self.peak = {}, 0  # storage address -> (a weak reference to it, its bytes)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in old:
                    s = t.untyped_storage()
                    self.made.setdefault(s.data_ptr(), (StorageWeakRef(s), s.nbytes()))
            self.made = {k: v for k, v in self.made.items() if not v[0].expired()}
            self.peak = max(self.peak, sum(n for _, n in self.made.values()))
            return out

    for p in block.parameters():
        p.requires_grad_(False)
    with Live() as live:
        block(x).backward(grad)
    return live.peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attn_dropout", [0.0, 0.1])
def test_the_recomputed_blocks_estimate_counts_attention_scores_where_they_are_made(dtype, attn_dropout):
    """`working_set`'s "block" (one block recomputed and differentiated: room `auto` sets aside
    beside every budget) covers the block's peak at 1,024 tokens and is within 2x of it. The CPU's
    fused attention makes no scores; it had counted three fp32 copies of them whatever the
    attention: 6x the peak here, 11x at Llama 2 7B's heads and 2,048 tokens (1.5 GiB of room
    taken from the kept activations). With attention dropout the math kernel makes 3.3-3.9
    copies: three were short of the peak in bf16."""
    args = ModelArgs(dim=256, n_layers=1, n_heads=8, vocab_size=256, ffn_dim=704, max_seq_len=1024,
                     attn_dropout=attn_dropout)
    actual = _peak_of_a_block(args, dtype, 1, 1024)
    estimate = working_set(args, dtype, 1, 1024, 1, 2048, device_type="cpu")["block"]
    assert actual <= estimate <= 2 * actual, (actual, estimate)
