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

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from blocktune.dist.groups import SINGLE, DistContext
from blocktune.engine.config import EngineConfig
from blocktune.engine.fullstep import FullStep
from blocktune.engine.handles import WeightHandles
from blocktune.engine.inference import Inference
from blocktune.engine.loss import check_batches, chunked_cross_entropy, count_targets
from blocktune.engine.recompute import skip_unread_product
from blocktune.engine.rng import seed_micro_batch
from blocktune.engine.stagelink import StageSteps
from blocktune.errors import ConfigError, TrainingError
from blocktune.machine.devices import Device, parse_dtype, resolve_device
from blocktune.machine.hostmem import fix_mmap_threshold, trim_host_heap
from blocktune.model.args import ModelArgs
from blocktune.model.llama import Block, Embed, Head
from blocktune.model.lora import LoraAdapters, add_lora
from blocktune.paging.budgets import Budgets
from blocktune.paging.budgets import resolve as resolve_budgets
from blocktune.paging.pager import Pager, resident_sizes
from blocktune.paging.stash import ActivationStash
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


@dataclass
class _StepRun:
    """What one step's forward leaves for its backward."""
    stash: ActivationStash  # block inputs to recompute from
    replay: dict  # (unit, micro-batch) -> RNG state before the unit's forward
    kept: dict  # (unit, micro-batch) -> (input, output) of a graph kept from the forward
    kept_mods: dict  # full fine-tune: unit -> the module its kept graphs use
    kept_at_start: dict = field(default_factory=dict)  # kept's keys after the forward (the count)
    shapes: list = field(default_factory=list)  # each micro-batch's (batch, seq)


