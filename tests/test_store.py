"""The block store and pager: atomic writes, checksums, clear errors, budgets."""

import errno
import json
import struct
import sys
import time

import pytest
import torch
from blocktune import BlockStore, BudgetError, ChecksumError, Engine, EngineConfig, StoreError
from blocktune.paging.buffers import BufferPool
from blocktune.settings import parse_bytes
from blocktune.store.build import build_store
from blocktune.store.fileio import open_new_direct
from blocktune.store.lock import LOCK_DIR
from blocktune_bench.synthetic import SHAPES as PRESETS
from blocktune_bench.synthetic import make_store, random_units
from conftest import random_batch


def test_store_layout_and_manifest(tiny_store):
    m = json.loads((tiny_store.path / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["step"] == 0
    assert list(m["units"]) == ["embed", "block_00", "block_01", "block_02", "block_03", "head"]
    assert m["units"]["head"]["tensors"]["output.weight"]["shape"] == [1024, 64]
    assert tiny_store.verify() == []


def test_open_reads_only_the_manifest(tmp_path):
    """Opening a store (of any size) reads its manifest and nothing else: with every unit file
    emptied it still opens, and the first read names the damage. (The time is printed, not
    asserted: speed targets live in the benchmarks.)"""
    store = make_store(tmp_path / "s", PRESETS["tiny-70b"])
    for rec in (store.record(u) for u in store.units):
        (store.path / rec.file).write_bytes(b"")
    t0 = time.perf_counter()
    for _ in range(20):
        opened = BlockStore.open(store.path)
    print(f"open: {(time.perf_counter() - t0) / 20 * 1e3:.2f} ms")
    assert opened.step == 0 and opened.units == store.units
    with pytest.raises(ChecksumError, match="size differs"):
        opened.read_unit("block_00")


def test_failed_build_leaves_nothing(tmp_path, tiny_args):
    def broken():
        for i, unit in enumerate(random_units(tiny_args)):
            if i == 2:
                raise OSError("disk on fire")
            yield unit

    with pytest.raises(OSError):
        build_store(tmp_path / "dst", tiny_args, broken(), torch.float32)
    assert list(tmp_path.iterdir()) == []


def test_flipped_byte_is_named(tiny_store):
    path = tiny_store.path / "block_02.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="block_02.safetensors"):
        tiny_store.read_unit("block_02")
    problems = tiny_store.verify()
    assert len(problems) == 1 and "block_02" in problems[0]
    engine = Engine(tiny_store, EngineConfig(method="full", device="cpu"))
    with pytest.raises(ChecksumError, match="block_02"):
        engine.logits(random_batch(tiny_store.args)[0])


def test_truncated_and_missing_files(tiny_store):
    p = tiny_store.path / "head.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ChecksumError, match="head.safetensors.*size"):
        tiny_store.read_unit("head")
    (tiny_store.path / "embed.safetensors").unlink()
    with pytest.raises(StoreError, match="embed.safetensors.*missing"):
        tiny_store.read_unit("embed")


def test_newer_format_and_foreign_folders(tiny_store, tmp_path):
    m = json.loads((tiny_store.path / "manifest.json").read_text())
    m["format_version"] = 99
    (tiny_store.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="newer than this blocktune"):
        BlockStore.open(tiny_store.path)
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "params.json").write_text("{}")
    with pytest.raises(StoreError, match="blocktune prepare"):
        BlockStore.open(tmp_path / "meta")


def test_budget_smaller_than_largest_unit(tiny_store):
    with pytest.raises(BudgetError, match="head.*raise the budget"):
        Engine(tiny_store, EngineConfig(method="full", device="cpu", device_budget=1000))


def test_parse_bytes():
    assert parse_bytes("4GiB") == 4 << 30
    assert parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("inf") is None
    with pytest.raises(BudgetError, match="4GiB"):
        parse_bytes("four gigs")


def test_uncommitted_versions_are_collected(tiny_store):
    """A writer that goes away before its commit leaves versions that the next writer deletes."""
    rec = tiny_store.write_unit("block_00", tiny_store.read_unit("block_00"), 1)
    assert (tiny_store.path / rec.file).exists()
    tiny_store.close()
    reopened = BlockStore.open(tiny_store.path)
    assert reopened.record("block_00").file == "block_00.safetensors"  # not committed: invisible
    reopened.collect_garbage()
    assert not (tiny_store.path / rec.file).exists()


def test_activation_stash_spills(tmp_path):
    from blocktune.paging.stash import ActivationStash

    stash = ActivationStash(budget=1000, spill_dir=tmp_path)
    a, b = torch.randn(100), torch.randn(300)
    stash.put(("a",), a)
    stash.put(("b",), b)  # 1200 bytes > 1000: spills
    assert stash.spilled_bytes == b.numel() * 4
    assert torch.equal(stash.pop(("b",)), b) and torch.equal(stash.pop(("a",)), a)
    stash.clear()


def test_spilled_activations_give_the_same_step(tmp_path, tiny_args):
    results = []
    for budget in (None, 1):
        store = make_store(tmp_path / f"s{budget}", tiny_args.with_dropout(0.1), seed=4)
        engine = Engine(store, EngineConfig(method="lora", device="cpu", activation_budget=budget))
        results.append([engine.train_step([random_batch(tiny_args, seed=s)]).loss for s in range(2)]
                       + [engine.adapter_state()])
    assert results[0][:2] == results[1][:2]
    assert all(torch.equal(results[0][2][k], results[1][2][k]) for k in results[0][2])


def _odd_tensors():
    g = torch.Generator().manual_seed(3)
    # 5M floats: larger than the 16 MiB bounce buffer, and no size a multiple of 4096
    return {"big": torch.randn(5_000_001, generator=g), "small": torch.randn(3, 7, generator=g),
            "half": torch.randn(11, generator=g).to(torch.bfloat16)}


def test_direct_io_writes_the_same_bytes_and_reads_them_back(tiny_store):
    tensors = _odd_tensors()
    direct = tiny_store.write_file("x-direct.safetensors", tensors, direct=True)
    cached = tiny_store.write_file("x-cached.safetensors", tensors, direct=False)
    assert (tiny_store.path / direct.file).read_bytes() == (tiny_store.path / cached.file).read_bytes()
    assert (direct.nbytes, direct.crc32) == (cached.nbytes, cached.crc32)
    fresh = BlockStore.open(tiny_store.path)  # reads with a full crc check, through the page cache
    for store in (tiny_store, fresh):
        back = store.read_file(direct, verify="always")
        assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_direct_io_read_notices_a_grown_or_cut_file(tiny_store):
    rec = tiny_store.write_file("x.safetensors", _odd_tensors(), direct=True)
    path = tiny_store.path / rec.file
    data = path.read_bytes()
    path.write_bytes(data + b"\0" * 5000)
    with pytest.raises(ChecksumError, match="size differs"):
        tiny_store.read_file(rec)
    path.write_bytes(data[:-10])
    with pytest.raises(ChecksumError, match="size differs"):
        tiny_store.read_file(rec)


def test_direct_io_falls_back_where_the_file_system_refuses_it(tiny_store):
    """tmpfs answers O_DIRECT with EINVAL: the page cache is used instead, same bytes."""
    def no_direct(path, mode="r", **kw):
        if kw.get("opener") is open_new_direct:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return open(path, mode, **kw)

    tensors = _odd_tensors()
    tiny_store.opener = no_direct
    rec = tiny_store.write_file("x.safetensors", tensors, direct=True)
    back = BlockStore.open(tiny_store.path).read_file(rec)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    again = tiny_store.read_file(rec, direct=True)  # asked for direct reads: the same fallback
    assert all(torch.equal(again[k], v) for k, v in tensors.items())


def test_aligned_buffers():
    """Direct IO wants 4 KiB-aligned buffers; from 2 MiB up they start on a huge-page boundary
    (and ask for transparent huge pages, which only the kernel can grant)."""
    from blocktune.store.fileio import aligned_empty

    for n in (1, 4096, 100_000, (2 << 20) - 1):
        assert aligned_empty(n).data_ptr() % 4096 == 0 and aligned_empty(n).numel() == n
    for n in (2 << 20, (3 << 20) + 5):
        buf = aligned_empty(n)
        assert buf.data_ptr() % (2 << 20) == 0 and buf.numel() == n
        buf.fill_(7)  # all of it is writable memory
        assert int(buf[-1]) == 7


def test_buffer_pool_reuses_a_buffer_only_when_nothing_views_it():
    pool = BufferPool(max_bytes=1 << 20)
    a = pool.take(10_000)
    assert a.data_ptr() % 4096 == 0
    view = a[100:200].view(torch.float32)
    del a
    b = pool.take(10_000)  # the first is still viewed: a new buffer
    assert b.data_ptr() != view.data_ptr() - 100
    first = view.data_ptr() - 100
    del view
    c = pool.take(9_000)  # now free (and not too big for 9,000 bytes): reused
    assert c.data_ptr() == first
    assert pool.take(1_000).data_ptr() not in (first, b.data_ptr())  # 10,000 > 2 x 1,000: not reused


def test_buffer_pool_keeps_idle_buffers_only_up_to_its_busiest_moment():
    pool = BufferPool(max_bytes=25_000)
    a, b = pool.take(10_000), pool.take(10_000)
    del a
    c = pool.take(12_000)  # 10,000 + 10,000 + 12,000 > 25,000 (the cap, and more than was ever in use): a goes
    assert sorted(buf.numel() for buf, _ in pool._bufs) == [10_000, 12_000]
    del c
    d = pool.take(30_000)  # 40,000 in use with b: the idle 12,000 must go to make room under that
    assert sorted(buf.numel() for buf, _ in pool._bufs) == [10_000, 30_000] and pool.high_water == 40_000
    assert b.numel() == 10_000  # in use all along: kept
    del d
    e = pool.take(25_000)  # reuses d's buffer (no more than twice its size): nothing new
    made = pool.allocated
    f = pool.take(5_000)  # nothing idle: made, and 45,000 is the new busiest moment
    assert pool.allocated == made + 1 and pool.high_water == 45_000 and e.numel() == 25_000
    del b, e, f
    pool.take(39_000)  # all idle: let go oldest first until 39,000 more fits under 45,000
    assert [buf.numel() for buf, _ in pool._bufs] == [5_000, 39_000]


def test_cold_advice_on_mapped_units_is_only_a_hint(tiny_store):
    """advise_cold runs on every eviction of a mapped unit: the data must stay intact."""
    from blocktune.machine.hostmem import advise_cold

    rec = tiny_store.record("block_00")
    mapped = tiny_store.read_file(rec, map_file=True)
    copied = {k: v.clone() for k, v in mapped.items()}
    advise_cold(mapped.values())
    advise_cold([])
    assert all(torch.equal(mapped[k], copied[k]) for k in copied)


def test_deleted_versions_are_forgotten(tiny_args, tmp_path):
    """A long full fine-tune writes two files per unit per step; what the store remembers of
    them (checked, written with direct IO) must not grow with the run."""
    store = make_store(tmp_path / "s", tiny_args, seed=1)
    engine = Engine(store, EngineConfig(method="full", device="cpu"))
    for s in range(4):
        engine.train_step([random_batch(tiny_args, seed=s)])
    engine.close()
    on_disk = {p.name for p in store.path.iterdir()}
    assert store._uncached and store._uncached <= on_disk
    assert store._verified <= on_disk


def test_frozen_units_stay_mapped_across_evictions(tiny_args, tmp_path):
    """LoRA on the CPU: an evicted unit's file stays mapped, so loading it again maps nothing
    new and hands compute the same memory; the steps equal those of an engine that holds every
    unit, and closing the engine lets the mappings go."""
    store = make_store(tmp_path / "s", tiny_args, seed=1)
    maps = []
    original = store._map
    store._map = lambda *a: maps.append(a[0].name) or original(*a)
    unit = max(store.unit_bytes(u) for u in store.units)
    paged = Engine(store, EngineConfig(method="lora", device="cpu", device_budget=2 * unit))
    whole = Engine(BlockStore.open(store.path), EngineConfig(method="lora", device="cpu"))
    first = paged.train_step([random_batch(tiny_args, seed=0)])
    assert sorted(maps) == sorted(store.record(u).file for u in store.units)  # each file once
    ptr = paged.pager.get("block_01")["attention.wq.weight"].data_ptr()
    module = paged._module("block_01", training=True)
    second = paged.train_step([random_batch(tiny_args, seed=1)])
    assert len(maps) == len(store.units) and paged.pager.stats.unit_reads > 2 * len(store.units)
    assert paged.pager.get("block_01")["attention.wq.weight"].data_ptr() == ptr
    assert paged._module("block_01", training=True) is module  # evicted and paged in again: not rebuilt
    assert not paged.pager._advise_cold  # a store of kilobytes: no memory pressure to prepare for
    for s, r in enumerate((first, second)):
        assert r.loss == whole.train_step([random_batch(tiny_args, seed=s)]).loss
    assert all(torch.equal(a, b) for a, b in zip(paged.adapter_params(), whole.adapter_params()))
    paged.close()
    assert not paged.pager.loader._maps


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore/madvise residency is Linux-only")
def test_reclaimed_pages_of_a_mapped_unit_are_faulted_back(tiny_store):
    """What the kernel reclaimed of a kept mapping (here: paged out on purpose) is found and
    faulted back in before compute reads it; the data is unchanged."""
    import ctypes

    from blocktune.machine.hostmem import _libc, _page_span, ensure_resident

    mapped = tiny_store.read_file(tiny_store.record("block_00"), map_file=True)
    copied = {k: v.clone() for k, v in mapped.items()}
    assert ensure_resident(mapped.values()) == 0  # mapped pre-faulted: nothing missing
    start, length = _page_span(mapped.values())
    if _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), ctypes.c_int(21)) != 0:
        pytest.skip("this kernel has no MADV_PAGEOUT (Linux 5.4+) to reclaim the pages with")
    assert ensure_resident(mapped.values()) > 0
    assert ensure_resident(mapped.values()) == 0
    assert all(torch.equal(mapped[k], copied[k]) for k in copied)


