"""The paged engine: forward over units, then backward unit by unit in reverse.

One training step, for M micro-batches:

    forward   for each unit u = embed, block_00 … block_NN:
                  load u (the pager reads ahead meanwhile); for each micro-batch m:
                  stash m's input to u, note the RNG state, run u without a graph
    loss      head: per micro-batch, chunked cross-entropy and its gradient w.r.t. the head's
              input, chunk by chunk (never all vocab logits at once)
    backward  for each unit u in reverse: load u; for each micro-batch m:
                  restore the RNG state noted before u's forward, recompute u from its stashed
                  input with a graph, backward with the gradient from u+1, pass d(input) on;
              full fine-tune: the unit's optimizer step runs now and the unit is written back
    step      LoRA: one optimizer step over the (resident) adapters
              full: wait for the write-backs, switch the store's manifest to the new step

Every micro-batch goes through a unit while it is resident, so weights are read once per
optimizer step, whatever the accumulation. With pipeline stages (`blocktune.dist.pipeline`) a rank runs
only its own range of units: its inputs come from the stage before, its gradients go back to it.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from blocktune.dist.groups import SINGLE, DistContext
from blocktune.engine.config import EngineConfig
from blocktune.engine.fullstep import FullStep
from blocktune.engine.handles import WeightHandles
from blocktune.engine.inference import Inference
from blocktune.engine.loss import check_batches, chunked_cross_entropy, count_targets, loss_chunk
from blocktune.engine.modules import UnitModules
from blocktune.engine.optim import state_kinds
from blocktune.engine.order import UnitOrder
from blocktune.engine.recompute import skip_unread_product
from blocktune.engine.rng import seed_micro_batch
from blocktune.engine.stagelink import StageLink
from blocktune.errors import ConfigError, StoreError, TrainingError
from blocktune.machine.devices import Device, resolve_device
from blocktune.machine.hostmem import LeanHeap
from blocktune.model.args import LoraConfig, ModelArgs
from blocktune.model.llama import KVCache
from blocktune.model.lora import LoraAdapters
from blocktune.paging.budgets import AUTO, Budgets, working_set
from blocktune.paging.budgets import resolve as resolve_budgets
from blocktune.paging.pager import Pager, resident_sizes
from blocktune.paging.spill import ActivationSpill, SpillHandles
from blocktune.paging.stash import ActivationStash
from blocktune.store.narrowed import NarrowedCopy
from blocktune.store.store import BlockStore

__all__ = ["EngineConfig", "Engine", "StepResult"]


@dataclass
class StepResult:
    loss: float
    tokens: int
    seconds: float
    bytes_read: int
    bytes_written: int
    kept_units: int = 0  # units whose backward used kept activations instead of a recompute
    units_read: list = field(default_factory=list)  # the units read from the store, in model order
    load_wait_seconds: float = 0.0  # the compute waiting for units to load (what reading ahead did not hide)
    demand_reads: int = 0  # units read only when asked for (not read ahead)
    spilled_units: int = 0  # of those, units whose activations went to disk and back (`paging.spill`)


@dataclass
class _StepRun:
    """What one step's forward leaves for its backward."""
    stash: ActivationStash  # block inputs to recompute from
    replay: dict  # (unit, micro-batch) -> RNG state before the unit's forward
    kept: dict  # (unit, micro-batch) -> (input, output) of a graph kept from the forward
    kept_mods: dict  # full fine-tune: unit -> the module its kept graphs use
    spilled: dict = field(default_factory=dict)  # unit -> its SpillHandles: kept graphs whose activations are on disk
    spilled_units: int = 0
    kept_at_start: dict = field(default_factory=dict)  # kept's keys after the forward (the count)
    shapes: list = field(default_factory=list)  # each micro-batch's (batch, seq)
    head: nn.Module | None = None  # the head module between the loss and its step


# a full fine-tune reads a narrowed copy (`Engine._narrows_steps`) only where the device budget
# holds this many units
NARROW_STEPS_UNITS = 4


