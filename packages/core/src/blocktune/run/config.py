"""A fine-tuning run's settings (`RunConfig`: every field reachable from the command line,
its defaults the library's), the learning-rate schedule, and the check of `--out`."""

from __future__ import annotations

import dataclasses
import json
import math
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blocktune.engine.config import EngineConfig, OptimizerConfig, check_frozen_reads
from blocktune.errors import ConfigError
from blocktune.model.args import LoraConfig, lora_targets
from blocktune.settings import parse_bytes
from blocktune.store.lock import LOCK_DIR

__all__ = ["RunConfig", "lr_at", "check_out", "with_adapter_lora", "schedule_notes", "steps_of_epochs",
           "default_out"]


@dataclass
class RunConfig:
    """Every setting of a fine-tune, in one place. Defaults suit a 7B LoRA run on a 16 GB laptop."""

    store: str = ""
    data: str = ""
    # chats without the model's own template: a jinja file, or a format by name (chatml, llama3, llama2)
    chat_template: str = ""
    # the run folder; "": a new one per run, runs/<YYYYMMDD-HHMMSS> (printed), and for --resume the
    # newest under runs/ (`default_out`)
    out: str = ""
    overwrite: bool = False  # start afresh in an --out that holds an earlier run's record
    method: str = "lora"  # lora | full
    steps: int = 100
    # passes over the training examples instead of steps (0: steps decides): the run takes
    # ceil(epochs * examples / (batch_size * grad_accum * data-parallel ranks)) steps, says so, and
    # records them as `steps` in config.toml (a resume continues them); with steps given too it is refused
    epochs: float = 0.0
    lr: float = OptimizerConfig.lr
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    optimizer: str = OptimizerConfig.name  # adamw | sgd
    weight_decay: float = OptimizerConfig.weight_decay
    grad_clip: float = 1.0  # global norm, LoRA only (a full fine-tune steps each unit at once)
    batch_size: int = 1
    grad_accum: int = 8
    seq_len: int = 512
    val_ratio: float = 0.05
    eval_every: int = 25
    eval_batches: int = 8
    sample_every: int = 50
    sample_prompt: str = "The"
    sample_tokens: int = 32
    checkpoint_every: int = 10  # LoRA: and at every validation, so that the best adapter is kept
    # LoRA: adapter-step-N.safetensors kept in the run folder, the newest keep_adapters of them and the
    # best validated one (also adapter-best.safetensors; adapters.json lists them); 0: every one
    keep_adapters: int = 3
    seed: int = 0
    device: str = "auto"
    compute_dtype: str = ""  # "": the device's default (fp32 on CPU, bf16 on GPUs)
    # "auto": from the memory free at the start (blocktune.paging.budgets; printed with the config)
    device_budget: str = "auto"  # weights resident on the device, e.g. "2GiB"; "inf": no limit
    host_budget: str = "auto"  # unit files kept in RAM (pinned) for a GPU; on the CPU, the RAM for weights
    activation_budget: str = "auto"  # stashed block inputs in RAM before spilling to disk
    keep_activations: str = "0"  # RAM for activations kept to skip the recompute, e.g. "6GiB"; "inf": all
    verify: str = "once"  # crc32 of each file: "once" per file version per process, "always", "never"
    frozen_reads: str = "auto"  # CPU, LoRA: "mapped" (page cache), "direct" (store bigger than RAM), "auto"
    # LoRA's defaults are LoraConfig's (one source for the library and the CLI)
    lora_rank: int = LoraConfig.rank
    lora_alpha: float = LoraConfig.alpha
    lora_dropout: float = LoraConfig.dropout
    # Meta's names (wq wk wv wo w1 w2 w3), Hugging Face's (q_proj ... down_proj) or "all-linear" (all seven);
    # kept as Meta's (the store's), so config.toml, checkpoints and adapters are the same either way
    lora_targets: list[str] = field(default_factory=lambda: list(LoraConfig.targets))
    in_place: bool = False  # full: let the fine-tuned weights replace the base model's files
    # full, on a store that holds another run's tuned weights: "base" (the kept base) or "tuned"
    # (those weights, on purpose); "": refuse (blocktune.run.checkpoint.StoreCheckpoint)
    start_from: str = ""
    run_id: str = ""  # full: set at the start; the store's manifest names the run that owns it so
    adapter: str = ""  # LoRA: start from this adapter (blocktune's file or a PEFT folder); its rank,
    # alpha and targets replace lora_rank, lora_alpha and lora_targets
    dropout: float = 0.0  # embedding, attention and residual dropout
    plot: bool = True  # loss.png at each checkpoint and at the end (needs matplotlib)
    tensorboard: bool = True  # TensorBoard event files in the run folder (needs tensorboard)
    progress: bool = True
    progress_every: float = 30.0  # seconds between progress lines when stderr is not a terminal
    dist_timeout: float = 300.0  # seconds a rank waits in a collective before giving up
    stages: int = 1  # pipeline stages over the processes (each pages only its share of the units)

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise ConfigError(f"method={self.method!r}: choose lora or full")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "checkpoint_every", "stages"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        if self.verify not in ("once", "always", "never"):
            raise ConfigError(f"verify={self.verify!r}: choose once, always or never")
        check_frozen_reads(self.frozen_reads)
        if self.start_from not in ("", "base", "tuned"):
            raise ConfigError(f"start_from={self.start_from!r}: choose base or tuned")
        if self.keep_adapters < 0:
            raise ConfigError(f"keep_adapters={self.keep_adapters} must be 0 (keep every one) or more")
        if self.epochs < 0:
            raise ConfigError(f"epochs={self.epochs} must be positive (or 0: steps decides)")
        if not 0 <= self.val_ratio < 1:
            raise ConfigError(f"val_ratio={self.val_ratio} must be in [0, 1)")
        self.lora_targets = list(lora_targets(self.lora_targets))

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> RunConfig:
        values: dict[str, Any] = {}
        if path:
            p = Path(path)
            try:
                values = tomllib.loads(p.read_text())
            except FileNotFoundError:
                raise ConfigError(f"{p}: config file not found") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{p}: not valid TOML ({exc})") from None
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise ConfigError(f"{p}: unknown setting(s) {unknown}")
        given = {k: v for k, v in overrides.items() if v is not None}
        _steps_or_epochs(values, given, path)
        values.update(given)
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None

    def to_toml(self) -> str:
        lines = []
        for k, v in dataclasses.asdict(self).items():
            lines.append(f"{k} = {json.dumps(v)}")  # JSON scalars and lists are valid TOML
        return "\n".join(lines) + "\n"

    def lora(self) -> LoraConfig:
        return LoraConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, tuple(self.lora_targets))

    def engine_config(self) -> EngineConfig:
        from blocktune.paging.budgets import parse_budget  # torch's: the settings alone start without it

        return EngineConfig(
            method=self.method, lora=self.lora(),
            optimizer=OptimizerConfig(self.optimizer, self.lr, weight_decay=self.weight_decay),
            device=self.device, compute_dtype=self.compute_dtype or None,
            device_budget=parse_budget(self.device_budget), host_budget=parse_budget(self.host_budget),
            activation_budget=parse_budget(self.activation_budget), seed=self.seed,
            batch_hint=(self.batch_size, self.seq_len, self.grad_accum),
            keep_budget=parse_bytes(self.keep_activations), verify=self.verify,
            frozen_reads=self.frozen_reads,
        )


