"""The fine-tuning run: one config, the loop, metrics, progress (checkpoints and exact resume:
`blocktune.run.checkpoint`; the record written as it goes: `blocktune.run.record`).

Everything a run depends on is a function of the config and the step number: the examples
of a step (`Dataset.index`), its dropout streams (`blocktune.engine.rng`), its learning rate. So a
checkpoint holds only what training changes: LoRA adapters and their optimizer state (one
atomically written file), or, for a full fine-tune, the store itself, whose manifest is
switched atomically at the end of every step.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import time
from pathlib import Path

import torch

from blocktune.dist.groups import DistContext, PeerLost, init_from_env
from blocktune.engine.engine import Engine
from blocktune.errors import ConfigError, TrainingError
from blocktune.formats.tokenizer import load_tokenizer
from blocktune.machine.hostmem import peak_rss_bytes
from blocktune.run.checkpoint import LoraCheckpoint, StoreCheckpoint
from blocktune.run.config import (
    RunConfig,
    check_out,
    config_line,
    default_out,
    lr_at,
    recorded_config,
    schedule_notes,
    steps_of_epochs,
    with_adapter_lora,
)
from blocktune.run.data import load_dataset
from blocktune.run.folder import RunFolder
from blocktune.run.generate import SamplingConfig, generate_tokens
from blocktune.run.ownership import lora_weights
from blocktune.run.record import RunRecord
from blocktune.run.report import read_metrics
from blocktune.store.safefiles import readable_size
from blocktune.store.store import BlockStore

__all__ = ["Trainer"]

BUDGETS = "budgets.txt"  # in the run folder: how the budgets were worked out


class Trainer:
    def __init__(self, cfg: RunConfig, log=print):
        if not cfg.out:  # a library caller that named no run folder: a new one, as the CLI gives
            cfg = dataclasses.replace(cfg, out=default_out(False, log))
        self.out = Path(cfg.out)
        from blocktune.machine.devices import resolve_device

        device = resolve_device(cfg.device).for_local_rank()  # a bad --device fails before any data is read
        self.device = device
        self.dist = init_from_env(device, cfg.dist_timeout, cfg.stages)
        self.log = log if self.dist.is_main else (lambda s: None)
        # a full fine-tune writes the store: the writer lock first (a clear error if another
        # process has it); anything else reads the step it opened, pinned against collection
        self.store = BlockStore.open(_rank_store(cfg, self.dist), writer=cfg.method == "full")
        if cfg.method == "lora":  # on a store a full run tuned: those weights, or the base kept beside them
            self.store = self._adapted(self.store, cfg.start_from)
        # then one live run per run folder (its writer, rank 0, holds the lock): a second run, a
        # --resume beside a live one say, stops here with the holder's name
        self.folder = RunFolder.claim(self.out) if self.dist.is_main else None
        try:
            self._prepare(cfg)
        except BaseException:
            self._refused()
            raise

    def _prepare(self, cfg: RunConfig) -> None:
        """The tokenizer, the data, the engine and the checkpoint of the run `cfg` describes."""
        # dropout is a training setting, not a property of the stored weights
        self.args = self.store.args.with_dropout(cfg.dropout) if cfg.dropout else self.store.args
        self.tok = load_tokenizer(self.store)
        start_adapters = None
        if cfg.adapter:
            if cfg.method != "lora":
                raise ConfigError("--adapter starts a LoRA run from an adapter; it needs --method lora")
            from blocktune.formats.adapters import load_adapter

            given = load_adapter(cfg.adapter, self.store.args)
            # the run is the adapter's LoRA: the config says so (and config.toml, for --resume)
            cfg, said = with_adapter_lora(cfg, given.lora, cfg.adapter)
            self.log(said)
            start_adapters = given.tensors
        self.cfg = cfg
        self.train_data, self.val_data = load_dataset(
            cfg.data, self.tok, cfg.seq_len, self.args.max_seq_len, cfg.val_ratio, cfg.chat_template, self.log)
        cfg, said = steps_of_epochs(cfg, len(self.train_data), self.dist.dp_world)
        if said:  # from here on the run is its steps (config.toml records them)
            self.log(said)
            self.cfg = cfg
        ecfg = dataclasses.replace(cfg.engine_config(), device=str(self.device), narrow_frozen=cfg.method == "lora",
                                   narrow_steps=cfg.method == "full")
        self.engine = Engine(self.store, ecfg, adapters=start_adapters, dist=self.dist, args=self.args)
        self.checkpoint: LoraCheckpoint | StoreCheckpoint = (
            LoraCheckpoint(self.out, self.engine, self.dist, cfg.lora(), self.store.args, cfg.to_toml(absolute=True),
                           cfg.keep_adapters)
            if cfg.method == "lora" else StoreCheckpoint(self.out, self.store, self.dist, self.device, cfg))

    def _adapted(self, store: BlockStore, start_from: str) -> BlockStore:
        """The weights a LoRA run adapts (`lora_weights`): `store`'s, or its kept base."""
        try:
            from_base, said = lora_weights(store, start_from)
        except ConfigError:
            store.close()
            raise
        if said:
            self.log(said)
        if not from_base:
            return store
        store.close()
        return BlockStore.open_base(store.path)

    def _refused(self) -> None:
        """A run stopped before its first step leaves no run folder it made (`RunFolder.refused`)."""
        if self.folder is not None:
            self.folder.refused()
            self.folder = None

    # ---- evaluation ----
    def validate(self) -> float | None:
        if self.val_data is None:
            return None
        total, count = 0.0, 0
        n = min(len(self.val_data), self.cfg.eval_batches * self.cfg.batch_size)
        for i in range(0, n, self.cfg.batch_size):
            ex = self.val_data.examples[i:i + self.cfg.batch_size]
            tok = torch.stack([e.tokens for e in ex])
            tgt = torch.stack([e.targets for e in ex])
            loss, k = self.engine.eval_loss(tok, tgt)
            total, count = total + loss * k, count + k
        return total / max(count, 1)

    def sample(self, prompt: str | None = None, max_new: int | None = None) -> str:
        ids = self.tok.encode(prompt or self.cfg.sample_prompt, bos=True)
        cfg = SamplingConfig(max_new_tokens=max_new or self.cfg.sample_tokens, temperature=0.0)
        new = list(generate_tokens(self.engine, ids, cfg, self.tok.eos_ids))
        return self.tok.decode(ids + new)[len(self.tok.decode(ids)):]  # keeps the leading space

    # ---- a full fine-tune's disk ----
    def _check_disk(self) -> None:
        """A full fine-tune needs room for a new version of every unit and of its optimizer state
        beside the current ones (and, keeping the base, the version after the base): refuse to
        start, with the numbers, where the disk does not have it."""
        store_bytes = self.store.total_bytes()
        per_param = (8 if self.cfg.optimizer == "adamw" else 0) + (4 if self.store.dtype != torch.float32 else 0)
        state = self.store.args.n_params() * per_param
        kept_base = not self.cfg.in_place and self.store.base_is_current()
        # processes that must agree on a step keep the one before until the next commit
        kept_prev = self.dist.enabled
        need = store_bytes * (1 + kept_base + kept_prev) + (2 + kept_prev) * state
        free = shutil.disk_usage(self.store.path).free
        if free < need:
            raise ConfigError(
                f"{self.store.path}: a full fine-tune needs about {readable_size(need)} free on its disk "
                f"({readable_size(store_bytes)} per version of the weights, {readable_size(state)} of optimizer "
                f"state, {'the base model kept, ' if kept_base else ''}a new version beside the last) and "
                f"{readable_size(free)} are free; free space, or pass --in-place to let the run replace the base model")
        self.log(f"disk: a full fine-tune takes about {readable_size(need)} beside the store; "
                 f"{readable_size(free)} free")

    def estimate_disk_writes(self) -> tuple[int, int]:
        """Bytes a full fine-tune writes per step (units + optimizer state) and over the run."""
        if self.cfg.method != "full":
            return 0, 0
        params = self.store.args.n_params()
        per_param = self.store.dtype.itemsize + (8 if self.cfg.optimizer == "adamw" else 0)
        if self.store.dtype != torch.float32:
            per_param += 4  # fp32 master copy
        per_step = params * per_param
        return per_step, per_step * self.cfg.steps

    def _start_full(self, resume: bool) -> int:
        """Say what a full fine-tune costs; the step it goes on from. A resume continues the run
        that owns the store (`StoreCheckpoint.resume`); a new run, or a resume where none had
        started, checks the disk and claims the store before it writes anything else."""
        cfg = self.cfg
        per, total = self.estimate_disk_writes()
        self.log(f"full fine-tune writes ≈{per / 1e9:.2f} GB per step, ≈{total / 1e9:.1f} GB "
                 f"over {cfg.steps} steps (SSD wear: prefer LoRA when it will do)")
        if cfg.grad_clip:
            self.log("note: grad_clip is ignored for a full fine-tune (each unit steps as soon "
                     "as its gradient exists, before the global norm is known)")
        assert isinstance(self.checkpoint, StoreCheckpoint)
        start = self.checkpoint.resume() if resume else None
        if start is not None:
            return start
        if resume:
            self.log(f"no full fine-tune had started on {self.store.path}: {self.out}'s starts now, at step 0")
        self._check_disk()  # every rank has its own store (checked when it was opened)
        if not cfg.in_place and not self.store.keeps_base:
            # the weights before this run stay: their files are kept beside the new versions
            self.log(f"the base model (step {self.store.step}) is kept beside the fine-tuned one "
                     f"(`--base` in export, eval and generate reads it; --in-place does not keep it)")
        elif cfg.in_place and self.store.keeps_base:
            self.log("--in-place: the kept base model is dropped")
        self.checkpoint.start(self.log)
        return 0

    # ---- the loop ----
    def run(self, resume: bool = False) -> list[dict]:
        cfg = self.cfg
        saved = recorded_config(self.out) if resume else {}  # read before a resume writes it again
        try:
            self._announce(resume)
            if cfg.method == "full":
                start = self._start_full(resume)
            else:
                start = self.checkpoint.resume() if resume else 0
        except BaseException:
            self._refused()
            raise
        for note in schedule_notes(cfg, start, saved) if resume else []:
            self.log(note)
        self._keep_arithmetic()
        self._announce_stage()
        record = RunRecord(self.out, self._history(start) if resume else [], start=start, steps=cfg.steps,
                           writes=self.dist.is_main, tensorboard=cfg.tensorboard, plot=cfg.plot,
                           progress=cfg.progress, progress_every=cfg.progress_every, log=self.log)
        self.log(f"{'resuming at' if resume else 'starting'} step {start} of {cfg.steps}; "
                 f"{len(self.train_data)} training sequences of {cfg.seq_len} tokens")
        # a full fine-tune counts its steps on from the store's (its dropout streams and commits)
        step_offset = self.store.step - start if cfg.method == "full" else 0
        try:
            for step in range(start, cfg.steps):
                row = self._step(step, step_offset)
                checkpoint = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or (
                    cfg.method == "lora" and row.get("val_loss") is not None)  # a validated adapter is kept
                if checkpoint:
                    self.checkpoint.save(step + 1, row)
                record.add(row, checkpoint)
        except TrainingError as exc:
            raise TrainingError(f"{exc}; the last good checkpoint in {self.out} is kept") from None
        except PeerLost as exc:  # a collective failed: another rank died or timed out
            raise TrainingError(_lost_contact(self.dist, exc, self.out)) from exc
        finally:
            record.close()
        return record.history

    def _announce(self, resume: bool) -> None:
        if not self.dist.enabled:  # ranks check before they join (the CLI): rank 0 writes here
            check_out(self.cfg, resume)
        self.out.mkdir(parents=True, exist_ok=True)
        budgets = self.engine.budgets  # the arithmetic goes into the run folder once it starts; what the
        # run chose (the dtype, keeping activations or not) and warnings are said
        self.log(config_line(self.cfg, budgets, self.out / BUDGETS))
        self.log(self.engine.dtype_note)
        if self.engine.narrow_note:
            self.log(self.engine.narrow_note)
        for note in budgets.notes:
            if note.startswith(("warning", "keep_activations", "spill_activations")):
                self.log(note)

    def _keep_arithmetic(self) -> None:
        """How the budgets were worked out, in the run folder (written once the run has started:
        a run refused before it starts leaves its folder as it was)."""
        if self.dist.is_main:
            (self.out / BUDGETS).write_text("\n".join(self.engine.budgets.notes or ["every budget was given"]) + "\n")

    def _announce_stage(self) -> None:
        """With pipeline stages every rank says what it holds."""
        if self.dist.stages == 1:
            return
        e, d = self.engine, self.dist
        own = e.units[e.lo:e.hi]
        print(f"rank {d.rank}: stage {d.stage} of {d.stages} (replica {d.dp_rank}), "
              f"units {own[0]}..{own[-1]} ({sum(self.store.unit_bytes(u) for u in own) / 1e9:.2f} GB), "
              + ("each micro-batch through them in turn (they stay resident)" if e.interleave
                 else "every micro-batch through each unit (block-major: the budget does not hold them all)"),
              flush=True)
        if self.cfg.sample_every:
            self.log("note: samples need the whole model in one process; with --stages they are "
                     "not drawn (export the result, then `blocktune generate`)")

    def _history(self, start: int) -> list[dict]:
        """The metrics rows of a resumed run up to its checkpoint at `start`."""
        history = read_metrics(self.out / "metrics.jsonl", upto=start, log=self.log)
        if start and (not history or history[-1]["step"] < start):
            lost = self.checkpoint.recorded_row(start)  # killed after the checkpoint, before its metrics row
            if lost is not None:
                history.append(lost)
                self.log(f"step {start}'s metrics row was lost with the killed run; recovered from the checkpoint")
        return history

    def _step(self, step: int, step_offset: int) -> dict:
        """Train step `step` (0-based); its metrics row."""
        cfg, W, r = self.cfg, self.dist.dp_world, self.dist.dp_rank
        t0 = time.perf_counter()
        # rank r takes its slice of each global micro-batch of W x batch_size examples
        micro = [self.train_data.batch(cfg.seed, ((step * cfg.grad_accum + m) * W + r) * cfg.batch_size,
                                       cfg.batch_size) for m in range(cfg.grad_accum)]
        lr = lr_at(cfg, step)
        res = self.engine.train_step(micro, lr=lr, step=step + step_offset,
                                     max_grad_norm=cfg.grad_clip if cfg.method == "lora" else None)
        dt = time.perf_counter() - t0
        row = {"step": step + 1, "loss": res.loss, "lr": lr, "tokens": res.tokens,
               "seconds": dt, "tokens_per_s": res.tokens / dt,
               "gb_read": res.bytes_read / 1e9, "gb_written": res.bytes_written / 1e9,
               "load_wait_s": res.load_wait_seconds}
        row.update(self._memory())
        row.update(self._traffic(res))
        self._evaluate(step + 1, row)
        return row

    def _memory(self) -> dict:
        """Peak memory so far: the process's, and the device's with the units' share of it."""
        row = {"peak_rss_gb": peak_rss_bytes() / 1e9}
        slots = self.engine.pager.slots
        if self.device.is_cpu and slots is not None and slots.overflows:  # converted units past the budget
            row["device_slot_overflows"] = slots.overflows
        if not self.device.is_cpu:
            row["peak_device_gb"] = self.device.peak_memory_bytes() / 1e9
            row["peak_device_reserved_gb"] = self.device.peak_reserved_bytes() / 1e9
            slots = self.engine.pager.slots  # the units' share of it: at most the device budget
            row["device_slots_gb"] = slots.peak_bytes / 1e9
            if slots.overflows:
                row["device_slot_overflows"] = slots.overflows
        return row

    def _traffic(self, res) -> dict:
        """What went between the ranks this step (counters reset for the next)."""
        row: dict = {}
        if self.dist.enabled:
            row["gb_all_reduced"] = self.dist.bytes_reduced / 1e9
            self.dist.bytes_reduced = 0
        if self.dist.stages > 1:  # what each rank read and waited for its neighbours, in rank order
            ranks = self.dist.gather_objects((res.bytes_read, res.units_read, self.dist.pipe.wait_seconds))
            self.dist.pipe.wait_seconds = 0.0
            for i, key in enumerate(("bytes_read_by_rank", "units_read_by_rank", "pipeline_wait_s_by_rank")):
                row[key] = [r[i] for r in ranks]
        return row

    def _evaluate(self, done: int, row: dict) -> None:
        """The validation loss and a sample, where `done` steps call for them."""
        cfg, staged = self.cfg, self.dist.stages > 1
        if (self.dist.is_main or staged) and (cfg.eval_every and done % cfg.eval_every == 0 or done == cfg.steps):
            row["val_loss"] = self.validate()  # with stages, every rank computes its units' share
        if self.dist.is_main and not staged and cfg.sample_every and done % cfg.sample_every == 0:
            row["sample"] = self.sample()
            self.log(f"step {done} sample: {cfg.sample_prompt}{row['sample']!r}")

    def close(self) -> None:
        self.engine.close()
        self.store.close()
        self.dist.close()
        if self.folder is not None:
            self.folder.release()


