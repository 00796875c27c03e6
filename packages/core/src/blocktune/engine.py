"""The paged engine: forward over units, then backward unit by unit in reverse.

One training step, for M micro-batches:

    forward   for each unit u = embed, block_00 … block_NN:
                  load u (prefetch u+1 meanwhile); for each micro-batch m:
                  stash m's input to u, note the RNG state, run u without a graph
    loss      head: per micro-batch, chunked cross-entropy and its gradient w.r.t. the head's
              input, chunk by chunk (never all vocab logits at once)
    backward  for each unit u in reverse: load u (prefetch u-1); for each micro-batch m:
                  restore the RNG state noted before u's forward, recompute u from its stashed
                  input with a graph, backward with the gradient from u+1, pass d(input) on;
              full fine-tune: the unit's optimizer step runs now and the unit is written back
    step      LoRA: one optimizer step over the (resident) adapters
              full: wait for the write-backs, switch the store's manifest to the new step

Every micro-batch goes through a unit while it is resident, so weights are read once per
optimizer step, whatever the accumulation.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .budgets import AUTO, Budgets
from .budgets import resolve as resolve_budgets
from .config import LoraConfig, ModelArgs
from .devices import Device, parse_dtype, resolve_device
from .distributed import SINGLE, DistContext
from .errors import ConfigError, TrainingError
from .hostmem import fix_mmap_threshold, trim_host_heap
from .lora import LoraAdapters
from .model import Block, Embed, Head, KVCache
from .optim import OptimizerConfig
from .pager import Pager, resident_sizes
from .rng import seed_micro_batch
from .stash import ActivationStash
from .store import BlockStore

__all__ = ["EngineConfig", "Engine", "StepResult", "IGNORE_INDEX", "chunked_cross_entropy"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EngineConfig:
    method: str = "lora"  # lora | full
    lora: LoraConfig | None = field(default_factory=LoraConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    device: str = "auto"
    compute_dtype: str | None = None  # None: the device's default (fp32 on CPU, bf16 on GPUs)
    # Budgets in bytes, None (no limit) or "auto" (from the machine's free memory: blocktune.budgets)
    device_budget: int | str | None = AUTO  # units resident on the device
    host_budget: int | str | None = AUTO  # unit files kept in (pinned) RAM for an accelerator;
    # on the CPU, host RAM is the device: the smaller of the two budgets bounds residency
    activation_budget: int | str | None = AUTO  # stashed block inputs in RAM before spilling
    # the batch `auto` plans for: (micro-batch size, tokens per sequence, micro-batches per step)
    batch_hint: tuple[int, int, int] = (1, 512, 1)
    loss_chunk: int = 2048  # positions per chunk of the cross-entropy
    seed: int = 0
    replay_rng: bool = True  # off only to prove the replay test can fail
    prefetch: bool = True
    verify: str = "once"  # crc32 of each file version: "always" on every read, "once" per process, "never"
    read_only: bool = False  # inference only (generate, eval): units are never written
    lean_memory: bool = False  # return freed host memory to the OS after every unit (slower; less RSS)
    max_dirty: int | None = 512 << 20  # full fine-tune: written-but-unsynced bytes before an early fsync
    # Bytes of autograd activations kept from the first forward instead of recomputing the
    # unit in the backward (weights in the graph become handles the pager resolves).
    # 0: always recompute; None: keep every unit's. Units past the budget are recomputed.
    keep_budget: int | None = 0
    # CPU, frozen units (LoRA, inference): "mapped" reads them through the page cache, "direct"
    # with O_DIRECT into reused buffers (for a store bigger than RAM); "auto" picks direct when
    # the store is more than 80% of the memory available (MemAvailable, or a cgroup's limit).
    frozen_reads: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise ConfigError(f"method {self.method!r} is not supported; choose lora or full")
        if self.method == "lora" and self.lora is None:
            raise ConfigError("method 'lora' needs a LoRA configuration")
        if self.frozen_reads not in ("auto", "mapped", "direct"):
            raise ConfigError(f"frozen_reads={self.frozen_reads!r}: choose auto, mapped or direct")
        if self.loss_chunk <= 0:
            raise ConfigError(f"loss_chunk={self.loss_chunk} must be positive")


@dataclass
class StepResult:
    loss: float
    tokens: int
    seconds: float
    bytes_read: int
    bytes_written: int
    kept_units: int = 0  # units whose backward used kept activations instead of a recompute


def chunked_cross_entropy(
    head: nn.Module, h: torch.Tensor, targets: torch.Tensor, denom: int, chunk: int,
    backward: bool,
) -> torch.Tensor:
    """Σ cross-entropy / denom over (B, T) positions, `chunk` positions of logits at a time.

    With `backward`, each chunk's gradient is accumulated into h.grad and the head's
    parameters right away, so only one chunk's logits exist at any moment.
    """
    flat_h = h.reshape(-1, h.shape[-1])
    flat_t = targets.reshape(-1)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, flat_t.numel(), chunk):
        t = flat_t[s:s + chunk]
        if not bool((t != IGNORE_INDEX).any()):  # note: a host sync; skips masked chunks
            continue
        logits = head(flat_h[s:s + chunk]).float()
        loss = F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum") / denom
        if backward:
            loss.backward()
        total += loss.detach()
    return total


class _WeightHandles:
    """saved_tensors_hooks for one unit: a weight that autograd saves for the backward is
    replaced by a handle (its key, and how the saved tensor views it) and fetched back from the
    pager when the backward needs it, so a kept graph does not pin the unit's weights in memory.
    Everything else saved (activations) is kept as is, and its bytes are counted."""

    def __init__(self, pager: Pager, unit: str):
        self.pager, self.unit = pager, unit
        # storage -> (a key in it, that key's offset). Units read from one file buffer share one
        # storage; a handle's offset is relative to the key it names, so any key will do.
        self.weights = {t.untyped_storage().data_ptr(): (k, t.storage_offset())
                        for k, t in pager.get(unit).items()}
        self.activation_bytes = 0

    def pack(self, t: torch.Tensor):
        found = self.weights.get(t.untyped_storage().data_ptr()) if t.device.type != "meta" else None
        if found is None:
            self.activation_bytes += t.numel() * t.element_size()
            return t
        key, base_offset = found
        return (key, tuple(t.shape), t.stride(), t.storage_offset() - base_offset)

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        key, shape, stride, offset = packed
        base = self.pager.get(self.unit)[key]
        return base.as_strided(shape, stride, base.storage_offset() + offset)


def check_window(args: ModelArgs, length: int) -> None:
    """Attention here spans the whole sequence: past a sliding window that is a different model."""
    if args.sliding_window is not None and length > args.sliding_window:
        raise ConfigError(f"sequence length {length} exceeds the model's sliding_window "
                          f"{args.sliding_window} (config.json); blocktune attends to the whole "
                          f"sequence, so keep --seq-len (and prompt + new tokens) within {args.sliding_window}")


def _count_targets(targets: torch.Tensor) -> int:
    return int((targets != IGNORE_INDEX).sum())


class Engine:
    """Runs a model held in a `BlockStore` one unit at a time."""

    def __init__(self, store: BlockStore, cfg: EngineConfig | None = None,
                 adapters: dict[str, torch.Tensor] | None = None, dist: DistContext = SINGLE):
        self.store, self.cfg, self.dist = store, cfg or EngineConfig(), dist
        self.args: ModelArgs = store.args
        self.device: Device = resolve_device(self.cfg.device)
        dtype = self.cfg.compute_dtype
        self.dtype = parse_dtype(dtype) if dtype else self.device.default_dtype()
        self.device.check_dtype(self.dtype)
        batch, seq, micro = self.cfg.batch_hint
        # frozen embeddings and head stay in the stored dtype (bf16): the embedding reads a few
        # rows, the head widens its matrix a slice at a time; widened whole, Llama 3's 128k
        # vocabulary is 2.1 GB per unit in fp32
        frozen = self.cfg.method != "full" or self.cfg.read_only
        self.as_stored = (frozenset({"embed", "head"}) if frozen and store.dtype.itemsize < self.dtype.itemsize
                          else frozenset())
        self.budgets: Budgets = resolve_budgets(
            self.device, store.args, resident_sizes(store, self.dtype, self.as_stored),
            {n: store.unit_bytes(n) for n in store.units}, store.dtype, self.dtype,
            method=self.cfg.method, device_budget=self.cfg.device_budget, host_budget=self.cfg.host_budget,
            activation_budget=self.cfg.activation_budget, batch=batch, seq=seq, micro=micro,
            loss_chunk=self.cfg.loss_chunk, kv_cache=self.cfg.read_only)
        # lean: hand freed heap back to the OS after every unit (slower, less RSS: the heap of
        # many small activations fragments); asked for, or chosen where `auto` found memory tight
        self.lean = self.cfg.lean_memory or self.budgets.tight
        if self.lean and self.device.is_cpu:
            fix_mmap_threshold()
        budget = self.budgets.device
        if self.device.is_cpu and self.budgets.host is not None:
            budget = min(b for b in (budget, self.budgets.host) if b is not None)
        self.pager = Pager(store, self.device, budget, self.dtype, prefetch=self.cfg.prefetch,
                           verify=self.cfg.verify, host_budget=self.budgets.host,
                           mutable=self.cfg.method == "full" and not self.cfg.read_only,
                           max_dirty=self.cfg.max_dirty, frozen_reads=self.cfg.frozen_reads,
                           as_stored=self.as_stored)
        self.units = store.units
        self.lora = self.cfg.lora if self.cfg.method == "lora" else None
        self.adapters: LoraAdapters | None = None
        if self.lora is not None:
            self.adapters = LoraAdapters(self.args, self.lora, self.units[1:-1], self.device.torch, self.cfg.seed,
                                         adapters)
        self._lora_opt: torch.optim.Optimizer | None = None
        self._built: dict[str, tuple[dict, nn.Module]] = {}
        self._templates: dict[str, nn.Module] = {}  # one meta-device module per kind of unit
        # a mapped unit's file stays mapped, and a module that computes from that memory may stay
        # too; one that holds converted copies (a bf16 store computed in fp32) would keep every
        # unit's copy alive past its eviction, outside the budget
        if not self.pager.mapped or store.dtype != self.dtype:
            self.pager.on_evict.append(lambda name: self._built.pop(name, None))
        self.step_count = store.step if self.cfg.method == "full" else 0
        self._tied_grad: torch.Tensor | None = None  # tied head: its projection's gradient, for embed

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
        if self._lora_opt is None:
            self._lora_opt = self.cfg.optimizer.torch_optimizer(self.adapter_params())
        return self._lora_opt

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
                                         if kind == "head" else Block(self.args, self.lora))
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

    def _next(self, i: int, step: int) -> str | None:
        j = i + step
        return self.units[j] if 0 <= j < len(self.units) else None

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
        n_tok = self.dist.sum_int(sum(_count_targets(t) for _, t in micro_batches), dev)
        if n_tok == 0:
            raise TrainingError("every target of this step is masked; nothing to learn from")
        M = len(micro_batches)
        xs: list[torch.Tensor] = [tok.to(dev.torch) for tok, _ in micro_batches]
        targets = [t.to(dev.torch) for _, t in micro_batches]
        cursors = []
        for m in range(M):
            seed_micro_batch(dev, self.cfg.seed, step, m * self.dist.world + self.dist.rank)
            cursors.append(dev.get_rng_state())
        stash = ActivationStash(self.budgets.activation)
        replay: dict[tuple[int, int], tuple] = {}
        last = len(self.units) - 1
        full = self.cfg.method == "full"
        try:
            # forward: embed and blocks; without a graph, or (LoRA, within keep_budget) with one
            # whose saved weights are handles, so the backward needs no recompute
            kept: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
            kept_mods: dict[int, nn.Module] = {}  # full fine-tune: the modules the kept graphs use
            kept_bytes = 0
            for i in range(last):
                mod = self._module(self.units[i], training=True)
                self.pager.prefetch(self._next(i, +1))
                keep = (i > 0 and self.cfg.keep_budget != 0
                        and (self.cfg.keep_budget is None or kept_bytes < self.cfg.keep_budget))
                hooks = _WeightHandles(self.pager, self.units[i]) if keep else None
                for m in range(M):
                    dev.set_rng_state(cursors[m])
                    replay[(i, m)] = cursors[m]
                    if keep:
                        x = xs[m].detach().requires_grad_(i > 1 or full)
                        with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
                            out = mod(x)
                        kept[(i, m)] = (x, out)
                        xs[m] = out.detach()
                    else:
                        stash.put((i, m), xs[m])
                        with torch.no_grad():
                            xs[m] = mod(xs[m]) if i else mod(xs[m]).to(self.dtype)
                    cursors[m] = dev.get_rng_state()
                if keep:
                    kept_bytes += hooks.activation_bytes
                    if full:  # the graph holds the parameters (to accumulate their gradients)
                        kept_mods[i] = self._detach_weights(self.units[i], mod)
                del mod
            n_kept = len({i for i, _ in kept})
            # loss and its gradient through the head
            head = self._module(self.units[last], training=True)
            self.pager.prefetch(self._next(last, -1))
            loss = torch.zeros((), device=dev.torch)
            grads = []
            for m in range(M):
                h = xs[m].detach().requires_grad_(True)
                loss += chunked_cross_entropy(head, h, targets[m], n_tok, self.cfg.loss_chunk, True)
                grads.append(h.grad)
            xs.clear()
            loss = self.dist.sum_float(loss)  # every rank sees the global loss, and stops together
            if not bool(torch.isfinite(loss)):  # note: a host sync; before any weight changes
                raise TrainingError(f"loss is {float(loss)} at step {step}; nothing of this step "
                                    "was applied (lower the learning rate, check the data)")
            pending = None
            if full:
                pending = self._reduce_then_step(self.units[last], head, lr, step, None)
            del head
            # backward, unit by unit in reverse
            first = 0 if full else 1  # LoRA: the embeddings have nothing to train
            for i in range(last - 1, first - 1, -1):
                if (i, 0) in kept:  # the graph is there: make the weights resident, run it
                    tensors = self.pager.get(self.units[i])
                    self.pager.prefetch(self._next(i, -1) if i > first else None)
                    mod = kept_mods.pop(i, None)
                    if mod is not None:
                        for name, p in mod.named_parameters():
                            p.data = tensors[name]
                    for m in range(M):
                        x, out = kept.pop((i, m))
                        out.backward(grads[m])
                        grads[m] = x.grad if i > 1 or full else None
                    if full:
                        pending = self._reduce_then_step(self.units[i], mod, lr, step, pending)
                    del mod
                    continue
                mod = self._module(self.units[i], training=True)
                self.pager.prefetch(self._next(i, -1) if i > first else None)
                for m in range(M):
                    x = stash.pop((i, m))
                    if self.cfg.replay_rng:
                        dev.set_rng_state(replay[(i, m)])
                    want_dx = i > 1 or (i == 1 and full)
                    if i > 0:
                        x.requires_grad_(want_dx)
                        with mod.recompute_for_backward():
                            out = mod(x)
                    else:
                        out = mod(x)
                    out.backward(grads[m])
                    grads[m] = x.grad if want_dx else None
                if full:
                    pending = self._reduce_then_step(self.units[i], mod, lr, step, pending)
                del mod
            if full:
                if pending is not None:
                    pending()
                # the step's own figures go into its commit: a run killed before it logs them
                # recovers them on resume (blocktune.train)
                self.pager.commit(step + 1, last_step={"step": step + 1, "loss": float(loss), "tokens": n_tok,
                                                       "lr": lr})
            else:
                params = self.adapter_params()
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                self.dist.all_reduce_([p.grad for p in params])  # one flat all-reduce per step
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=False)
                self.lora_optimizer.param_groups[0]["lr"] = lr
                self.lora_optimizer.step()
                self.lora_optimizer.zero_grad(set_to_none=True)
        except BaseException:
            if full:
                self.pager.abort_writes()
            raise
        finally:
            stash.clear()
        loss_value = float(loss)
        self.step_count = step + 1
        after = self.pager.stats
        return StepResult(loss_value, n_tok, time.perf_counter() - t_start,
                          after.bytes_read - before["bytes_read"],
                          after.bytes_written - before["bytes_written"], n_kept)

    def _detach_weights(self, unit: str, mod: nn.Module) -> nn.Module:
        """Full fine-tune, kept graph: its AccumulateGrad nodes hold `mod`'s parameters, which
        would pin the unit's weights until the backward. Point them at a 0-byte placeholder of
        the same shape (the backward points them back at whatever the pager then holds), and
        keep the module out of the cache, where it would be reused with the placeholders."""
        self._built.pop(unit, None)
        for p in mod.parameters():
            p.data = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)
        return mod

    def _reduce_then_step(self, unit: str, mod: nn.Module, lr: float, step: int, pending):
        """Data parallel: sum this unit's gradient over the ranks, then step it. When the budget
        holds two units, the all-reduce is started now and the step runs after the next unit's
        backward (returned as `pending`); otherwise both happen now."""
        if pending is not None:
            pending()
        if not self.dist.enabled:
            self._full_step(unit, mod, lr, step)
            return None
        grads = [p.grad for p in mod.parameters()]
        if self.pager.budget < 2 * self.pager.largest_unit:
            self.dist.all_reduce_(grads)
            self._full_step(unit, mod, lr, step)
            return None
        finish = self.dist.all_reduce_async(grads)
        self.pager.pin(unit)

        def complete() -> None:
            finish()
            self._full_step(unit, mod, lr, step)
            self.pager.unpin(unit)

        return complete

    def _full_step(self, unit: str, mod: nn.Module, lr: float, step: int) -> None:
        params = dict(mod.named_parameters())
        grads = {k: p.grad for k, p in params.items()}
        if self.store.tied and unit == "head":  # the embeddings' matrix: stepped with embed
            self._tied_grad = grads.pop("output.weight")
            params.pop("output.weight").grad = None
        elif self.store.tied and unit == "embed" and self._tied_grad is not None:
            grads["tok_embeddings.weight"] = grads["tok_embeddings.weight"] + self._tied_grad
            self._tied_grad = None
        self.pager.step_and_write(unit, {k: p.data for k, p in params.items()}, grads, self.cfg.optimizer,
                                  lr, step + 1)
        for p in params.values():
            p.grad = None
        if self.store.tied and unit == "embed":
            self.pager.drop("head")  # it holds its own copy of the matrix from before this step

    def _check_lengths(self, batches) -> None:
        for tok, tgt in batches:
            if tok.shape != tgt.shape or tok.dim() != 2:
                raise ConfigError(f"tokens {tuple(tok.shape)} and targets {tuple(tgt.shape)} "
                                  "must both be (batch, seq_len)")
            if tok.shape[1] > self.args.max_seq_len:
                raise ConfigError(f"sequence length {tok.shape[1]} exceeds the model's "
                                  f"max_seq_len {self.args.max_seq_len}; lower --seq-len")
            check_window(self.args, tok.shape[1])

    # ---- inference ----
    def _forward_units(self, tokens: torch.Tensor, caches=None, start: int = 0) -> Iterator:
        """Yield the hidden state after embed and each block (eval mode, no graph)."""
        h = tokens.to(self.device.torch)
        for i in range(len(self.units) - 1):
            mod = self._module(self.units[i], training=False)
            self.pager.prefetch(self._next(i, +1))
            if i == 0:
                h = mod(h).to(self.dtype)
            else:
                h = mod(h, caches[i - 1] if caches else None, start)
        return h

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits (B, T, vocab) of the whole model (materialised: for tests and short inputs)."""
        h = self._forward_units(tokens)
        return self._module("head", training=False)(h)

    @torch.no_grad()
    def eval_loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
        """(mean cross-entropy, predicted positions) in eval mode, logits chunked."""
        self._check_lengths([(tokens, targets)])
        n = _count_targets(targets)
        h = self._forward_units(tokens)
        head = self._module("head", training=False)
        total = chunked_cross_entropy(head, h, targets.to(self.device.torch), max(n, 1),
                                      self.cfg.loss_chunk, backward=False)
        return float(total), n

    def new_caches(self, batch: int, max_len: int) -> list[KVCache]:
        a = self.args
        return [KVCache(batch, max_len, a.kv_heads, a.head_dim, self.dtype, self.device.torch)
                for _ in range(a.n_layers)]

    @torch.no_grad()
    def next_logits(self, tokens: torch.Tensor, caches: list[KVCache] | None, start: int):
        """Logits of the last position only, extending `caches` from position `start`."""
        h = self._forward_units(tokens, caches, start)
        head = self._module("head", training=False)
        self.pager.prefetch(self.units[0])  # the next token starts again at the embeddings
        return head(h[:, -1:, :])[:, -1, :].float()

    def close(self) -> None:
        self._built.clear()
        self.pager.close()