class Engine(Inference, FullStep, StageSteps):
    """Runs a model held in a `BlockStore` one unit at a time (training here; forward-only
    passes for evaluation and generation in `blocktune.engine.inference`)."""

    def __init__(self, store: BlockStore, cfg: EngineConfig | None = None,
                 adapters: dict[str, torch.Tensor] | None = None, dist: DistContext = SINGLE,
                 args: ModelArgs | None = None):  # args: the store's, or a run's copy (dropout)
        self.store, self.cfg, self.dist = store, cfg or EngineConfig(), dist
        self.args: ModelArgs = args or store.args
        self.device: Device = resolve_device(self.cfg.device)
        dtype = self.cfg.compute_dtype
        self.dtype = parse_dtype(dtype) if dtype else self.device.default_dtype()
        self.device.check_dtype(self.dtype)
        batch, seq, micro = self.cfg.batch_hint
        # frozen embeddings and head stay in the stored dtype (bf16): the embedding reads a few
        # rows, the head widens its matrix a slice at a time; widened whole, Llama 3's 128k
        # vocabulary is 2.1 GB per unit in fp32
        self.units = store.units
        self.lo, self.hi = self._stage_range()
        own = self.units[self.lo:self.hi]
        frozen = self.cfg.method != "full" or self.cfg.read_only
        self.as_stored = (frozenset({"embed", "head"}) if frozen and store.dtype.itemsize < self.dtype.itemsize
                          else frozenset())
        sizes = {n: b for n, b in resident_sizes(store, self.dtype, self.as_stored, self.device).items()
                 if n in own}
        self.budgets: Budgets = resolve_budgets(
            self.device, store.args, sizes,
            {n: store.unit_bytes(n) for n in own}, self.dtype,
            method=self.cfg.method, device_budget=self.cfg.device_budget, host_budget=self.cfg.host_budget,
            activation_budget=self.cfg.activation_budget, batch=batch, seq=seq, micro=micro,
            loss_chunk=self.cfg.loss_chunk, kv_cache=self.cfg.read_only)
        # lean: hand freed heap back to the OS after every unit (slower, less RSS: the heap of
        # many small activations fragments); asked for, or chosen where `auto` found memory tight
        self.lean = self.cfg.lean_memory or self.budgets.tight
        if self.lean and self.device.is_cpu:
            fix_mmap_threshold()
        budget = self.budgets.device
        if self.device.host_is_device and self.budgets.host is not None:
            budget = min(b for b in (budget, self.budgets.host) if b is not None)
        self.pager = Pager(store, self.device, budget, self.dtype, prefetch=self.cfg.prefetch,
                           verify=self.cfg.verify, host_budget=self.budgets.host,
                           mutable=self.cfg.method == "full" and not self.cfg.read_only,
                           max_dirty=self.cfg.max_dirty, frozen_reads=self.cfg.frozen_reads,
                           as_stored=self.as_stored)
        # a stage whose units all stay resident takes each micro-batch through all of them (`_order`)
        self.interleave = (self.dist.stages > 1 and self.cfg.keep_budget == 0
                           and sum(sizes.values()) <= self.pager.budget)
        self.lora = self.cfg.lora if self.cfg.method == "lora" else None
        self.adapters: LoraAdapters | None = None
        if self.lora is not None:
            self.adapters = LoraAdapters(self.args, self.lora, self.units[1:-1], self.device.torch, self.cfg.seed,
                                         adapters, self.cfg.optimizer, keep=own)
        self._built: dict[str, tuple[dict, nn.Module]] = {}
        self._templates: dict[str, nn.Module] = {}  # one meta-device module per kind of unit
        # a mapped unit's file stays mapped, and a module that computes from that memory may stay
        # too; one that holds converted copies (a bf16 store computed in fp32) would keep every
        # unit's copy alive past its eviction, outside the budget
        if not self.pager.mapped or store.dtype != self.dtype:
            self.pager.on_evict.append(lambda name: self._built.pop(name, None))
        self.step_count = store.step if self.cfg.method == "full" else 0
        self._tied_grad: torch.Tensor | None = None  # tied head: its projection's gradient, for embed
        self._head: nn.Module | None = None  # the head module between the loss and its step

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

    # ---- building a unit on the meta device and mapping its tensors in ----
    def _module(self, unit: str, training: bool) -> nn.Module:
        if self.lean and self.device.is_cpu:
            trim_host_heap()
        resident = self.pager.get(unit)
        cached = self._built.get(unit)
        if cached is not None and cached[0].keys() == resident.keys() and all(
                cached[0][k] is t for k, t in resident.items()):  # the same tensors: the module fits
            return cached[1].train(training)
        kind = unit if unit in ("embed", "head") else "block"
        if kind not in self._templates:
            with torch.device("meta"):  # constructing runs the initialisers: ms per block, so once
                self._templates[kind] = (Embed(self.args) if kind == "embed" else Head(self.args)
                                         if kind == "head" else self._block_template())
        mod = copy.deepcopy(self._templates[kind])
        tensors = dict(resident)
        if self.adapters is not None:
            tensors.update(self.adapters.of(unit))
        mod.load_state_dict(tensors, assign=True, strict=True)
        if self.cfg.method == "lora":
            for name, p in mod.named_parameters():
                if ".lora_" not in name:
                    p.requires_grad_(False)
        # kept while the unit is resident (the pager drops it on eviction, so a module never
        # holds the weights of a unit the budget has let go), or, mapped, while the file is
        self._built[unit] = (resident, mod)
        return mod.train(training)

    def _block_template(self) -> nn.Module:
        block = Block(self.args)
        return block if self.lora is None else add_lora(block, self.lora)

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
        if self.cfg.method == "full":
            self.store.acquire_writer()  # a second writer fails here, before anything is written
        t_start = time.perf_counter()
        before = self.pager.stats.snapshot()
        lr = self.cfg.optimizer.lr if lr is None else lr
        step = self.step_count if step is None else step
        dev = self.device
        self._check_lengths(micro_batches)
        # the loss is a mean over the whole global batch: every rank divides by the same count
        n_tok = self.dist.sum_int(sum(count_targets(t) for _, t in micro_batches), dev)
        if n_tok == 0:
            raise TrainingError("every target of this step is masked; nothing to learn from")
        M = len(micro_batches)
        xs: list[torch.Tensor] = [tok.to(dev.torch) for tok, _ in micro_batches]
        targets = [t.to(dev.torch) for _, t in micro_batches]
        cursors = []
        for m in range(M):
            seed_micro_batch(dev, self.cfg.seed, step, m * self.dist.dp_world + self.dist.dp_rank)
            cursors.append(dev.get_rng_state())
        run = _StepRun(ActivationStash(self.budgets.activation), {}, {}, {}, shapes=[tuple(x.shape) for x in xs])
        full = self.cfg.method == "full"
        self._plan_step()
        try:
            self._forward(run, xs, cursors)
            loss, grads = self._loss(xs, targets, n_tok, cursors)
            loss = self.dist.sum_float(loss)  # every rank sees the global loss, and stops together
            if not bool(torch.isfinite(loss)):  # note: a host sync; before any weight changes
                raise TrainingError(f"loss is {float(loss)} at step {step}; nothing of this step "
                                    "was applied (lower the learning rate, check the data)")
            self._backward(run, grads, lr, step)
            if full:
                # the step's own figures go into its commit: a run killed before it logs them
                # recovers them on resume (blocktune.run.trainer)
                self.pager.commit(step + 1, keep_previous=self.dist.enabled, last_step={"step": step + 1, "loss": float(loss), "tokens": n_tok,
                                                       "lr": lr})
            else:
                self.adapters.step(lr, max_grad_norm, self.dist)
        except BaseException:
            if full:
                self.pager.abort_writes()
            raise
        finally:
            run.stash.clear()
        loss_value = float(loss)
        self.step_count = step + 1
        after = self.pager.stats
        return StepResult(loss_value, n_tok, time.perf_counter() - t_start,
                          after.bytes_read - before["bytes_read"],
                          after.bytes_written - before["bytes_written"], len({i for i, _ in run.kept_at_start}),
                          [u for u in self.units if after.reads_by_unit.get(u, 0) > before["reads_by_unit"].get(u, 0)],
                          after.wait_seconds - before["wait_seconds"], after.demand_reads - before["demand_reads"])

    def _plan_step(self) -> None:
        """The pager's plan: forward, head, backward and (LoRA) the next step's forward; a full
        fine-tune's next step reads units not committed yet, so its plan ends with this step."""
        last, full = len(self.units) - 1, self.cfg.method == "full"
        forward = list(range(self.lo, min(self.hi, last)))
        head = [last] if self.hi > last else []
        first = max(0 if full else 1, self.lo)
        backward = list(range(min(self.hi, last) - 1, first - 1, -1))
        self.pager.plan([self.units[i] for i in forward + head + backward + ([] if full else forward)])

    def _wants_dx(self, i: int) -> bool:
        """Whether unit i's backward passes a gradient on to its input: not into the
        embeddings' (tokens), nor (LoRA) into the frozen embeddings."""
        return i > 1 or (i == 1 and self.cfg.method == "full")

    def _order(self, units: range, M: int) -> list[tuple[int, int]]:
        """(unit, micro-batch) in the order the passes visit them: block-major (every
        micro-batch through a unit while it is resident), or, on a pipeline stage whose units all
        stay resident, micro-batch-major, so that each micro-batch goes on to the next stage as
        soon as it is through this one's units (GPipe's fill and drain; one read per unit still)."""
        if self.interleave:
            return [(i, m) for m in range(M) for i in units]
        return [(i, m) for i in units for m in range(M)]

    def _forward(self, run: _StepRun, xs: list[torch.Tensor], cursors: list) -> None:
        """Embeddings and blocks (this stage's), in `_order`. Without a graph (the input
        stashed, the RNG state noted for the replay), or, within keep_budget, with one whose
        saved weights are handles, so the backward needs no recompute. xs becomes the head's
        inputs (or, on a stage without the head, goes on to the next stage)."""
        dev, full, kept_bytes, M = self.device, self.cfg.method == "full", 0, len(xs)
        mods, hooks = {}, {}
        for i, m in self._order(range(self.lo, min(self.hi, len(self.units) - 1)), M):
            if m == 0:  # the unit's first visit
                mods[i] = self._module(self.units[i], training=True)
                keep = (i > 0 and self.cfg.keep_budget != 0
                        and (self.cfg.keep_budget is None or kept_bytes < self.cfg.keep_budget))
                hooks[i] = WeightHandles(self.pager, self.units[i]) if keep else None
            mod, hook = mods[i], hooks[i]
            if i == self.lo:
                self._arrive(xs, cursors, m)
            dev.set_rng_state(cursors[m])
            run.replay[(i, m)] = cursors[m]
            if hook is not None:
                x = xs[m].detach().requires_grad_(self._wants_dx(i))
                with torch.autograd.graph.saved_tensors_hooks(hook.pack, hook.unpack):
                    out = mod(x)
                run.kept[(i, m)] = (x, out)
                xs[m] = out.detach()
            else:
                run.stash.put((i, m), xs[m])
                with torch.no_grad():
                    xs[m] = mod(xs[m]) if i else mod(xs[m]).to(self.dtype)
            cursors[m] = dev.get_rng_state()
            if i == self.hi - 1:  # the stage's last unit: on to the next stage
                self.dist.pipe.send(xs[m], self.dist.pipe.next)
                self.dist.pipe.send_rng(cursors[m], self.dist.pipe.next)
            if m == M - 1:  # the unit's last visit
                if hook is not None:
                    kept_bytes += hook.activation_bytes
                    if full:  # the graph holds the parameters (to accumulate their gradients)
                        run.kept_mods[i] = self._detach_weights(self.units[i], mod)
                del mods[i], hooks[i]
            del mod
        run.kept_at_start = dict.fromkeys(run.kept)

    def _loss(self, xs: list[torch.Tensor], targets: list[torch.Tensor], n_tok: int, cursors: list):
        """The loss through the head and its gradient w.r.t. each micro-batch's head input; a
        full fine-tune's head steps right after (its gradient is complete). A stage without the
        head adds 0 (and gets its gradients from the next stage in the backward)."""
        last = len(self.units) - 1
        loss = torch.zeros((), device=self.device.torch)
        if self.hi <= last:
            return loss, [None] * len(xs)
        head = self._module(self.units[last], training=True)
        grads = []
        for m in range(len(xs)):
            if self.lo == last:
                self._arrive(xs, cursors, m)
            h = xs[m].detach().requires_grad_(True)
            loss += chunked_cross_entropy(head, h, targets[m], n_tok, self.cfg.loss_chunk, True)
            grads.append(h.grad)
            if self.lo == last:
                self._pass_back(grads, m)
        xs.clear()
        self._head = head
        return loss, grads

    def _backward(self, run: _StepRun, grads: list, lr: float, step: int) -> None:
        """Unit by unit in reverse, each micro-batch's graph through the unit while it is
        resident: the graph kept from the forward, or recomputed from the stashed input with
        the RNG replayed. A full fine-tune steps each unit as its gradient is complete."""
        full, last = self.cfg.method == "full", len(self.units) - 1
        pending = None
        if full and self.hi > last:
            pending = self._reduce_then_step(self.units[last], self._head, lr, step, None)
        self._head = None
        first = max(0 if full else 1, self.lo)  # LoRA: the embeddings have nothing to train
        M, sources = len(grads), {}
        for i, m in self._order(range(min(self.hi, last) - 1, first - 1, -1), M):
            if m == 0:  # the unit's first visit
                sources[i] = self._graph_source(run, i)
            mod, graph = sources[i]
            x, out = graph(m)
            if i == self.hi - 1:  # the stage's last unit: its gradient from the next stage
                pipe = self.dist.pipe
                grads[m] = pipe.recv(run.shapes[m] + (self.args.dim,), self.dtype, pipe.next, self.device.torch)
            out.backward(grads[m])
            grads[m] = x.grad if self._wants_dx(i) else None
            if i == self.lo:
                self._pass_back(grads, m)
            if m == M - 1:  # the unit's last visit: its gradient is complete
                if full:
                    pending = self._reduce_then_step(self.units[i], mod, lr, step, pending)
                del sources[i]
            del mod, graph, x, out
        if pending is not None:
            pending()
        if self.dist.pipe is not None:
            self.dist.pipe.flush()

    def _graph_source(self, run: _StepRun, i: int):
        """(unit i's module, m -> (input, output) of micro-batch m's graph through it)."""
        unit = self.units[i]
        if (i, 0) in run.kept:  # the graph is there: make the weights it names resident
            tensors = self.pager.get(unit)
            mod = run.kept_mods.pop(i, None)
            if mod is not None:
                for name, p in mod.named_parameters():
                    p.data = tensors[name]
            return mod, lambda m: run.kept.pop((i, m))
        mod = self._module(unit, training=True)

        def recompute(m: int):
            x = run.stash.pop((i, m))
            if self.cfg.replay_rng:
                self.device.set_rng_state(run.replay[(i, m)])
            if i == 0:
                return x, mod(x)
            x.requires_grad_(self._wants_dx(i))
            with skip_unread_product(mod):
                return x, mod(x)

        return mod, recompute

    def _check_lengths(self, batches) -> None:
        check_batches(self.args, batches)

    def close(self) -> None:
        self._built.clear()
        self.pager.close()