def test_direct_reads_of_frozen_units_match_mapped_ones(tiny_args, tmp_path):
    """LoRA with frozen units read past the page cache (what "auto" picks for a store bigger
    than RAM) trains exactly as with mapped units; after the first step every read lands in a
    reused buffer."""
    store = make_store(tmp_path / "s", tiny_args, seed=1)
    unit = max(store.unit_bytes(u) for u in store.units)
    runs = {}
    for mode in ("mapped", "direct"):
        engine = Engine(BlockStore.open(store.path),
                        EngineConfig(method="lora", device="cpu", device_budget=2 * unit, frozen_reads=mode))
        assert engine.pager.mapped == (mode == "mapped")
        losses = [engine.train_step([random_batch(tiny_args, seed=0)]).loss]
        if mode == "direct":
            made = engine.pager._pool.allocated
        losses += [engine.train_step([random_batch(tiny_args, seed=s)]).loss for s in (1, 2)]
        if mode == "direct":
            assert engine.pager._pool.allocated == made and engine.pager.stats.unit_reads > 3 * len(store.units)
        runs[mode] = losses, [p.detach().clone() for p in engine.adapter_params()]
        engine.close()
    assert runs["mapped"][0] == runs["direct"][0]
    assert all(torch.equal(a, b) for a, b in zip(runs["mapped"][1], runs["direct"][1]))


