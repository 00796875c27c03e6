"""The lean heap (`blocktune.machine.hostmem.LeanHeap`): what freed tensors leave in glibc's heap
goes back to the OS once it passes the slack, not before (a trim before every unit cost a step
at the 7B shape 7 M page faults)."""

import ctypes
import ctypes.util

import pytest
from blocktune import Engine, EngineConfig, OptimizerConfig
from blocktune.machine.hostmem import LeanHeap, resident_anon_bytes
from blocktune.model.args import LoraConfig
from conftest import random_batch

MiB = 1 << 20
pytestmark = pytest.mark.skipif(resident_anon_bytes() is None or not hasattr(
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim"), reason="needs Linux and glibc")


def _heap_garbage(nbytes: int) -> bytearray:
    """Leave `nbytes` of freed, touched memory in the heap (pieces below glibc's mmap threshold),
    held in place by a last piece at its top; returns that piece."""
    pieces = [bytearray(b"x" * (96 * 1024)) for _ in range(nbytes // (96 * 1024))]
    top = pieces.pop()
    del pieces
    return top


def test_freed_heap_goes_back_past_the_slack_and_not_before():
    heap = LeanHeap(slack=64 * MiB)
    heap.between_units()  # the first call trims: the base
    base, trims = resident_anon_bytes(), heap.trims
    keep = [_heap_garbage(32 * MiB)]
    heap.between_units()  # under the slack: left as it is, for the next unit to reuse
    assert heap.trims == trims and resident_anon_bytes() > base + 24 * MiB
    keep.append(_heap_garbage(128 * MiB))
    assert resident_anon_bytes() > base + 96 * MiB
    heap.between_units()  # past it: given back
    assert heap.trims == trims + 1 and resident_anon_bytes() < base + 16 * MiB


def test_without_a_slack_the_heap_is_trimmed_before_every_unit_but_a_kept_graphs():
    """A full fine-tune's heap (big tensors mapped fresh): trimmed before every unit, but not
    before the backward through a graph the forward kept (it allocates little but gradients,
    which are mapped); with a slack, the backward's kept graphs count as any unit."""
    heap = LeanHeap(slack=0)
    assert heap.maps_big
    heap.between_units()
    keep = [_heap_garbage(8 * MiB)]
    base = resident_anon_bytes()
    heap.between_units(graph_kept=True)
    assert heap.trims == 1 and resident_anon_bytes() > base - 4 * MiB
    heap.between_units()
    assert heap.trims == 2 and resident_anon_bytes() < base - 4 * MiB and keep
    slack = LeanHeap(slack=64 * MiB)
    slack.between_units()
    keep.append(_heap_garbage(128 * MiB))
    slack.between_units(graph_kept=True)
    assert slack.trims == 2 and not slack.maps_big


@pytest.mark.parametrize("keep", [None, 0])
def test_the_heap_is_asked_before_every_unit_of_both_passes(tiny_store, tiny_args, keep):
    """LoRA, lean: before each unit's forward, and before each block's backward, the graph kept
    from the forward's (keep None) as the recomputed one's (keep 0). Left out of the backward's
    kept graphs, the 7B step's heap grew by 0.3 GB (cgroup peak 2.07 of 2.15 GB)."""
    engine = Engine(tiny_store, EngineConfig(method="lora", device="cpu", lean_memory=True, keep_budget=keep,
                                             lora=LoraConfig(rank=2), optimizer=OptimizerConfig("adamw", 1e-3)))
    asked = []
    engine.modules.heap.between_units = lambda graph_kept=False: asked.append(graph_kept)
    engine.train_step([random_batch(tiny_args, seed=0)])
    assert engine.modules.heap.slack == 0  # lean_memory with the budgets given: the old heap, big tensors mapped
    engine.close()
    blocks = tiny_args.n_layers
    # the forward's units (embed, the blocks, the head), then each block's backward
    assert len(asked) == (blocks + 2) + blocks, asked
    assert asked.count(True) == (blocks if keep is None else 0)