def _rank_store(cfg: RunConfig, dist: DistContext) -> str:
    """This rank's store path. Every rank of a data-parallel full fine-tune writes its own
    store: the same folder twice (by pattern, a link or a relative path) is refused on every
    rank at once, before any rank writes."""
    path = cfg.store.replace("{rank}", str(dist.rank))
    if cfg.method == "full" and dist.enabled:
        where = dist.gather_objects(f"{socket.gethostname()}:{os.path.realpath(path)}")
        shared = sorted({w for w in where if where.count(w) > 1})
        if "{rank}" not in cfg.store or shared:
            raise ConfigError(
                f"a data-parallel full fine-tune writes its store on every rank, and ranks "
                f"{[i for i, w in enumerate(where) if w in shared] or list(range(len(where)))} "
                f"were given one store ({', '.join(shared) or cfg.store}): give each rank its "
                "own copy, e.g. --store 'store-{rank}'")
    return path


def _lost_contact(dist: DistContext, exc: PeerLost, out: Path) -> str:
    """What a rank says when a collective with the others failed: where it stands, and how to go on."""
    where = f"rank {dist.rank} of {dist.world}"
    if dist.stages > 1:
        pipe = dist.pipe
        where += (f" (stage {dist.stage} of {dist.stages}, next to ranks "
                  f"{[x for x in (pipe.prev, pipe.next) if x is not None]})")
    return (f"{where}: lost contact with the other ranks ({str(exc).splitlines()[0][:200]}); the "
            f"last checkpoint in {out} is kept; restart every rank with --resume")
