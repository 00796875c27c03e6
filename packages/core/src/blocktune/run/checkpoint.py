"""A run's checkpoint and its exact resume: a LoRA run writes its adapters and their optimizer
state in one atomically written file; a full fine-tune's checkpoint is the store itself, whose
manifest every step commits, so resuming is agreeing on the step all ranks' stores hold.

Both write the run's config.toml beside the checkpoint and give back, for a run killed between
its checkpoint and that step's metrics row, the row as the checkpoint recorded it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch

from blocktune.dist.groups import DistContext
from blocktune.engine.engine import Engine
from blocktune.errors import ChecksumError, ConfigError, StoreError, TrainingError
from blocktune.formats.adapters import save_adapter
from blocktune.machine.devices import Device
from blocktune.model.args import LoraConfig, ModelArgs
from blocktune.run.config import RunConfig, with_checksum
from blocktune.run.keptadapters import KeptAdapters
from blocktune.run.ownership import describe, new_run_id, recorded_run_id, resume_verdict, start_refusal
from blocktune.store.fileio import crc32
from blocktune.store.safefiles import atomic_write, is_write_failure, write_failed
from blocktune.store.store import BlockStore

__all__ = ["CHECKPOINT", "LoraCheckpoint", "StoreCheckpoint", "merge_stages", "stage_optimizer_state"]

CHECKPOINT = "checkpoint.safetensors"


def _write_config(out: Path, config_toml: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.toml", with_checksum(config_toml).encode())  # --resume checks it


class LoraCheckpoint:
    """checkpoint.safetensors (adapters as `adapter.*`, optimizer state as `optim.{i}.*` with
    the single process's parameter indices, the step, the LoRA settings, the step's metrics row)
    and adapter.safetensors beside it, kept as adapter-step-N.safetensors (`KeptAdapters`);
    rank 0 writes them for every rank."""

    def __init__(self, out: Path, engine: Engine, dist: DistContext, lora: LoraConfig,
                 model: ModelArgs, config_toml: str, keep_adapters: int = 3):
        self.out, self.engine, self.dist = out, engine, dist
        self.lora, self.model, self.config_toml = lora, model, config_toml
        self.path = out / CHECKPOINT
        self.kept = KeptAdapters(out, keep_adapters)  # adapter-step-N.safetensors, the best marked
        self.saved: int | None = None  # the step the checkpoint on disk holds, once known

    def save(self, step: int, row: dict | None = None) -> None:
        """Write the checkpoint of `step` (a collective with pipeline stages: call on every rank)."""
        adapters, opt = self.engine.adapter_state(), self.engine.adapters.optimizer_state()
        if self.dist.stages > 1:  # each stage holds its blocks' adapters: rank 0 writes them all, in one file
            adapters, opt = merge_stages(self.dist.gather_objects(_on_cpu(adapters, opt)), self.dist)
        if not self.dist.is_main:
            return  # every replica holds the same adapters; rank 0 writes them
        from safetensors.torch import save

        tensors = {f"adapter.{k}": v for k, v in adapters.items()}
        for i, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"optim.{i}.{k}"] = torch.as_tensor(v).detach().cpu()
        meta = {"step": str(step), "format": "blocktune-checkpoint", "lora": json.dumps(self.lora.to_dict())}
        if row is not None:  # this step's metrics, in case the run dies before it logs them
            meta["row"] = json.dumps(row)
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        meta["crc32"] = str(_checkpoint_crc(cpu, meta))
        try:  # each file is replaced atomically: a full disk leaves the one before
            _write_config(self.out, self.config_toml)
            atomic_write(self.path, save(cpu, metadata=meta))
            self.saved = step
            save_adapter(self.out / "adapter.safetensors", adapters, self.lora, self.model)
            self.kept.add(step, (row or {}).get("val_loss"))
        except OSError as exc:
            if not is_write_failure(exc):
                raise
            held = "no checkpoint yet" if self.saved is None else f"step {self.saved}"
            raise write_failed(self.out, exc, f"the run folder still holds {held}, intact",
                               "--resume" if self.saved is not None else "run again") from exc

    def resume(self) -> int:
        """Load the adapters and this rank's optimizer state; the step the checkpoint was made at."""
        meta, tensors = self._read()
        saved = LoraConfig.from_dict(json.loads(meta["lora"]))
        if saved != self.lora:
            raise ConfigError(f"{self.path}: checkpoint was made with LoRA {saved}, the config "
                              f"says {self.lora}; resume with the run's own config.toml")
        self.engine.load_adapters({k[8:]: v for k, v in tensors.items() if k.startswith("adapter.")})
        if self.engine.adapters.blocks:  # a pipeline stage without blocks has no optimizer state
            opt = self.engine.lora_optimizer
            opt.load_state_dict(stage_optimizer_state(opt.state_dict(), tensors, self.engine.adapters.offset))
        self.saved = int(meta["step"])
        self.kept.resume(self.saved)
        return self.saved

    def _read(self) -> tuple[dict, dict[str, torch.Tensor]]:
        if not self.path.is_file():
            raise StoreError(f"{self.path}: no checkpoint to resume from (run without --resume first)")
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise StoreError(f"{self.path}: unreadable checkpoint ({type(exc).__name__}: {exc}); "
                             f"{self._fix()}") from exc
        if "crc32" in meta:  # a checkpoint written before #29 has none
            got, want = _checkpoint_crc(tensors, meta), meta["crc32"]
            if want != str(got):
                raise ChecksumError(f"{self.path}: checksum mismatch (crc32 {got}, the checkpoint says "
                                    f"{want}); the checkpoint is damaged. {self._fix()}")
        return meta, tensors

    def _fix(self) -> str:
        """What to do when the checkpoint cannot be used."""
        adapter = self.out / "adapter.safetensors"
        return (f"Restore the run folder from a copy, or start a new run (another --out) from the "
                f"adapters it saved, checked on their own: --adapter {adapter} (the optimizer state "
                "is lost), or start over with --overwrite")

    def recorded_row(self, step: int) -> dict | None:
        """The metrics row of `step` as the checkpoint recorded it, if it is that step's."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
        row = json.loads(meta["row"]) if "row" in meta else None
        return {**row, "recovered": True} if row and row.get("step") == step else None


class StoreCheckpoint:
    """A full fine-tune's checkpoint: the store's committed step (every rank commits its own
    store each step), counted from the step the run started at (`BlockStore.start_run`). The
    store's manifest names the run that owns its tuned state; `start` claims it, `resume`
    continues only the run that holds it (`blocktune.run.ownership`)."""

    def __init__(self, out: Path, store: BlockStore, dist: DistContext, device: Device, cfg: RunConfig):
        self.out, self.store, self.dist, self.device = out, store, dist, device
        self.cfg = cfg
        self.run_id = ""

    def save(self, step: int, row: dict | None = None) -> None:
        """The store's manifest is the checkpoint, committed by every step: only the config here."""
        if self.dist.is_main:
            self._write_config()

    def _write_config(self) -> None:
        """config.toml with the run's id, headed by where its weights live."""
        where = (f"# a full fine-tune: its weights are the store {Path(self.cfg.store).resolve()} (its manifest "
                 f"names run {self.run_id} as their owner); ")
        where += ("the base model it started from is kept there (`--base` reads it)\n" if self.store.keeps_base
                  else "no base model is kept (--in-place)\n")
        _write_config(self.out, where + dataclasses.replace(self.cfg, run_id=self.run_id).to_toml(absolute=True))

    def start(self, log: Callable[[str], None]) -> None:
        """Claim the store for a new run, in one commit before anything else is written (the run,
        and the base it keeps), then write config.toml with the same id. A store whose weights
        another run tuned is refused unless the config's start_from says how to begin."""
        cfg, store = self.cfg, self.store
        _agree(self.dist, start_refusal(store, cfg.start_from))
        from_base = cfg.start_from == "base" and store.holds_tuned()
        if store.holds_tuned():
            log(f"the store holds the tuned weights of {describe(store.run_record())} (step {store.step}): "
                + ("this run starts from the kept base model instead; those weights are dropped" if from_base
                   else "this run continues them (--start-from tuned)"))
        run_id = self.dist.gather_objects(new_run_id())[0]  # one id for every rank's store
        store.start_run(keep_base=not cfg.in_place, run_id=run_id, out=str(self.out.resolve()),
                        from_base=from_base)
        self.dist.gather_objects(None)  # every rank's store names the run before its folder does
        self.run_id = run_id
        if self.dist.is_main:
            self._write_config()

    def resume(self) -> int | None:
        """The step of the run to go on from, where the store's tuned state is this run's (the
        step all ranks' stores hold); None where no run was ever started on the store (a
        requeued or killed start: `start` it). Another run's store is refused (a collective)."""
        mine = self.dist.gather_objects(recorded_run_id(self.out) if self.dist.is_main else None)[0]
        verdict, refusal = resume_verdict(self.store, self.out, mine)
        _agree(self.dist, refusal)
        ids = {r["id"] for r in self.dist.gather_objects(self.store.run_record()) if r and r.get("id")}
        if verdict == "none" and not ids:
            return None
        self.run_id = mine or next(iter(ids), "")
        if verdict == "none":  # killed between the ranks' claims, before any step: claim it now
            self.store.start_run(keep_base=not self.cfg.in_place, run_id=self.run_id, out=str(self.out.resolve()))
        if self.dist.is_main:
            self._write_config()
        return self._agreed_step()

    def _agreed_step(self) -> int:
        """The run's step all ranks' stores hold; a rank killed one commit ahead of the others
        rolls back to theirs (a collective: call on every rank)."""
        first = self.store.run_start()
        step = self.store.step - (self.store.step if first is None else first)
        steps = self.dist.gather_ints(step, self.device)
        if len(set(steps)) > 1 and max(steps) - min(steps) == 1 and step > min(steps) \
                and self.store.previous_step() == self.store.step - 1:
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

    def recorded_row(self, step: int) -> dict | None:
        """What the store's commit of `step` carries of its metrics (loss, tokens, lr)."""
        last = self.store.last_step()
        if last is None or last.get("step") != step + (self.store.run_start() or 0):
            return None
        return {"step": step, "loss": last["loss"], "tokens": last["tokens"], "lr": last["lr"],
                "recovered": True}