def test_auto_frozen_reads_follow_the_memory_available(tiny_store):
    from blocktune.machine.hostmem import host_memory_available

    available = host_memory_available()
    if available is None:
        pytest.skip("no /proc/meminfo here: auto keeps mapped reads")
    assert 0 < available < 1 << 50
    assert Engine(tiny_store, EngineConfig(method="lora", device="cpu")).pager.mapped  # KBs: fits
    with pytest.raises(Exception, match="frozen_reads"):
        EngineConfig(frozen_reads="fast")


def test_row_pieces_are_written_as_the_joined_tensor(tmp_path):
    """Meta's dim-0 slices are written one after another, never joined in memory: the file is
    byte for byte the one the joined tensor gives, and pieces that disagree are refused."""
    from blocktune.store.fileio import RowPieces, write_tensors

    g = torch.Generator().manual_seed(0)
    pieces = [torch.randn(3, 5, generator=g), torch.randn(4, 5, generator=g)]
    norm = torch.randn(5, generator=g)
    files = {}
    for name, value in (("joined", torch.cat(pieces, 0)), ("pieces", RowPieces(pieces))):
        with open(tmp_path / name, "wb") as f:
            files[name] = write_tensors(f, {"w": value, "norm": norm})
    assert files["joined"] == files["pieces"]  # size, crc32 and layout
    assert (tmp_path / "joined").read_bytes() == (tmp_path / "pieces").read_bytes()
    assert all(a.equal(b.to(torch.bfloat16)) for a, b in zip(RowPieces(pieces).to(torch.bfloat16).pieces, pieces))
    with pytest.raises(StoreError, match="differ"):
        RowPieces([torch.zeros(2, 5), torch.zeros(2, 4)])