class Engine:
    """Runs a model held in a `BlockStore` one unit at a time: training here, forward-only
    passes for evaluation and generation through its `Inference`. Its parts: the stage link
    (which units are this rank's), the pager, the unit modules, the step's unit order and,
    for a full fine-tune, the per-unit step."""

    def __init__(self, store: BlockStore, cfg: EngineConfig | None = None,
                 adapters: dict[str, torch.Tensor] | None = None, dist: DistContext = SINGLE,
                 args: ModelArgs | None = None):  # args: the store's, or a run's copy (dropout)
        self.store, self.cfg, self.dist = store, cfg or EngineConfig(), dist
        self.args: ModelArgs = args or store.args
        self.loss_chunk = loss_chunk(self.args.vocab_size, self.cfg.loss_chunk,  # positions per chunk of the loss
                                     head_trains=self.cfg.method == "full" and not self.cfg.read_only)
        if problems := store.shape_problems():  # a damaged model field: named, not a state-dict error
            raise StoreError(problems[0])
        self.device: Device = resolve_device(self.cfg.device)
        # the dtype and the line that says why ("compute bf16 (auto: this CPU has avx512_bf16)")
        self.dtype, self.dtype_note = self.device.resolve_dtype(self.cfg.compute_dtype)
        full = self.cfg.method == "full"
        self._reads = store  # the store the pager reads: this one, or its narrowed copy (`_use_narrowed`)
        self.units = store.units
        self.stage = StageLink(dist, store, full, self.args.dim, self.dtype, self.device.torch)
        self.lo, self.hi = self.stage.lo, self.stage.hi
        own = self.units[self.lo:self.hi]
        # frozen embeddings and head stay in the stored dtype (bf16): the embedding reads a few
        # rows, the head widens its matrix a slice at a time; widened whole, Llama 3's 128k
        # vocabulary is 2.1 GB per unit in fp32
        frozen = not full or self.cfg.read_only
        as_stored = (frozenset({"embed", "head"}) if frozen and store.dtype.itemsize < self.dtype.itemsize
                     else frozenset())
        sizes = {n: b for n, b in resident_sizes(store, self.dtype, as_stored, self.device).items()
                 if n in own}
        # the adapters this run trains (None: a full fine-tune, or read-only without an adapter)
        self.lora: LoraConfig | None = self.cfg.lora if self.cfg.method == "lora" else None
        self.budgets: Budgets = self._resolve_budgets(sizes, own)
        self.adapters: LoraAdapters | None = None
        if self.lora is not None:  # before any copy is made: a wrong adapter fails at once
            self.adapters = LoraAdapters(self.args, self.lora, self.units[1:-1], self.device.torch, self.cfg.seed,
                                         adapters, self.cfg.optimizer, keep=own)
        self._narrowed: NarrowedCopy | None = None  # the copy read instead of the store (`_use_narrowed`)
        self.narrow_note: str | None = None
        if self._narrows(frozen, sizes) or self._narrows_steps(full, sizes):
            sizes = self._use_narrowed(store, as_stored, sizes, own)
        try:
            # lean: hand freed heap back to the OS between units (slower, less RSS: the heap of
            # many small activations fragments); asked for, or chosen where `auto` pages the units
            # through RAM (`Budgets.lean`)
            lean = (self.cfg.lean_memory or self.budgets.lean) and self.device.is_cpu
            heap = LeanHeap(self.budgets.heap_slack) if lean else None
            self.pager = self._open_pager(as_stored)
            # a stage whose units all stay resident takes each micro-batch through all of them
            self.interleave = (self.dist.stages > 1 and self.budgets.keep == 0
                               and sum(sizes.values()) <= self.pager.budget)
            self.order = UnitOrder(self.units, self.lo, self.hi, full, self.interleave)
            self.modules = UnitModules(self.args, self.pager, self.adapters, self.lora, heap=heap)
            self.full_step = (FullStep(self.modules, self.pager, self.cfg.optimizer, dist, store.tied)
                              if full else None)
            self.inference = Inference(self.args, self.units, self.modules, self.pager, self.stage, dist,
                                       self.dtype, self.device.torch, self.loss_chunk)
            self.step_count = store.step if full else 0
            # blocks past the RAM's keep budget: activations to disk and back where the budgets allow
            self.spill = (ActivationSpill(self.budgets.spill, [store.path, Path(tempfile.gettempdir())],
                                          self.budgets.spill_overlap) if self.budgets.spill else None)
        except BaseException:
            if self._narrowed is not None:  # no engine to close: the copy goes now
                self._narrowed.close()
            raise
        self._spill_estimate: dict[int, int] = {}  # unit -> its activations' bytes on disk last step

    def _resolve_budgets(self, sizes: dict[str, int], own: list[str]) -> Budgets:
        """The byte budgets (`blocktune.paging.budgets`) for this rank's units `own`, resident
        at `sizes`."""
        cfg, store = self.cfg, self.store
        batch, seq, micro = cfg.batch_hint
        # pipeline stages keep their own fast mode: micro-batches interleaved through resident
        # units (which needs the recompute), not activations kept
        keep = 0 if cfg.keep_budget == AUTO and self.dist.stages > 1 else cfg.keep_budget
        return resolve_budgets(
            self.device, store.args, sizes,
            {n: self._reads.unit_bytes(n) for n in own}, self.dtype,
            method=cfg.method, device_budget=cfg.device_budget, host_budget=cfg.host_budget,
            activation_budget=cfg.activation_budget, keep_budget=keep, batch=batch, seq=seq,
            spill_budget=cfg.spill_budget if self.dist.stages == 1 else 0,
            micro=micro, loss_chunk=self.loss_chunk, kv_cache=cfg.read_only,
            state_kinds=len(state_kinds(cfg.optimizer, store.dtype, self.dtype)),
            lora=self.lora)

    def _pager_budget(self) -> int | None:
        """The bytes of units the pager keeps resident (on a CPU, host RAM is the device: the
        smaller of the two budgets bounds residency)."""
        budget = self.budgets.device
        if self.device.host_is_device and self.budgets.host is not None:
            budget = min(b for b in (budget, self.budgets.host) if b is not None)
        return budget

    def _narrows(self, frozen: bool, sizes: dict[str, int]) -> bool:
        """Whether the frozen units are read from a copy in the compute dtype (`_use_narrowed`): asked
        for, on the CPU, one process, a store wider than the compute dtype, and units that do not
        all stay resident (so each is read, and converted, every pass)."""
        budget = self._pager_budget()
        return (self.cfg.narrow_frozen and frozen and self.device.is_cpu and not self.dist.enabled
                and self.store.dtype.itemsize > self.dtype.itemsize
                and budget is not None and sum(sizes.values()) > budget)

    def _narrows_steps(self, full: bool, sizes: dict[str, int]) -> bool:
        """Whether a full fine-tune reads its units from a copy in the compute dtype that each
        step's write-back keeps up to date (`_use_narrowed`): asked for, on the CPU, one process,
        a store wider than the compute dtype whose units are the fp32 masters, and units that do
        not all stay resident. The copy is the masters rounded as the step rounds its parameters,
        so the units computed with are the same; each pass reads half the bytes and converts none.
        Not where the budget holds under `NARROW_STEPS_UNITS` units: there the laptop-shaped
        store under a 1 GiB limit (a budget of two units) came within 4 MB of the limit reading
        the copy, and was killed in one run of two; converting each unit into the budget's slots
        it peaked 18 MB under it."""
        budget, store = self._pager_budget(), self.store
        return (self.cfg.narrow_steps and full and not self.cfg.read_only and self.device.is_cpu
                and not self.dist.enabled and store.dtype.itemsize > self.dtype.itemsize
                and "master" in state_kinds(self.cfg.optimizer, store.dtype, self.dtype)
                and budget is not None and sum(sizes.values()) > budget
                and budget >= NARROW_STEPS_UNITS * max(sizes.values()))

    def _use_narrowed(self, store: BlockStore, as_stored: frozenset[str], sizes: dict[str, int],
                      own: list[str]) -> dict[str, int]:
        """Make a narrowed copy (`NarrowedCopy`) the store the engine reads (LoRA; a full
        fine-tune reads it and steps the store itself, `_narrows_steps`), with the budgets
        worked out again for its files (the room for reads in flight shrinks); the resident
        sizes. A copy whose largest unit the pager's budget cannot hold (a budget set by hand
        within a header's bytes of the largest unit) is dropped again, and that is said."""
        full = self.cfg.method == "full"
        copy = NarrowedCopy(store, self.dtype, self.cfg.verify, full=full)
        self.narrow_note = copy.note
        if copy.store is None:
            return sizes
        was = self.budgets
        self._reads, self._narrowed = copy.store, copy
        if not full:
            self.store = copy.store
        new = {n: b for n, b in resident_sizes(copy.store, self.dtype, as_stored, self.device).items() if n in own}
        self.budgets = self._resolve_budgets(new, own)
        budget = self._pager_budget()
        if budget is not None and budget < max(new.values()):
            self.narrow_note = copy.unused(f"the copy's largest unit ({max(new.values()):,} bytes) is over the "
                                           f"device budget ({budget:,} bytes)")
            self.store, self._reads, self.budgets, self._narrowed = store, store, was, None
            return sizes
        return new

    def _open_pager(self, as_stored: frozenset[str]) -> Pager:
        """The pager within the device budget (`_pager_budget`)."""
        cfg, budget = self.cfg, self._pager_budget()
        return Pager(self._reads, self.device, budget, self.dtype, prefetch=cfg.prefetch,
                     verify=cfg.verify, host_budget=self.budgets.host,
                     mutable=cfg.method == "full" and not cfg.read_only,
                     max_dirty=cfg.max_dirty, frozen_reads=cfg.frozen_reads,
                     as_stored=as_stored, state_budget=self.budgets.state,
                     master=self.store if self._reads is not self.store else None)

    # ---- adapters ----
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Adapters as a flat dict with Meta-style names (``layers.3.attention.wq.lora_a``)."""
        return self.adapters.state() if self.adapters is not None else {}

    def load_adapters(self, flat: dict[str, torch.Tensor]) -> None:
        if self.adapters is None:
            raise ConfigError("this engine has no LoRA adapters (method is not lora)")
        self.adapters.load(flat)

    def adapter_params(self) -> list[nn.Parameter]:
        return self.adapters.params() if self.adapters is not None else []

    @property
    def lora_optimizer(self) -> torch.optim.Optimizer:
        if self.adapters is None:
            raise ConfigError("this engine has no LoRA adapters (method is not lora)")
        return self.adapters.optimizer

    # ---- forward-only passes (`blocktune.engine.inference`) ----
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits (B, T, vocab) of the whole model (materialised: for tests and short inputs)."""
        return self.inference.logits(tokens)

    def eval_loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
        """(mean cross-entropy, predicted positions) in eval mode, logits chunked."""
        return self.inference.eval_loss(tokens, targets)

    def new_caches(self, batch: int, max_len: int) -> list[KVCache]:
        return self.inference.new_caches(batch, max_len)

    def next_logits(self, tokens: torch.Tensor, caches: list[KVCache] | None, start: int) -> torch.Tensor:
        """Logits of the last position only, extending `caches` from position `start`."""
        return self.inference.next_logits(tokens, caches, start)

    def _module(self, unit: str, training: bool) -> nn.Module:
        """`unit`'s module (`UnitModules.get`)."""
        return self.modules.get(unit, training)

    # ---- training ----
    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
                   lr: float | None = None, step: int | None = None,
                   max_grad_norm: float | None = None) -> StepResult:
        """One optimizer step over `micro_batches` of (tokens, targets), each (B, T) int64.

        `max_grad_norm` clips the adapters' global gradient norm (LoRA only: a full fine-tune
        steps each unit before the global norm is known).
        """
        if self.cfg.read_only:
            raise ConfigError("this engine was opened read_only (for inference); it cannot train")
        full = self.cfg.method == "full"
        if full:
            self.store.acquire_writer()  # a second writer fails here, before anything is written
        t_start = time.perf_counter()
        before = self.pager.stats.snapshot()
        lr = self.cfg.optimizer.lr if lr is None else lr
        step = self.step_count if step is None else step
        dev = self.device
        check_batches(self.args, micro_batches)
        # the loss is a mean over the whole global batch: every rank divides by the same count
        n_tok = self.dist.sum_int(sum(count_targets(t) for _, t in micro_batches), dev)
        if n_tok == 0:
            raise TrainingError("every target of this step is masked; nothing to learn from")
        xs: list[torch.Tensor] = [tok.to(dev.torch) for tok, _ in micro_batches]
        targets = [t.to(dev.torch) for _, t in micro_batches]
        cursors = self._cursors(step, len(micro_batches))
        run = _StepRun(ActivationStash(self.budgets.activation), {}, {}, {}, shapes=[tuple(x.shape) for x in xs])
        self.pager.plan(self.order.pager_plan())
        try:
            loss = self._passes(run, xs, targets, cursors, n_tok, lr, step, max_grad_norm)
        except BaseException:
            if full:
                self.pager.abort_writes()
            raise
        finally:
            run.stash.clear()
        loss_value = float(loss)
        self.step_count = step + 1
        return self._result(loss_value, n_tok, time.perf_counter() - t_start, before, run)

    def _cursors(self, step: int, M: int) -> list:
        """Each micro-batch's RNG state at the start of its forward: its own dropout stream."""
        cursors = []
        for m in range(M):
            seed_micro_batch(self.device, self.cfg.seed, step, m * self.dist.dp_world + self.dist.dp_rank)
            cursors.append(self.device.get_rng_state())
        return cursors

    def _passes(self, run: _StepRun, xs: list[torch.Tensor], targets: list[torch.Tensor], cursors: list,
                n_tok: int, lr: float, step: int, max_grad_norm: float | None) -> torch.Tensor:
        """Forward, loss, backward and the step's end (full: the commit; LoRA: the adapters'
        step); the global loss."""
        self._forward(run, xs, cursors)
        loss, grads = self._loss(run, xs, targets, n_tok, cursors)
        loss = self.dist.sum_float(loss)  # every rank sees the global loss, and stops together
        if not bool(torch.isfinite(loss)):  # note: a host sync; before any weight changes
            raise TrainingError(f"loss is {float(loss)} at step {step}; nothing of this step "
                                "was applied (lower the learning rate, check the data)")
        self._backward(run, grads, lr, step)
        if self.full_step is not None:
            # the step's own figures go into its commit: a run killed before it logs them
            # recovers them on resume (blocktune.run.trainer)
            self.pager.commit(step + 1, keep_previous=self.dist.enabled,
                              last_step={"step": step + 1, "loss": float(loss), "tokens": n_tok, "lr": lr})
        else:
            self.adapters.step(lr, max_grad_norm, self.dist)
        return loss

    def _result(self, loss: float, n_tok: int, seconds: float, before: dict, run: _StepRun) -> StepResult:
        """The step's figures: the pager's counters now less `before` (its snapshot at the start)."""
        after = self.pager.stats
        return StepResult(loss, n_tok, seconds,
                          after.bytes_read - before["bytes_read"],
                          after.bytes_written - before["bytes_written"], len({i for i, _ in run.kept_at_start}),
                          [u for u in self.units if after.reads_by_unit.get(u, 0) > before["reads_by_unit"].get(u, 0)],
                          after.wait_seconds - before["wait_seconds"], after.demand_reads - before["demand_reads"],
                          run.spilled_units)

    def _spill_need(self, i: int, shapes: list) -> int:
        """Bytes unit i's activations will take on disk: as it wrote them last step; before it
        wrote any, as another block did (the blocks are alike); before any block did, the
        budgets' estimate for this step's shapes, on the high side (so the first block of the
        first step keeps to the disk budget too)."""
        if i in self._spill_estimate:
            return self._spill_estimate[i]
        if self._spill_estimate:
            return max(self._spill_estimate.values())
        args = self.store.args
        every = working_set(args, self.dtype, max(b for b, _ in shapes), max(t for _, t in shapes), len(shapes),
                            self.loss_chunk, False, self.device.torch.type, self.lora)["kept"]
        return every // args.n_layers

    def _forward(self, run: _StepRun, xs: list[torch.Tensor], cursors: list) -> None:
        """Embeddings and blocks (this stage's), in the order's visits. Without a graph (the input
        stashed, the RNG state noted for the replay), or, within keep_budget, with one whose
        saved weights are handles, so the backward needs no recompute; past it, where the spill
        has room, with one whose saved values go to disk (`paging.spill`). xs becomes the head's
        inputs (or, on a stage without the head, goes on to the next stage)."""
        dev, kept_bytes, M, keep_budget = self.device, 0, len(xs), self.budgets.keep
        spill = self.spill if self.spill is not None and self.spill.open() else None
        if spill is not None:
            spill.new_step()
        mods, hooks = {}, {}
        for i, m in self.order.visits(self.order.forward, M):
            if m == 0:  # the unit's first visit
                mods[i] = self.modules.get(self.units[i], training=True)
                hooks[i] = None
                # the module's parameters that are not the unit's weights (LoRA's) are kept as they are
                if i > 0 and keep_budget != 0 and (keep_budget is None or kept_bytes < keep_budget):
                    hooks[i] = WeightHandles(self.pager, self.units[i], mods[i].parameters())
                elif i > 0 and spill is not None and spill.room(self._spill_need(i, run.shapes)):
                    hooks[i] = run.spilled[i] = SpillHandles(self.pager, self.units[i], spill, mods[i].parameters())
            mod, hook = mods[i], hooks[i]
            if i == self.lo:
                self.stage.arrive(xs, cursors, m)
            dev.set_rng_state(cursors[m])
            run.replay[(i, m)] = cursors[m]
            if hook is not None:
                x = xs[m].detach().requires_grad_(self.order.wants_dx(i))
                with torch.autograd.graph.saved_tensors_hooks(hook.pack, hook.unpack):
                    out = mod(x)
                run.kept[(i, m)] = (x, out)
                xs[m] = out.detach()
                if i in run.spilled:  # its graph holds nothing in RAM: the values it saved are on disk
                    hook.end(m)
                    _hollow(x)
                    _hollow(out)
            else:
                run.stash.put((i, m), xs[m])
                with torch.no_grad():
                    xs[m] = mod(xs[m]) if i else mod(xs[m]).to(self.dtype)
            cursors[m] = dev.get_rng_state()
            if i == self.hi - 1:  # the stage's last unit: on to the next stage
                self.stage.send_on(xs[m], cursors[m])
            if m == M - 1:  # the unit's last visit
                if i in run.spilled:
                    self._spill_estimate[i] = hook.activation_bytes
                elif hook is not None:
                    kept_bytes += hook.activation_bytes
                if hook is not None and self.full_step is not None:  # the graph holds the parameters
                    run.kept_mods[i] = self.full_step.detach_weights(self.units[i], mod)
                del mods[i], hooks[i]
            del mod
        run.kept_at_start = dict.fromkeys(run.kept)
        run.spilled_units = len(run.spilled)

    def _loss(self, run: _StepRun, xs: list[torch.Tensor], targets: list[torch.Tensor], n_tok: int,
              cursors: list):
        """The loss through the head and its gradient w.r.t. each micro-batch's head input; the
        head module goes to `run.head` (a full fine-tune steps it first in the backward: its
        gradient is complete). A stage without the head adds 0 (and gets its gradients from the
        next stage in the backward)."""
        last = self.order.last
        loss = torch.zeros((), device=self.device.torch)
        if not self.order.has_head:
            return loss, [None] * len(xs)
        head = self.modules.get(self.units[last], training=True)
        grads = []
        for m in range(len(xs)):
            if self.lo == last:
                self.stage.arrive(xs, cursors, m)
            h = xs[m].detach().requires_grad_(True)
            loss += chunked_cross_entropy(head, h, targets[m], n_tok, self.loss_chunk, True)
            grads.append(h.grad)
            if self.lo == last:
                self.stage.pass_back(grads, m)
        xs.clear()
        run.head = head
        return loss, grads

    def _backward(self, run: _StepRun, grads: list, lr: float, step: int) -> None:
        """Unit by unit in reverse, each micro-batch's graph through the unit while it is
        resident: the graph kept from the forward, or recomputed from the stashed input with
        the RNG replayed. A full fine-tune steps each unit as its gradient is complete."""
        full_step, last = self.full_step, self.order.last
        pending = None
        if full_step is not None and self.order.has_head:
            pending = full_step.reduce_then_step(self.units[last], run.head, lr, step, None)
        run.head = None
        M, sources = len(grads), {}
        for i, m in self.order.visits(self.order.backward, M):
            if m == 0:  # the unit's first visit
                sources[i] = self._graph_source(run, i)
            mod, graph = sources[i]
            x, out = graph(m)
            if i == self.hi - 1:  # the stage's last unit: its gradient from the next stage
                grads[m] = self.stage.grad_from_next(run.shapes[m])
            out.backward(grads[m])
            grads[m] = x.grad if self.order.wants_dx(i) else None
            if i == self.lo:
                self.stage.pass_back(grads, m)
            if m == M - 1:  # the unit's last visit: its gradient is complete
                if full_step is not None:
                    pending = full_step.reduce_then_step(self.units[i], mod, lr, step, pending)
                del sources[i]
            del mod, graph, x, out
        if pending is not None:
            pending()
        self.stage.flush()

    def _graph_source(self, run: _StepRun, i: int):
        """(unit i's module, m -> (input, output) of micro-batch m's graph through it)."""
        unit = self.units[i]
        if (i, 0) in run.kept:  # the graph is there: make the weights it names resident
            spilled = run.spilled.pop(i, None)
            tensors = self.modules.tensors(unit, graph_kept=True)
            mod = run.kept_mods.pop(i, None)
            if mod is not None:
                for name, p in mod.named_parameters():
                    p.data = tensors[name]
            if spilled is None:
                return mod, lambda m: run.kept.pop((i, m))
            ahead = run.spilled[max(run.spilled)] if run.spilled and self.budgets.spill_overlap else None
            M = len(run.shapes)

            def from_disk(m: int):
                """Micro-batch m's activations back from disk, the next ones on their way (the
                next micro-batch's, or the next unit's first), the last ones let go."""
                spilled.release(m - 1)
                spilled.fetch(m)
                if self.budgets.spill_overlap:
                    spilled.fetch(m + 1) if m + 1 < M else (ahead.fetch(0) if ahead is not None else None)
                return run.kept.pop((i, m))

            return mod, from_disk
        mod = self.modules.get(unit, training=True)

        def recompute(m: int):
            x = run.stash.pop((i, m))
            if self.cfg.replay_rng:
                self.device.set_rng_state(run.replay[(i, m)])
            if i == 0:
                return x, mod(x)
            x.requires_grad_(self.order.wants_dx(i))
            with skip_unread_product(mod):
                return x, mod(x)

        return mod, recompute

    def close(self) -> None:
        self.modules.close()
        self.pager.close()
        if self.spill is not None:
            self.spill.close()
        if self._narrowed is not None:
            self._narrowed.close()


def _hollow(t: torch.Tensor) -> None:
    """A kept graph's input or output, whose value the backward does not read (what it saved is
    on disk): its memory is given back, its shape (which the gradient must have) kept."""
    t.data = torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)
