"""Which units a rank's training step visits, in what order, and which of them pass a gradient
on to their input."""

from __future__ import annotations

__all__ = ["wants_dx", "UnitOrder"]


def wants_dx(i: int, full: bool) -> bool:
    """Whether unit i's backward passes a gradient on to its input: not into the
    embeddings' (tokens), nor (LoRA) into the frozen embeddings."""
    return i > 1 or (i == 1 and full)


class UnitOrder:
    """The passes of one step over this rank's units [lo, hi) of `units` (embed, blocks, head)."""

    def __init__(self, units: list[str], lo: int, hi: int, full: bool, interleave: bool):
        self.units, self.lo, self.hi, self.full = units, lo, hi, full
        # a stage whose units all stay resident takes each micro-batch through all of them
        self.interleave = interleave
        self.last = len(units) - 1  # the head
        self.has_head = hi > self.last

    @property
    def forward(self) -> range:
        """Embeddings and blocks this rank runs forward."""
        return range(self.lo, min(self.hi, self.last))

    @property
    def backward(self) -> range:
        """The blocks (full: and embeddings) this rank runs backward, last first; LoRA's
        embeddings have nothing to train."""
        first = max(0 if self.full else 1, self.lo)
        return range(min(self.hi, self.last) - 1, first - 1, -1)

    def pager_plan(self) -> list[str]:
        """The pager's plan: forward, head, backward and (LoRA) the next step's forward; a full
        fine-tune's next step reads units not committed yet, so its plan ends with this step."""
        forward = list(self.forward)
        head = [self.last] if self.has_head else []
        indices = forward + head + list(self.backward) + ([] if self.full else forward)
        return [self.units[i] for i in indices]

    def visits(self, units: range, M: int) -> list[tuple[int, int]]:
        """(unit, micro-batch) in the order the passes visit them: block-major (every
        micro-batch through a unit while it is resident), or, on a pipeline stage whose units all
        stay resident, micro-batch-major, so that each micro-batch goes on to the next stage as
        soon as it is through this one's units (GPipe's fill and drain; one read per unit still)."""
        if self.interleave:
            return [(i, m) for m in range(M) for i in units]
        return [(i, m) for i in units for m in range(M)]

    def wants_dx(self, i: int) -> bool:
        return wants_dx(i, self.full)