def test_a_unit_updated_in_place_is_written_from_its_own_buffer(tiny_store, monkeypatch):
    """A unit read into an aligned buffer and changed in place is its own next file: written
    from there with direct IO (no bounce copy), byte for byte what the copying path writes."""
    from blocktune.store import unitfiles as store_mod
    from blocktune.store.fileio import aligned_empty, file_image

    tensors = tiny_store.read_file(tiny_store.record("block_00"), alloc=aligned_empty, direct=True)
    assert file_image(tensors) is not None
    tensors["attention.wq.weight"].mul_(2)
    copies = {k: v.clone() for k, v in tensors.items()}
    assert file_image(copies) is None  # each in its own memory
    assert file_image({**tensors, "ffn_norm.weight": copies["ffn_norm.weight"]}) is None  # one moved
    assert file_image({k: v for k, v in tensors.items() if k != "ffn_norm.weight"}) is None  # header differs
    a = tiny_store.write_file("a.safetensors", tensors, direct=True)
    b = tiny_store.write_file("b.safetensors", copies, direct=True)
    assert (a.nbytes, a.crc32, a.tensors) == (b.nbytes, b.crc32, b.tensors)
    assert (tiny_store.path / a.file).read_bytes() == (tiny_store.path / b.file).read_bytes()

    images, original = [], store_mod.write_image
    monkeypatch.setattr(store_mod, "write_image", lambda f, image, t: images.append(1) or original(f, image, t))
    unit = max(tiny_store.unit_bytes(u) for u in tiny_store.units)
    engine = Engine(tiny_store, EngineConfig(method="full", device="cpu", device_budget=2 * unit))
    engine.train_step([random_batch(PRESETS["tiny-7b"], seed=0)])  # first step: fresh AdamW state
    images.clear()
    engine.train_step([random_batch(PRESETS["tiny-7b"], seed=1)])
    # every unit, in place (its optimizer state is written as its pieces are made)
    assert len(images) == len(tiny_store.units)
    engine.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_rss_of_a_child_is_its_own():
    """ru_maxrss survives exec: a child spawned by a big parent would report the parent's
    peak. peak_rss_bytes reads the child's own high-water mark."""
    import subprocess

    big = torch.ones(1 << 28)  # 1 GiB, touched
    code = "from blocktune.machine.hostmem import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0 < child < big.numel() * big.element_size()