def _steps_or_epochs(file: dict[str, Any], line: dict[str, Any], path: str | Path | None) -> None:
    """A run's length is steps or epochs: both in one place (the command line, or the file) is
    refused; the command line's steps win over the file's epochs (its epochs over the file's
    steps need nothing: epochs, where set, decide)."""
    for layer, where in ((line, "the command line"), (file, str(path))):
        if layer.get("epochs") and "steps" in layer:
            raise ConfigError(f"{where} gives both steps={layer['steps']!r} and epochs={layer['epochs']!r}: "
                              "give one (with epochs the steps follow from the data)")
    if "steps" in line:
        file.pop("epochs", None)


def steps_of_epochs(cfg: RunConfig, examples: int, ranks: int) -> tuple[RunConfig, str | None]:
    """The config with the steps its epochs take over `examples` training examples on `ranks`
    data-parallel ranks (epochs resolved into steps), and the line that says so; unchanged
    without epochs."""
    if not cfg.epochs:
        return cfg, None
    per_step = cfg.batch_size * cfg.grad_accum * ranks
    steps = max(1, math.ceil(cfg.epochs * examples / per_step))
    return dataclasses.replace(cfg, steps=steps, epochs=0.0), (
        f"epochs {cfg.epochs:g}: {steps} steps ({examples} training examples, {per_step} per step: batch_size "
        f"{cfg.batch_size} x grad_accum {cfg.grad_accum} x {ranks} rank(s))")


