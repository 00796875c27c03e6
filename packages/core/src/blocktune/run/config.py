"""A fine-tuning run's settings: `RunConfig`, every field typed once where it comes in (a size
is bytes, None or `auto` from then on) and carrying its command-line flag's help, choices and
section (blocktune.run.flags makes the flags); its TOML form, checksummed in a run folder; the
learning-rate schedule, and the check of `--out`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import tomllib
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from blocktune.engine.config import FROZEN_READS, EngineConfig, OptimizerConfig
from blocktune.errors import BudgetError, ConfigError
from blocktune.model.args import LoraConfig, lora_targets
from blocktune.settings import AUTO, parse_budget, short_size, size_text
from blocktune.store.lock import LOCK_DIR

if TYPE_CHECKING:
    from blocktune.paging.budgets import Budgets

__all__ = ["RunConfig", "SECTIONS", "MACHINE", "FIELDS", "typed", "toml_value", "with_checksum", "config_line",
           "lr_at", "check_out", "with_adapter_lora", "schedule_notes", "recorded_config", "steps_of_epochs", "default_out"]

Budget: TypeAlias = "int | str | None"  # bytes, None (no limit) or AUTO (worked out at the start)

# the sections of `finetune --help`, in order
DATA, LORA, METHOD, OPTIM, EVAL, MACHINE_SECTION, RUN, PROCESSES = SECTIONS = (
    "data", "LoRA", "method (full fine-tunes)", "optimizer and schedule", "evaluation, samples and checkpoints",
    "machine and budgets", "run folder and output", "processes")
MACHINE = ("device", "device_budget", "frozen_reads")  # the settings generate and eval share with a run
PATHS = ("store", "data", "adapter", "chat_template")  # written absolute in a run folder's config.toml
CHECKSUM = "# crc32: "  # the last line of a run folder's config.toml: the crc32 of the lines above it


def _setting(default: Any, section: str, help: str = "", *, choices: tuple | None = None, least: int | None = None,
             flag: bool = True) -> Any:
    """A RunConfig field: its default, and for its flag its section, help and choices; `least`: the
    smallest value it takes; `flag=False`: set by the run, not given on the command line."""
    meta = {"section": section, "help": help, "choices": choices, "least": least, "flag": flag}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _either(choices: tuple) -> str:
    named = [str(c) for c in choices if c != ""]
    return ", ".join(named[:-1]) + f" or {named[-1]}" if len(named) > 1 else named[0]


@dataclass
class RunConfig:
    """Every setting of a fine-tune, in one place. Defaults suit a 7B LoRA run on a 16 GB laptop."""

    store: str = _setting("", DATA, "prepared block store")
    data: str = _setting("", DATA, ".txt (packed), or rows (.jsonl, a .json array, .parquet, a `datasets` folder) "
                         "of prompt/response, chat messages, alpaca or ShareGPT")
    chat_template: str = _setting("", DATA, "chats for a model whose tokenizer has no chat template: a jinja file "
                                  "(as tokenizer_config.json holds it) or a format by name: chatml, llama3, llama2")
    # "": a new one per run, runs/<YYYYMMDD-HHMMSS> (printed), and for --resume the newest under runs/
    out: str = _setting("", RUN, "run folder: config, checkpoints, metrics.jsonl, loss.png (default: a new "
                        "runs/<YYYYMMDD-HHMMSS>; with --resume, the newest under runs/)")
    overwrite: bool = _setting(False, RUN, "start afresh in an --out that holds an earlier run")
    method: str = _setting("lora", METHOD, "", choices=("lora", "full"))
    steps: int = _setting(100, OPTIM, "optimizer steps", least=1)
    # the steps follow from the data: ceil(epochs * examples / (batch_size * grad_accum * data-parallel
    # ranks)), said and recorded as `steps` in config.toml (a resume continues them)
    epochs: float = _setting(0.0, OPTIM, "passes over the training examples instead of --steps (0: --steps "
                             "decides; both in one place is refused)", least=0)
    lr: float = _setting(OptimizerConfig.lr, OPTIM, "peak learning rate")
    min_lr_ratio: float = _setting(0.1, OPTIM, "the cosine decays to lr * min_lr_ratio")
    warmup_steps: int = _setting(10, OPTIM, "steps of linear warm-up", least=0)
    optimizer: str = _setting(OptimizerConfig.name, OPTIM, "", choices=("adamw", "sgd"))
    weight_decay: float = _setting(OptimizerConfig.weight_decay, OPTIM)
    grad_clip: float = _setting(1.0, OPTIM, "global norm, LoRA only (a full fine-tune steps each unit at once)")
    batch_size: int = _setting(1, OPTIM, "sequences per micro-batch", least=1)
    grad_accum: int = _setting(8, OPTIM, "micro-batches per step", least=1)
    seq_len: int = _setting(512, DATA, "tokens per sequence", least=1)
    val_ratio: float = _setting(0.05, DATA, "the share of the data held out for validation, in [0, 1)")
    eval_every: int = _setting(25, EVAL, "steps between validation losses (0: at the end only)", least=0)
    eval_batches: int = _setting(8, EVAL, "batches per validation loss", least=0)
    sample_every: int = _setting(50, EVAL, "steps between samples (0: none)", least=0)
    sample_prompt: str = _setting("The", EVAL)
    sample_tokens: int = _setting(32, EVAL, "", least=0)
    checkpoint_every: int = _setting(10, EVAL, "steps (LoRA: and at every validation, so that the best adapter "
                                     "is kept)", least=1)
    keep_adapters: int = _setting(3, EVAL, "LoRA: adapter-step-N.safetensors kept in the run folder, the newest N "
                                  "and the best validated one (also adapter-best.safetensors; 0: every one)", least=0)
    seed: int = _setting(0, OPTIM)
    device: str = _setting("auto", MACHINE_SECTION, "auto, cpu, cuda[:N] or mps; emu and emu-mps: the CPU behaving "
                           "as an accelerator (as MPS), for tests")
    # auto: bf16 on a CPU whose bf16 instructions outrun fp32 (blocktune.machine.cpubf16; BLOCKTUNE_CPU_BF16=0/1
    # overrides), else fp32; a GPU's default (bf16). "" (an older run's config.toml): the device's default
    compute_dtype: str = _setting("auto", MACHINE_SECTION, "arithmetic dtype (auto: bf16 on a CPU where it outruns "
                                  "fp32, else fp32; bf16 on GPUs)", choices=("auto", "fp32", "bf16", "fp16", ""))
    # budgets: "auto" works them out from the memory free at the start (blocktune.paging.budgets)
    device_budget: Budget = _setting(AUTO, MACHINE_SECTION, "bytes of weights resident on the device, e.g. 2GiB; "
                                     "inf: no limit; auto: from the free memory")
    host_budget: Budget = _setting(AUTO, MACHINE_SECTION, "RAM for unit files (pinned, for a GPU); on the CPU the "
                                   "RAM for weights, e.g. 4GiB")
    activation_budget: Budget = _setting(AUTO, MACHINE_SECTION, "RAM for stashed block inputs before they spill "
                                         "to disk, e.g. 4GiB")
    # auto: what is left beside every unit resident (the fast mode where memory allows; said in the log)
    keep_activations: Budget = _setting(AUTO, MACHINE_SECTION, "RAM for activations kept to skip the backward's "
                                        "recompute, e.g. 6GiB, inf or 0; auto: what is left beside every unit "
                                        "resident")
    spill_activations: Budget = _setting(AUTO, MACHINE_SECTION, "disk for the activations that keep_activations "
                                         "leaves out (CPU): written in the forward, read back instead of "
                                         "recomputed, e.g. 20GiB; 0: recompute them; auto: what they need")
    verify: str = _setting("once", MACHINE_SECTION, "crc32 of each file: once per file version per process, "
                           "always, never", choices=("once", "always", "never"))
    frozen_reads: str = _setting("auto", MACHINE_SECTION, "CPU, frozen weights: through the page cache (mapped), "
                                 "past it (direct, for a store bigger than RAM), or by the store's size against "
                                 "free memory (auto)", choices=FROZEN_READS)
    # LoRA's defaults are LoraConfig's (one source for the library and the CLI)
    lora_rank: int = _setting(LoraConfig.rank, LORA, "", least=1)
    lora_alpha: float = _setting(LoraConfig.alpha, LORA)
    lora_dropout: float = _setting(LoraConfig.dropout, LORA)
    # kept as Meta's names (the store's): config.toml, checkpoints and adapters are the same either way
    lora_targets: list[str] = _setting(list(LoraConfig.targets), LORA, "the layers LoRA adapts: Meta's names (wq wk "
                                       "wv wo w1 w2 w3), Hugging Face's (q_proj ... down_proj) or all-linear")
    in_place: bool = _setting(False, METHOD, "full: the fine-tuned weights replace the base model's files "
                              "(default: the base is kept beside them, `--base` reads it; this needs a second "
                              "copy's disk space)")
    start_from: str = _setting("", METHOD, "on a store a full run tuned: from its kept base model (full: the "
                               "tuned weights are dropped), or from the tuned weights on purpose (default: full "
                               "refuses, lora adapts the tuned weights; each says so)", choices=("", "base", "tuned"))
    # full: set at the start; the store's manifest names the run that owns it so
    run_id: str = _setting("", RUN, flag=False)
    adapter: str = _setting("", LORA, "continue from this adapter (blocktune's adapter.safetensors or a PEFT "
                            "folder): its rank, alpha and targets are the run's")
    dropout: float = _setting(0.0, OPTIM, "embedding, attention and residual dropout")
    plot: bool = _setting(True, RUN, "loss.png at each checkpoint and at the end (needs matplotlib)")
    tensorboard: bool = _setting(True, RUN, "TensorBoard event files in the run folder (needs tensorboard)")
    progress: bool = _setting(True, RUN, "progress lines on stderr")
    progress_every: float = _setting(30.0, RUN, "seconds between progress lines when stderr is not a terminal")
    dist_timeout: float = _setting(300.0, PROCESSES, "seconds a rank waits in a collective before giving up")
    stages: int = _setting(1, PROCESSES, "pipeline stages: each process pages only its stage's units; the "
                           "processes are stages x data-parallel replicas", least=1)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, typed(f, getattr(self, f.name)))
        if not 0 <= self.val_ratio < 1:
            raise ConfigError(f"val_ratio={self.val_ratio} must be in [0, 1)")
        self.lora_targets = list(lora_targets(self.lora_targets))

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> RunConfig:
        """The config in the TOML file `path` (if any) with `overrides` (None: not given) over it."""
        values = _read_toml(Path(path)) if path else {}
        given = {k: v for k, v in overrides.items() if v is not None}
        _steps_or_epochs(values, given, path)
        values.update(given)
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None

    def to_toml(self, absolute: bool = False) -> str:
        """The settings as a --config file takes them (sizes as '2GiB', 'inf', 'auto'); `absolute`:
        with the files' paths absolute, as a run folder keeps them (a resume from elsewhere)."""
        lines = []
        for f in dataclasses.fields(self):
            value = toml_value(f, getattr(self, f.name))
            if absolute and f.name in PATHS:
                value = _absolute(f.name, value)
            lines.append(f"{f.name} = {json.dumps(value)}")  # JSON scalars and lists are valid TOML
        return "\n".join(lines) + "\n"

    def lora(self) -> LoraConfig:
        return LoraConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, tuple(self.lora_targets))

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            method=self.method, lora=self.lora(),
            optimizer=OptimizerConfig(self.optimizer, self.lr, weight_decay=self.weight_decay),
            device=self.device, compute_dtype=self.compute_dtype or None,
            device_budget=self.device_budget, host_budget=self.host_budget,
            activation_budget=self.activation_budget, seed=self.seed,
            batch_hint=(self.batch_size, self.seq_len, self.grad_accum),
            keep_budget=self.keep_activations, spill_budget=self.spill_activations, verify=self.verify,
            frozen_reads=self.frozen_reads,
        )

    def inference_config(self, lora: LoraConfig | None, batch: int, seq: int) -> EngineConfig:
        """generate's and eval's engine: this config's machine settings (`MACHINE`), read-only, with
        an adapter's LoRA (None: the model alone)."""
        return EngineConfig(method="lora" if lora else "full", lora=lora, device=self.device,
                            device_budget=self.device_budget, read_only=True, frozen_reads=self.frozen_reads,
                            batch_hint=(batch, seq, 1))

    def changed(self) -> str:
        """The settings that differ from the defaults, on one line (`key=value ...`)."""
        default = RunConfig()
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "run_id" and value != getattr(default, f.name):
                value = toml_value(f, value)
                parts.append(f"{f.name}={value if isinstance(value, str) and value.isprintable() else json.dumps(value)}")
        return " ".join(parts)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("must be a whole number")
    return value


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("must be a number")
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("must be true or false")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("must be a string (in TOML, in quotes)")
    return value