def test_mapped_units_are_advised_cold_when_memory_is_short(tiny_args, tmp_path, monkeypatch):
    """Where the store is more than half the memory available, evicted units' pages are advised
    cold (reclaimed first); the steps are the same either way."""
    from blocktune.machine import devices
    from blocktune.paging import pager

    store = make_store(tmp_path / "s", tiny_args, seed=1)
    unit = max(store.unit_bytes(u) for u in store.units)
    advised = []
    monkeypatch.setattr(pager, "advise_cold", lambda tensors: advised.append(1) or devices.advise_cold(tensors))
    losses = {}
    for short in (False, True):
        if short:
            monkeypatch.setattr(pager, "host_memory_available", lambda: store.total_bytes())
        engine = Engine(BlockStore.open(store.path), EngineConfig(method="lora", device="cpu",
                                                                  device_budget=2 * unit, frozen_reads="mapped"))
        assert engine.pager._advise_cold == short
        losses[short] = [engine.train_step([random_batch(tiny_args, seed=s)]).loss for s in range(2)]
        engine.close()
        assert bool(advised) == short
    assert losses[False] == losses[True]


def test_a_flipped_byte_in_the_tokenizer_is_named(tmp_path, tiny_args):
    """The tokenizer changes every token: `verify` and every command that loads it name it."""
    from blocktune.formats.tokenizer import Tokenizer
    from blocktune_bench.corpus import tokenizer_path

    store = make_store(tmp_path / "s", tiny_args, seed=1, tokenizer=tokenizer_path())
    assert store.verify() == [] and store.tokenizer_path.is_file()
    path = store.path / "tokenizer.model"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    problems = BlockStore.open(store.path).verify()
    print(problems)
    assert len(problems) == 1 and "tokenizer.model: checksum mismatch" in problems[0]
    with pytest.raises(ChecksumError, match="tokenizer.model"):
        Tokenizer(BlockStore.open(store.path).tokenizer_path)


