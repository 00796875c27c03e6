"""A fine-tuning run's settings (`RunConfig`: every field reachable from the command line,
its defaults the library's), the learning-rate schedule, and the check of `--out`."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blocktune.engine.config import EngineConfig, check_frozen_reads
from blocktune.engine.optim import OptimizerConfig
from blocktune.errors import ConfigError
from blocktune.model.args import LoraConfig
from blocktune.paging.budgets import parse_budget
from blocktune.store.lock import LOCK_DIR

__all__ = ["COMPUTE_DTYPES", "RunConfig", "lr_at", "check_out", "with_adapter_lora", "schedule_notes"]

COMPUTE_DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass
class RunConfig:
    """Every setting of a fine-tune, in one place. Defaults suit a 7B LoRA run on a 16 GB laptop."""

    store: str = ""
    data: str = ""
    # chats without the model's own template: a jinja file, or a format by name (chatml, llama3, llama2)
    chat_template: str = ""
    out: str = "runs/latest"
    overwrite: bool = False  # start afresh in an --out that holds an earlier run's record
    method: str = "lora"  # lora | full
    steps: int = 100
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
    checkpoint_every: int = 10
    seed: int = 0
    device: str = "auto"
    # auto: bf16 on a CPU whose bf16 instructions outrun fp32 (blocktune.machine.cpubf16;
    # BLOCKTUNE_CPU_BF16=0/1 overrides), else fp32; a GPU's default (bf16); or fp32, bf16, fp16
    compute_dtype: str = "auto"
    # "auto": from the memory free at the start (blocktune.paging.budgets; printed with the config)
    device_budget: str = "auto"  # weights resident on the device, e.g. "2GiB"; "inf": no limit
    host_budget: str = "auto"  # unit files kept in RAM (pinned) for a GPU; on the CPU, the RAM for weights
    activation_budget: str = "auto"  # stashed block inputs in RAM before spilling to disk
    # RAM for activations kept to skip the backward's recompute, e.g. "6GiB"; "inf": all; "0": none;
    # "auto": what is left beside every unit resident (the fast mode where memory allows; said in the log)
    keep_activations: str = "auto"
    verify: str = "once"  # crc32 of each file: "once" per file version per process, "always", "never"
    frozen_reads: str = "auto"  # CPU, LoRA: "mapped" (page cache), "direct" (store bigger than RAM), "auto"
    # LoRA's defaults are LoraConfig's (one source for the library and the CLI)
    lora_rank: int = LoraConfig.rank
    lora_alpha: float = LoraConfig.alpha
    lora_dropout: float = LoraConfig.dropout
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
        if self.compute_dtype not in COMPUTE_DTYPES + ("",):
            raise ConfigError(f"compute_dtype={self.compute_dtype!r}: choose {', '.join(COMPUTE_DTYPES)}")
        if self.verify not in ("once", "always", "never"):
            raise ConfigError(f"verify={self.verify!r}: choose once, always or never")
        check_frozen_reads(self.frozen_reads)
        if self.start_from not in ("", "base", "tuned"):
            raise ConfigError(f"start_from={self.start_from!r}: choose base or tuned")
        if not 0 <= self.val_ratio < 1:
            raise ConfigError(f"val_ratio={self.val_ratio} must be in [0, 1)")
        self.lora_targets = list(self.lora_targets)

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
        values.update({k: v for k, v in overrides.items() if v is not None})
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
        return EngineConfig(
            method=self.method, lora=self.lora(),
            optimizer=OptimizerConfig(self.optimizer, self.lr, weight_decay=self.weight_decay),
            device=self.device, compute_dtype=self.compute_dtype or None,
            device_budget=parse_budget(self.device_budget), host_budget=parse_budget(self.host_budget),
            activation_budget=parse_budget(self.activation_budget), seed=self.seed,
            batch_hint=(self.batch_size, self.seq_len, self.grad_accum),
            keep_budget=parse_budget(self.keep_activations), verify=self.verify,
            frozen_reads=self.frozen_reads,
        )


def check_out(cfg: RunConfig, resume: bool) -> None:
    """Refuse to start afresh in a run folder that holds an earlier run's record."""
    out = Path(cfg.out)
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