def _agree(dist: DistContext, refusal: str | None) -> None:
    """Refuse on every rank where any rank's store refuses (the first rank's reason)."""
    reasons = [r for r in dist.gather_objects(refusal) if r]
    if reasons:
        raise ConfigError(reasons[0])


def _checkpoint_crc(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> int:
    """crc32 of a checkpoint's metadata (its own crc32 aside), keys, dtypes, shapes and data."""
    crc = crc32(json.dumps({k: v for k, v in meta.items() if k != "crc32"}, sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        crc = crc32(f"{k}:{t.dtype}:{list(t.shape)};".encode(), crc)
        crc = crc32(memoryview(t.reshape(-1).view(torch.uint8).numpy()), crc)
    return crc


def _on_cpu(adapters: dict, opt: dict) -> tuple[dict, dict]:
    """A stage's adapters and optimizer state dict, on the CPU to travel to rank 0."""
    state = {i: {k: torch.as_tensor(v).cpu() for k, v in st.items()} for i, st in opt["state"].items()}
    return {k: v.cpu() for k, v in adapters.items()}, {"state": state, "param_groups": opt["param_groups"]}


def merge_stages(parts: list, dist: DistContext) -> tuple[dict, dict]:
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


def stage_optimizer_state(sd: dict, tensors: dict[str, torch.Tensor], offset: int) -> dict:
    """`merge_stages` undone for one stage: its optimizer state dict `sd` with the state of the
    checkpoint's `optim.{i}.{name}` tensors whose whole-model index `i` is one of its
    parameters, [offset, offset + its count), renumbered from 0."""
    n = len(sd["param_groups"][0]["params"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            if offset <= int(i) < offset + n:
                state.setdefault(int(i) - offset, {})[name] = v
    return {**sd, "state": state}