def test_reader_time_counts_the_disk_read(tiny_store, monkeypatch):
    """The pager's read_seconds (the benchmark's 'reader thread busy') includes reading a
    unit's file, not only its copy to the device (it had dropped the read: 0.0 s for a 7B
    step that read 25.6 GB)."""
    real = tiny_store.read_unit

    def slow(*a, **kw):
        time.sleep(0.02)
        return real(*a, **kw)

    monkeypatch.setattr(tiny_store, "read_unit", slow)
    engine = Engine(tiny_store, EngineConfig(method="lora", device="cpu", frozen_reads="direct"))
    engine.train_step([random_batch(PRESETS["tiny-7b"], seed=0)])
    stats = engine.pager.stats
    assert stats.unit_reads > 0 and stats.read_seconds >= 0.02 * stats.unit_reads
    engine.close()


def _safetensors_file(tmp_path):
    """A file the safetensors library wrote (not ours), its tensors of three dtypes and sizes
    that do not end on a block, and its crc32 as zlib computes it."""
    import zlib

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3000, generator=g), "b.w": torch.randn(77, 129, generator=g).bfloat16(),
               "c": torch.arange(5, dtype=torch.int64), "d#0": torch.randn(1 << 20, generator=g)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    return path, tensors, zlib.crc32(path.read_bytes())


def test_streamed_tensors_match_the_safetensors_library(tmp_path):
    """`StreamedTensors` reads a file the safetensors library wrote, in file order with its crc32
    checked, or in any order without: every tensor equal to the library's own reading, each the
    reader's own to write; the last one taken can be taken again, an earlier one cannot."""
    from blocktune.store.fileio import StreamedTensors
    from safetensors.torch import load_file

    path, _, crc = _safetensors_file(tmp_path)
    want = load_file(str(path))
    size = path.stat().st_size
    for order, check in [(None, True), (["d#0", "c", "a", "b.w"], False)]:
        got = StreamedTensors(path, size, crc, order, check=check, ahead=1)  # one tensor ahead at most
        try:
            assert sorted(got) == sorted(want) and "a" in got and len(got) == 4
            for k in order or list(got):
                t = got[k]
                assert t.dtype == want[k].dtype and torch.equal(t, want[k])
                assert got[k] is t  # the last one taken, again
                t.zero_()  # its own memory, not a read-only mapping
            with pytest.raises(KeyError, match="already taken"):
                got[(order or list(got))[0]]
        finally:
            got.close()
    with pytest.raises(ValueError):
        StreamedTensors(path, size, crc, ["d#0", "c", "a", "b.w"], check=True)


def test_streamed_tensors_raise_a_damaged_file_instead_of_its_last_tensor(tmp_path):
    """A flipped byte (or a cut file) is found when the last tensor is read: taking that
    tensor raises a ChecksumError that names the file, so a step that streams a damaged state
    file never finishes writing the next one."""
    from blocktune.store.fileio import StreamedTensors

    path, _, crc = _safetensors_file(tmp_path)
    size = path.stat().st_size
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    in_file = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    data[8 + n + header["d#0"]["data_offsets"][0] + 5] ^= 1  # a byte of "d#0", not the last tensor
    path.write_bytes(bytes(data))
    assert in_file[-1] != "d#0"
    got = StreamedTensors(path, size, crc, check=True)
    try:
        for k in in_file[:-1]:  # read before the whole file is: handed over (and checked after)
            got[k]
        with pytest.raises(ChecksumError, match="t.safetensors"):
            got[in_file[-1]]
    finally:
        got.close()
    StreamedTensors(path, size, crc, check=False).close()  # unchecked: no complaint
    path.write_bytes(bytes(data[:-100]))
    got = StreamedTensors(path, size, crc, check=False)
    try:
        with pytest.raises(ChecksumError, match="shorter"):
            for k in list(got):
                got[k]
    finally:
        got.close()


