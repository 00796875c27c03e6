"""Deterministic dropout streams, and their replay.

Each micro-batch of each optimizer step draws its dropout masks from its own stream, seeded
from (seed, step, micro-batch). That makes the masks independent of the order in which
units and micro-batches are processed: the in-memory reference runs micro-batch by
micro-batch, the paged engine unit by unit, and both draw the same masks. It also makes a
resumed run draw exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib

from blocktune.machine.devices import Device

__all__ = ["stream_seed", "seed_micro_batch"]


def stream_seed(seed: int, step: int, micro: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{step}/{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seed_micro_batch(device: Device, seed: int, step: int, micro: int) -> None:
    """Point every generator a forward pass draws from at this micro-batch's stream."""
    device.manual_seed(stream_seed(seed, step, micro))
