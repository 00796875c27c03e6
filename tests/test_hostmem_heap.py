"""The lean heap (`blocktune.machine.hostmem.LeanHeap`): what freed tensors leave in glibc's heap
goes back to the OS once it passes the slack, not before (a trim before every unit cost a step
at the 7B shape 7 M page faults)."""

import ctypes
import ctypes.util

import pytest
from blocktune.machine.hostmem import LeanHeap, resident_anon_bytes

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
    heap = LeanHeap(map_big=False, slack=64 * MiB)
    heap.between_units()  # the first call trims: the base
    base, trims = resident_anon_bytes(), heap.trims
    keep = [_heap_garbage(32 * MiB)]
    heap.between_units()  # under the slack: left as it is, for the next unit to reuse
    assert heap.trims == trims and resident_anon_bytes() > base + 24 * MiB
    keep.append(_heap_garbage(128 * MiB))
    assert resident_anon_bytes() > base + 96 * MiB
    heap.between_units()  # past it: given back
    assert heap.trims == trims + 1 and resident_anon_bytes() < base + 16 * MiB


def test_without_a_slack_the_heap_is_trimmed_before_every_unit():
    heap = LeanHeap(map_big=False, slack=0)
    heap.between_units()
    keep = [_heap_garbage(8 * MiB)]
    base = resident_anon_bytes()
    heap.between_units()
    assert heap.trims == 2 and resident_anon_bytes() < base - 4 * MiB and keep