def test_direct_writes_behind_the_caller_give_the_library_its_file(tiny_store):
    """A direct-IO write of more than the bounce buffer (the disk writing one half while the
    caller fills the other): the safetensors library reads back every byte."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(1)
    tensors = {"big": torch.randn(5 << 20, generator=g), "odd": torch.randn(12345, generator=g).bfloat16()}
    spec = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    rec = tiny_store.write_stream("behind.safetensors", spec, iter(tensors.values()), direct=True)
    back = load_file(str(tiny_store.path / rec.file))
    assert rec.nbytes > 16 << 20 and all(torch.equal(back[k], v) for k, v in tensors.items())


def test_pieces_read_and_stepped_in_place_are_written_from_where_they_lie(tiny_store):
    """A state file streamed back with direct IO, its pieces changed in place and written to
    the next file of the same layout: each piece lies in memory as it will in the file, so it
    goes to the disk from its own memory (no copy through the bounce buffer); the safetensors
    library reads back every byte, the odd-sized tensors' too."""
    from blocktune.store.fileio import AlignedWriter, StreamedTensors, open_new_direct, write_stream
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(2)
    tensors = {"step": torch.tensor(3.0), "a#0": torch.randn(3 << 20, generator=g),
               "norm#0": torch.randn(1536, generator=g), "b#0": torch.randn(2 << 20, generator=g)}
    spec = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    first = tiny_store.write_stream("s1.safetensors", spec, iter(tensors.values()), direct=True)
    pieces = StreamedTensors(tiny_store.path / first.file, first.nbytes, first.crc32, check=True)

    def stepped():
        for k, _, _ in spec:
            yield pieces[k].add_(1)

    try:
        with open(tiny_store.path / "s2.safetensors", "wb", buffering=0, opener=open_new_direct) as f:
            out = AlignedWriter(f, behind=True)
            try:
                nbytes, _, _ = write_stream(out, spec, stepped())
                out.finish(nbytes)
            finally:
                out.settle()
    finally:
        pieces.close()
    back = load_file(str(tiny_store.path / "s2.safetensors"))
    assert all(torch.equal(back[k], v + 1) for k, v in tensors.items())
    # a's 12 MiB and b's 8 MiB, less the blocks they start in and end in (the norm misaligns b)
    assert out.uncopied >= (5 << 22) - 4 * 4096, out.uncopied


def test_a_failed_write_behind_surfaces_and_leaves_nothing_in_flight():
    """The disk failing on the half written behind the caller (a full disk): the error comes
    out of the writer's next call, and `settle` leaves no write in flight."""
    from blocktune.store.fileio import AlignedWriter

    class FullDisk:
        def __init__(self):
            self.written = 0

        def write(self, mv):
            time.sleep(0.01)
            if self.written >= 8 << 20:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(mv)
            return len(mv)

    disk = FullDisk()
    out = AlignedWriter(disk, behind=True)
    with pytest.raises(OSError, match="No space"):
        for _ in range(8):
            out.write(bytes(4 << 20))
        out.finish(32 << 20)
    out.settle()
    time.sleep(0.05)
    assert disk.written == 8 << 20  # the half before the failure, and nothing since


# ---- spare files: a full fine-tune writes each version over the one two steps back ----

def _adamw_engine(store: BlockStore) -> Engine:
    from blocktune import OptimizerConfig

    return Engine(store, EngineConfig(method="full", device="cpu", optimizer=OptimizerConfig("adamw", 1e-3)))


def _versions(store: BlockStore) -> dict[str, int]:
    """Each file the manifest names: its inode."""
    return {f: (store.path / f).stat().st_ino for f in store.referenced_files() if f.endswith(".safetensors")}