RUNS = Path("runs")  # where run folders go when none is named


def default_out(resume: bool, log: Callable[[str], None], root: Path = RUNS) -> str:
    """The run folder when none is named, said in the log: a new runs/<YYYYMMDD-HHMMSS> per run
    (-2, -3, ... for runs started in one second); for a resume, the newest run under runs/ (the
    one whose config.toml was written last)."""
    if resume:
        found = sorted((p.stat().st_mtime, str(p.parent)) for p in root.glob("*/config.toml"))
        if not found:
            raise ConfigError(f"--resume without --out: no run folder under {root.resolve()} (none holds a "
                              "config.toml); name the run to continue with --out")
        log(f"resuming the newest run under {root}/: {found[-1][1]} (--out names another)")
        return found[-1][1]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = next(p for p in (root / stamp, *(root / f"{stamp}-{n}" for n in range(2, 10_000))) if not p.exists())
    log(f"run folder: {path} (a new one per run; --out names it)")
    return str(path)


def check_out(cfg: RunConfig, resume: bool) -> None:
    """Refuse to start afresh in a run folder that holds an earlier run's record, a LoRA resume
    where there is no checkpoint, and an --out that is not a folder (before anything is written)."""
    from blocktune.run.checkpoint import CHECKPOINT  # the run's checkpoint module builds on this one

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file, not a folder; the run folder holds the run's config, checkpoints "
                          "and metrics: name a new folder, or a run's folder")
    if resume and cfg.method == "lora" and not (out / CHECKPOINT).is_file():
        raise ConfigError(f"--resume: {out} holds no LoRA checkpoint ({CHECKPOINT}) to continue"
                          f"{'' if out.is_dir() else ' (the folder does not exist)'}; start the run there "
                          "without --resume, or name the run to continue with --out")
    if not resume and not cfg.overwrite and out.is_dir() and any(p.name != LOCK_DIR for p in out.iterdir()):
        raise ConfigError(f"{out}: the run folder is not empty (an earlier run's record is there); "
                          "continue it with --resume, replace it with --overwrite, or choose another --out")


def lr_at(cfg: RunConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def with_adapter_lora(cfg: RunConfig, lora: LoraConfig, adapter: str) -> tuple[RunConfig, str]:
    """The run's config with the adapter's rank, alpha and targets (the run continues that
    adapter), and the line that says so; a setting given otherwise (not the default) that
    disagrees with the adapter is refused, not silently replaced."""
    ours = {"lora_rank": (cfg.lora_rank, lora.rank), "lora_alpha": (cfg.lora_alpha, lora.alpha),
            "lora_targets": (list(cfg.lora_targets), list(lora.targets))}
    default = RunConfig()
    clash = [f"{k}={mine!r} (the adapter's: {theirs!r})" for k, (mine, theirs) in ours.items()
             if mine != theirs and mine != getattr(default, k)]
    if clash:
        raise ConfigError(f"--adapter {adapter} is LoRA rank {lora.rank}, alpha {lora.alpha}, targets "
                          f"{list(lora.targets)}, and the run sets {', '.join(clash)}: drop those settings to "
                          "continue the adapter, or drop --adapter to train a new one with them")
    new = dataclasses.replace(cfg, lora_rank=lora.rank, lora_alpha=lora.alpha, lora_targets=list(lora.targets))
    return new, (f"LoRA from --adapter {adapter}: rank {lora.rank}, alpha {lora.alpha}, targets "
                 f"{list(lora.targets)} (the adapter's own)")


def schedule_notes(cfg: RunConfig, start: int) -> list[str]:
    """What a resume at step `start` changes in the run's schedule: settings of the learning rate
    that differ from those the run folder's config.toml recorded (--steps reshapes the cosine)."""
    path = Path(cfg.out) / "config.toml"
    if not path.is_file():
        return []
    try:
        saved = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return []
    keys = ("steps", "lr", "warmup_steps", "min_lr_ratio")
    changed = [f"{k} {saved[k]} -> {getattr(cfg, k)}" for k in keys if k in saved and saved[k] != getattr(cfg, k)]
    if not changed:
        return []
    return [f"note: resuming with {', '.join(changed)}: the learning-rate schedule (warm-up, then cosine to "
            f"step {cfg.steps}) is the new one from step {start} on; steps 1-{start} followed the old one"]