def _names(value: Any) -> list[str]:
    """A list of names; a string of names separated by commas is one too."""
    items = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, str) for v in items):
        raise TypeError('must be a list of names, e.g. ["wq", "wv"], or names separated by commas')
    return [name.strip() for item in items for name in item.split(",") if name.strip()]


def _bytes(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if isinstance(value, bool) or not (value is None or isinstance(value, (int, float, str))):
            raise TypeError("must be a size like 512MiB, 4GiB or inf")
        value = parse(value)
        if isinstance(value, int) and value < 0:
            raise ValueError("must not be negative")
        return value
    return convert


# each annotation's conversion: the one place a setting's value gets its type
_TYPES: dict[str, Callable[[Any], Any]] = {"int": _int, "float": _float, "bool": _bool, "str": _str,
                                           "list[str]": _names, "Budget": _bytes(parse_budget)}


def typed(f: dataclasses.Field, value: Any, where: str = "") -> Any:
    """`value` as the setting `f`'s type, within its choices and bounds; else a ConfigError that
    names the setting (after `where`: the file or flag it came from)."""
    try:
        out = _TYPES[f.type](value)
    except (TypeError, ValueError, BudgetError) as exc:
        raise ConfigError(f"{where}{f.name}={value!r}: {exc}") from None
    choices, least = f.metadata.get("choices"), f.metadata.get("least")
    if choices and out not in choices:
        raise ConfigError(f"{where}{f.name}={value!r}: choose {_either(choices)}")
    if least is not None and out < least:
        raise ConfigError(f"{where}{f.name}={value!r} must be {'positive' if least == 1 else f'at least {least}'}")
    return out


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_untyped = [f"{f.name}: {f.type}" for f in FIELDS.values() if f.type not in _TYPES]
if _untyped:  # a new field's annotation needs its conversion in _TYPES
    raise TypeError(f"RunConfig fields of a type without a conversion: {_untyped}")


def toml_value(f: dataclasses.Field, value: Any) -> Any:
    """A setting's value as a config file writes it (a size as '2GiB', 'inf' or 'auto')."""
    return size_text(value) if f.type == "Budget" else value


def _absolute(name: str, value: str) -> str:
    from blocktune.formats.chat import NAMED_FORMATS

    if not value or (name == "chat_template" and value in NAMED_FORMATS):
        return value
    return os.path.abspath(value)


def with_checksum(text: str) -> str:
    """`text` (a run folder's config.toml) with its checksum line added at the end."""
    return text + f"{CHECKSUM}{zlib.crc32(text.encode()):08x}\n"


def _checked(path: Path, text: str) -> str:
    """A config file's text, its checksum line (if it has one) checked: a file changed since its
    run wrote it is refused (a hand-written one has no line and is taken as it is)."""
    lines = text.splitlines(keepends=True)
    marks = [i for i, line in enumerate(lines) if line.startswith(CHECKSUM)]
    if not marks:
        return text
    i = marks[-1]
    rest = "".join(lines[:i] + lines[i + 1:])
    if f"{CHECKSUM}{zlib.crc32(rest.encode()):08x}" != lines[i].strip():
        raise ConfigError(f"{path}: the settings no longer match the checksum the run wrote with them "
                          f"({lines[i].strip()}): the file changed after the run wrote it (a disk or copy error, or "
                          "an edit); if you edited it on purpose, remove the checksum line")
    return rest


def _read_toml(path: Path) -> dict[str, Any]:
    """A config file's settings, each typed (errors name the file)."""
    try:
        values = tomllib.loads(_checked(path, path.read_text()))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {unknown}")
    return {k: typed(FIELDS[k], v, where=f"{path}: ") for k, v in values.items()}


def config_line(cfg: RunConfig, budgets: Budgets, arithmetic: Path) -> str:
    """The config a run prints at its start: the settings that differ from the defaults, the
    budgets it resolved (`Budgets`), and where the arithmetic behind them is."""
    return (f"config: {cfg.changed()}; budgets: device {short_size(budgets.device)}, host "
            f"{short_size(budgets.host)}, activations {short_size(budgets.activation)}, kept activations "
            f"{short_size(budgets.keep)}" + (f", on disk {short_size(budgets.spill)}" if budgets.spill else "")
            + (f", optimizer state in RAM {short_size(budgets.state)}" if budgets.state else "") + f" (how: {arithmetic}; "
            "every setting: --print-config)")


def _steps_or_epochs(file: dict[str, Any], line: dict[str, Any], path: str | Path | None) -> None:
    """A run's length is steps or epochs: both in one place (the command line, or the file) is
    refused (but in a run folder's config.toml, which records the epochs asked and the steps they
    came to); the command line's steps win over the file's epochs (its epochs over the file's
    steps need nothing: epochs, where set, decide)."""
    recorded = path is not None and CHECKSUM in Path(path).read_text()  # read already: it exists
    for layer, where in ((line, "the command line"), (file, str(path))):
        if layer.get("epochs") and "steps" in layer and not (layer is file and recorded):
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
    return dataclasses.replace(cfg, steps=steps), (  # config.toml records both: a resume reads the epochs
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


def recorded_config(out: str | Path) -> dict[str, Any]:
    """The settings the run folder's config.toml recorded ({} where it has none it can read)."""
    try:
        return tomllib.loads((Path(out) / "config.toml").read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}


def schedule_notes(cfg: RunConfig, start: int, saved: dict[str, Any]) -> list[str]:
    """What a resume at step `start` changes in the run's schedule: settings of the learning rate
    that differ from those the run folder's config.toml recorded before the resume (`saved`, from
    `recorded_config`: --steps reshapes the cosine)."""
    keys = ("steps", "lr", "warmup_steps", "min_lr_ratio")
    changed = [f"{k} {saved[k]} -> {getattr(cfg, k)}" for k in keys if k in saved and saved[k] != getattr(cfg, k)]
    if not changed:
        return []
    return [f"note: resuming with {', '.join(changed)}: the learning-rate schedule (warm-up, then cosine to "
            f"step {cfg.steps}) is the new one from step {start} on; steps 1-{start} followed the old one"]