def _wait_for_spares(store: BlockStore, n: int) -> None:
    """The collection after a commit runs on the writer thread: wait until it kept `n` spares."""
    deadline = time.monotonic() + 30
    while len(store.spares) < n:
        assert time.monotonic() < deadline, f"{len(store.spares)} spares, not {n}"
        time.sleep(0.01)


def test_later_versions_are_written_over_the_files_two_steps_back(tiny_args, tmp_path, monkeypatch):
    """Deleted and made anew, a step's 2 files a unit cost the disk their discards and
    allocations (1.2-1.8 against 2.4 GB/s, `store.spares`). From the third step on, each new
    version is the file of the version two steps back, written over: no version file is deleted
    while the run goes on, the weights are bit for bit those of a run that makes every file
    anew, and the run's end leaves only the committed step."""
    import os

    from blocktune.store.spares import SpareFiles, version_kind

    def run(path, recycle: bool):
        store = make_store(path, tiny_args, seed=1)
        engine = _adamw_engine(store)
        unlinked, real = [], os.unlink

        def spy(p, *a, **kw):
            unlinked.append(os.path.basename(p))
            return real(p, *a, **kw)

        with monkeypatch.context() as m:
            m.setattr(os, "unlink", spy)
            if not recycle:
                m.setattr(SpareFiles, "keep", lambda self, name: False)
            engine.train_step([random_batch(tiny_args, seed=0)])
            first = _versions(store)
            for s in range(1, 4):
                engine.train_step([random_batch(tiny_args, seed=s)])
                if s == 2:
                    third = _versions(store)
            running = list(unlinked)  # deleted while the run went on
            engine.close()
        crcs = {u: (store.record(u).crc32, store.state_record(u).crc32) for u in store.units}
        assert {p.name for p in store.path.iterdir()} - {LOCK_DIR} == BlockStore.open(store.path).referenced_files()
        return crcs, [f for f in running if version_kind(f)], first, third

    crcs, deleted, first, third = run(tmp_path / "spares", True)
    fresh, fresh_deleted, _, _ = run(tmp_path / "fresh", False)
    assert crcs == fresh
    assert deleted == []  # (the last versions kept go at the run's end)
    assert sorted(third.values()) == sorted(first.values())  # step 3's files are step 1's
    assert len(fresh_deleted) >= 2 * 2 * len(crcs)  # made anew: the old versions were deleted


def test_a_spare_swapped_for_a_link_is_never_written_through(tiny_args, tmp_path):
    """A link put where a spare lay (between two steps): the step writes a new file instead, the
    link's target keeps its bytes, and the weights are those of a run left alone."""
    def run(path, swap: bool):
        store = make_store(path, tiny_args, seed=1)
        engine = _adamw_engine(store)
        for s in range(2):
            engine.train_step([random_batch(tiny_args, seed=s)])
        _wait_for_spares(store, 2 * len(store.units))
        if swap:
            for name in store.spares.names():
                target = tmp_path / f"precious-{name}"
                target.write_bytes(b"not the store's")
                (store.path / name).unlink()
                (store.path / name).symlink_to(target)
        engine.train_step([random_batch(tiny_args, seed=2)])
        engine.close()
        assert BlockStore.open(store.path).verify() == []
        return {u: store.record(u).crc32 for u in store.units}

    assert run(tmp_path / "swapped", True) == run(tmp_path / "left", False)
    targets = list(tmp_path.glob("precious-*"))
    assert len(targets) == 2 * 6 and all(t.read_bytes() == b"not the store's" for t in targets)
    assert not any(p.is_symlink() for p in (tmp_path / "swapped").iterdir())


def test_a_live_readers_versions_are_never_written_over(tiny_args, tmp_path):
    """A reader opened after step 2 pins step 2's files: the writer's later steps neither delete
    them nor take them as spares, and the reader's step stays intact."""
    store = make_store(tmp_path / "s", tiny_args, seed=1)
    engine = _adamw_engine(store)
    for s in range(2):
        engine.train_step([random_batch(tiny_args, seed=s)])
    reader = BlockStore.open(store.path)
    assert reader.step == 2
    for s in range(2, 6):
        engine.train_step([random_batch(tiny_args, seed=s)])
    engine.close()
    assert reader.verify() == []
    reader.close()
