"""The fine-tuning run: one config, the loop, checkpoints and exact resume, metrics, progress.

Everything a run depends on is a function of the config and the step number: the examples
of a step (`Dataset.index`), its dropout streams (`blocktune.engine.rng`), its learning rate. So a
checkpoint holds only what training changes: LoRA adapters and their optimizer state (one
atomically written file), or, for a full fine-tune, the store itself, whose manifest is
switched atomically at the end of every step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from pathlib import Path

import torch

from blocktune.dist.groups import init_from_env
from blocktune.engine.engine import Engine
from blocktune.errors import ConfigError, StoreError, TrainingError
from blocktune.formats.adapters import save_adapter
from blocktune.formats.tokenizer import load_tokenizer
from blocktune.machine.hostmem import peak_rss_bytes
from blocktune.model.args import LoraConfig
from blocktune.run.config import RunConfig, check_out, lr_at
from blocktune.run.data import load_dataset
from blocktune.run.generate import SamplingConfig, generate_tokens
from blocktune.run.report import Progress, ScalarLog, plot_run, read_metrics
from blocktune.store.fileio import atomic_write
from blocktune.store.store import BlockStore

__all__ = ["Trainer"]

CHECKPOINT = "checkpoint.safetensors"


class Trainer:
    def __init__(self, cfg: RunConfig, log=print):
        self.cfg = cfg
        self.out = Path(cfg.out)
        from blocktune.machine.devices import resolve_device

        device = resolve_device(cfg.device).for_local_rank()  # a bad --device fails before any data is read
        self.device = device
        self.dist = init_from_env(device, cfg.dist_timeout, cfg.stages)
        self.log = log if self.dist.is_main else (lambda s: None)
        store_path = cfg.store.replace("{rank}", str(self.dist.rank))
        if cfg.method == "full" and self.dist.enabled:
            # every rank writes its own store: the same folder twice (by pattern, a link or a
            # relative path) is refused on every rank at once, before any rank writes
            where = self.dist.gather_objects(f"{socket.gethostname()}:{os.path.realpath(store_path)}")
            shared = sorted({w for w in where if where.count(w) > 1})
            if "{rank}" not in cfg.store or shared:
                raise ConfigError(
                    f"a data-parallel full fine-tune writes its store on every rank, and ranks "
                    f"{[i for i, w in enumerate(where) if w in shared] or list(range(len(where)))} "
                    f"were given one store ({', '.join(shared) or cfg.store}): give each rank its "
                    "own copy, e.g. --store 'store-{rank}'")
        # a full fine-tune writes the store: the writer lock first (a clear error if another
        # process has it); anything else reads the step it opened, pinned against collection
        self.store = BlockStore.open(store_path, writer=cfg.method == "full")
        if cfg.dropout:
            # dropout is a training setting, not a property of the stored weights
            self.store.args = self.store.args.with_dropout(cfg.dropout)
        self.tok = load_tokenizer(self.store)
        start_adapters = None
        if cfg.adapter:
            if cfg.method != "lora":
                raise ConfigError("--adapter starts a LoRA run from an adapter; it needs --method lora")
            from blocktune.formats.adapters import load_adapter

            given = load_adapter(cfg.adapter, self.store.args)
            cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets = (
                given.lora.rank, given.lora.alpha, list(given.lora.targets))
            start_adapters = given.tensors
        self.train_data, self.val_data = load_dataset(
            cfg.data, self.tok, cfg.seq_len, self.store.args.max_seq_len, cfg.val_ratio)
        ecfg = dataclasses.replace(cfg.engine_config(), device=str(device))
        self.engine = Engine(self.store, ecfg, adapters=start_adapters, dist=self.dist)
        self.start_step = 0

    # ---- checkpoints ----
    def _save_checkpoint(self, step: int, row: dict | None = None) -> None:
        staged = self.cfg.method == "lora" and self.dist.stages > 1
        adapters, opt = ((self.engine.adapter_state(), self.engine.adapters.optimizer_state())
                         if self.cfg.method == "lora" else ({}, {}))
        if staged:  # each stage holds its blocks' adapters: rank 0 writes them all, in one file
            mine = ({k: v.cpu() for k, v in adapters.items()},
                    {"state": {i: {k: torch.as_tensor(v).cpu() for k, v in st.items()} for i, st in opt["state"].items()},
                     "param_groups": opt["param_groups"]})
            adapters, opt = _merge_stages(self.dist.gather_objects(mine), self.dist)
        if not self.dist.is_main:
            return  # every replica holds the same adapters; rank 0 writes them
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out / "config.toml", self.cfg.to_toml().encode())
        if self.cfg.method == "full":
            return  # the store's manifest is the checkpoint, committed by every step
        from safetensors.torch import save

        tensors = {f"adapter.{k}": v for k, v in adapters.items()}
        for i, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"optim.{i}.{k}"] = torch.as_tensor(v).detach().cpu()
        meta = {"step": str(step), "format": "blocktune-checkpoint",
                "lora": json.dumps(self.cfg.lora().to_dict())}
        if row is not None:  # this step's metrics, in case the run dies before it logs them
            meta["row"] = json.dumps(row)
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        atomic_write(self.out / CHECKPOINT, save(cpu, metadata=meta))
        save_adapter(self.out / "adapter.safetensors", adapters, self.cfg.lora(), self.store.args)

    def _lost_row(self, step: int) -> dict | None:
        """The metrics of checkpoint step `step` as the checkpoint recorded them: the whole row
        (LoRA checkpoint), or what the store's commit carries (full: loss, tokens, lr)."""
        if self.cfg.method == "full":
            last = self.store.manifest.get("last_step") or {}
            first = int((self.store.manifest.get("run") or {}).get("first_step", 0))
            if last.get("step") != step + first:
                return None
            return {"step": step, "loss": last["loss"], "tokens": last["tokens"], "lr": last["lr"],
                    "recovered": True}
        from safetensors import safe_open

        with safe_open(str(self.out / CHECKPOINT), framework="pt") as f:
            meta = f.metadata() or {}
        row = json.loads(meta["row"]) if "row" in meta else None
        return {**row, "recovered": True} if row and row.get("step") == step else None

    def _resume(self) -> int:
        if self.cfg.method == "full":
            state = self.store.manifest.get("run") or {}
            step = self.store.step - int(state.get("first_step", self.store.step))
            steps = self.dist.gather_ints(step, self.device)
            if len(set(steps)) > 1 and max(steps) - min(steps) == 1 and step > min(steps) \
                    and (self.store.manifest.get("previous") or {}).get("step") == self.store.step - 1:
                # killed between the ranks' commits: the ranks ahead return to the step all have
                self.store.roll_back()
                print(f"rank {self.dist.rank}: the ranks' stores were at steps {steps} (killed between "
                      f"their commits); this one rolled back to step {min(steps)}", flush=True)
                step -= 1
            steps = self.dist.gather_ints(step, self.device)
            if len(set(steps)) > 1:
                raise TrainingError(f"the ranks' stores are at different steps {steps} and cannot be "
                                    "brought to one (more than a step apart, or no previous step kept); "
                                    "copy the store of one rank over the others, then resume")
            return step
        path = self.out / CHECKPOINT
        if not path.is_file():
            raise StoreError(f"{path}: no checkpoint to resume from (run without --resume first)")
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise StoreError(f"{path}: unreadable checkpoint ({exc})") from exc
        saved_lora = LoraConfig.from_dict(json.loads(meta["lora"]))
        if saved_lora != self.cfg.lora():
            raise ConfigError(f"{path}: checkpoint was made with LoRA {saved_lora}, the config "
                              f"says {self.cfg.lora()}; resume with the run's own config.toml")
        self.engine.load_adapters({k[8:]: v for k, v in tensors.items() if k.startswith("adapter.")})
        if not self.engine.adapters.blocks:  # a pipeline stage without blocks: no optimizer state
            return int(meta["step"])
        opt = self.engine.lora_optimizer
        sd = opt.state_dict()
        state: dict[int, dict[str, torch.Tensor]] = {}
        lo, n = self.engine.adapters.offset, len(sd["param_groups"][0]["params"])  # a stage's slice
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                if lo <= int(i) < lo + n:
                    state.setdefault(int(i) - lo, {})[name] = v
        sd["state"] = state
        opt.load_state_dict(sd)
        return int(meta["step"])

    # ---- the loop ----
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

    def _check_disk(self) -> None:
        """A full fine-tune needs room for a new version of every unit and of its optimizer state
        beside the current ones (and, keeping the base, the version after the base): refuse to
        start, with the numbers, where the disk does not have it."""
        import shutil

        store_bytes = self.store.total_bytes()
        per_param = (8 if self.cfg.optimizer == "adamw" else 0) + (4 if self.store.dtype != torch.float32 else 0)
        state = self.store.args.n_params() * per_param
        m = self.store.manifest
        kept_base = not self.cfg.in_place and m.get("base", {}).get("units", m["units"]) == m["units"]
        # processes that must agree on a step keep the one before until the next commit
        kept_prev = self.dist.enabled
        need = store_bytes * (1 + kept_base + kept_prev) + (2 + kept_prev) * state
        free = shutil.disk_usage(self.store.path).free
        if free < need:
            raise ConfigError(
                f"{self.store.path}: a full fine-tune needs about {need / 1e9:.1f} GB free on its disk "
                f"({store_bytes / 1e9:.1f} GB per version of the weights, {state / 1e9:.1f} GB of optimizer "
                f"state, {'the base model kept, ' if kept_base else ''}a new version beside the last) and "
                f"{free / 1e9:.1f} GB are free; free space, or pass --in-place to let the run replace the base model")
        self.log(f"disk: a full fine-tune takes about {need / 1e9:.1f} GB beside the store; "
                 f"{free / 1e9:.1f} GB free")

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

    def run(self, resume: bool = False) -> list[dict]:
        cfg = self.cfg
        if not self.dist.enabled:  # ranks check before they join (the CLI): rank 0 writes here
            check_out(cfg, resume)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log("config:\n" + cfg.to_toml())
        for note in self.engine.budgets.notes:
            self.log(note)
        if cfg.method == "full":
            per, total = self.estimate_disk_writes()
            self.log(f"full fine-tune writes ≈{per / 1e9:.2f} GB per step, ≈{total / 1e9:.1f} GB "
                     f"over {cfg.steps} steps (SSD wear: prefer LoRA when it will do)")
            if cfg.grad_clip:
                self.log("note: grad_clip is ignored for a full fine-tune (each unit steps as soon "
                         "as its gradient exists, before the global norm is known)")
            if not resume:  # every rank has its own store (checked above)
                self._check_disk()
                base = {}
                if not cfg.in_place and "base" not in self.store.manifest:
                    # the weights before this run stay: their files are kept beside the new versions
                    base = {"base": {"step": self.store.step, "units": self.store.manifest["units"]}}
                    self.log(f"the base model (step {self.store.step}) is kept beside the fine-tuned one "
                             f"(`--base` in export, eval and generate reads it; --in-place does not keep it)")
                elif cfg.in_place and "base" in self.store.manifest:
                    self.log("--in-place: the kept base model is dropped")
                manifest = dict(self.store.manifest)
                if cfg.in_place:
                    manifest.pop("base", None)
                self.store.manifest = manifest
                self.store.commit(self.store.step, {}, run={"first_step": self.store.step}, **base)
        start = self._resume() if resume else 0
        metrics_path = self.out / "metrics.jsonl"
        main = self.dist.is_main
        staged = self.dist.stages > 1
        if staged:  # every rank says what it holds
            e = self.engine
            own = e.units[e.lo:e.hi]
            print(f"rank {self.dist.rank}: stage {self.dist.stage} of {self.dist.stages} (replica {self.dist.dp_rank}), "
                  f"units {own[0]}..{own[-1]} ({sum(self.store.unit_bytes(u) for u in own) / 1e9:.2f} GB), "
                  + ("each micro-batch through them in turn (they stay resident)" if e.interleave
                     else "every micro-batch through each unit (block-major: the budget does not hold them all)"),
                  flush=True)
        if staged and cfg.sample_every:
            self.log("note: samples need the whole model in one process; with --stages they are "
                     "not drawn (export the result, then `blocktune generate`)")
        history = read_metrics(metrics_path, upto=start) if resume else []
        if resume and start and (not history or history[-1]["step"] < start):
            lost = self._lost_row(start)  # killed after the checkpoint, before its metrics row
            if lost is not None:
                history.append(lost)
                self.log(f"step {start}'s metrics row was lost with the killed run; recovered from the checkpoint")
        if main:
            _write_metrics(metrics_path, history)
        scalars = ScalarLog(self.out, cfg.tensorboard and main, start, log=self.log)
        self.log(f"{'resuming at' if resume else 'starting'} step {start} of {cfg.steps}; "
                 f"{len(self.train_data)} training sequences of {cfg.seq_len} tokens")
        first_step = self.store.step - start if cfg.method == "full" else 0
        bar = Progress(cfg.steps, start, desc="finetune", enabled=cfg.progress and main,
                       every=cfg.progress_every)
        W, r = self.dist.dp_world, self.dist.dp_rank
        try:
            for step in range(start, cfg.steps):
                t0 = time.perf_counter()
                # rank r takes its slice of each global micro-batch of W x batch_size examples
                micro = [self.train_data.batch(cfg.seed, ((step * cfg.grad_accum + m) * W + r) * cfg.batch_size,
                                               cfg.batch_size) for m in range(cfg.grad_accum)]
                lr = lr_at(cfg, step)
                res = self.engine.train_step(micro, lr=lr, step=step + first_step,
                                             max_grad_norm=cfg.grad_clip if cfg.method == "lora" else None)
                dt = time.perf_counter() - t0
                row = {"step": step + 1, "loss": res.loss, "lr": lr, "tokens": res.tokens,
                       "seconds": dt, "tokens_per_s": res.tokens / dt,
                       "gb_read": res.bytes_read / 1e9, "gb_written": res.bytes_written / 1e9,
                       "load_wait_s": res.load_wait_seconds}
                row["peak_rss_gb"] = peak_rss_bytes() / 1e9
                if not self.device.is_cpu:
                    row["peak_device_gb"] = self.device.peak_memory_bytes() / 1e9
                    row["peak_device_reserved_gb"] = self.device.peak_reserved_bytes() / 1e9
                    slots = self.engine.pager.slots  # the units' share of it: at most the device budget
                    row["device_slots_gb"] = slots.peak_bytes / 1e9
                    if slots.overflows:
                        row["device_slot_overflows"] = slots.overflows
                if self.dist.enabled:
                    row["gb_all_reduced"] = self.dist.bytes_reduced / 1e9
                    self.dist.bytes_reduced = 0
                if staged:  # what each rank read and waited for its neighbours, in rank order
                    ranks = self.dist.gather_objects((res.bytes_read, res.units_read, self.dist.pipe.wait_seconds))
                    self.dist.pipe.wait_seconds = 0.0
                    for i, key in enumerate(("bytes_read_by_rank", "units_read_by_rank", "pipeline_wait_s_by_rank")):
                        row[key] = [r[i] for r in ranks]
                if (main or staged) and (cfg.eval_every and (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                    row["val_loss"] = self.validate()
                if main and not staged and cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                    row["sample"] = self.sample()
                    self.log(f"step {step + 1} sample: {cfg.sample_prompt}{row['sample']!r}")
                checkpoint = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps
                if checkpoint:
                    self._save_checkpoint(step + 1, row)
                history.append(row)
                if main:
                    _append_metric(metrics_path, row)
                    scalars.add(row)
                    if checkpoint:
                        scalars.flush()
                        if cfg.plot:
                            plot_run(self.out, history, log=self.log)
                bar.update(1, loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}",
                           read=f"{row['gb_read']:.2f}GB", wrote=f"{row['gb_written']:.2f}GB")
        except TrainingError as exc:
            raise TrainingError(f"{exc}; the last good checkpoint in {self.out} is kept") from None
        except RuntimeError as exc:
            if not self.dist.enabled:
                raise
            # a collective failed: another rank died or timed out
            where = f"rank {self.dist.rank} of {self.dist.world}"
            if self.dist.stages > 1:
                pipe = self.dist.pipe
                where += (f" (stage {self.dist.stage} of {self.dist.stages}, next to ranks "
                          f"{[x for x in (pipe.prev, pipe.next) if x is not None]})")
            raise TrainingError(f"{where}: lost contact with the other ranks "
                                f"({str(exc).splitlines()[0][:200]}); the last checkpoint in "
                                f"{self.out} is kept; restart every rank with --resume") from None
        finally:
            bar.close()
            scalars.close()
        return history

    def close(self) -> None:
        self.engine.close()
        self.store.close()
        self.dist.close()


def _merge_stages(parts: list, dist) -> tuple[dict, dict]:
    """The adapters and optimizer state of the whole model from every rank's (adapters,
    optimizer state dict): replica 0 of each stage, in stage order, its parameters' indices
    shifted past the stages before (the single process's order and checkpoint)."""
    adapters, state, offset = {}, {}, 0
    for s in range(dist.stages):
        ad, sd = parts[s * dist.dp_world]
        adapters.update(ad)
        for i, st in sd["state"].items():
            state[int(i) + offset] = st
        offset += len(sd["param_groups"][0]["params"])
    return adapters, {"state": state}


def _write_metrics(path: Path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def _append_metric(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
