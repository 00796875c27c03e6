"""Which run owns a store's tuned state. A full fine-tune records itself in the store's manifest
(`BlockStore.start_run`: a run id, the run folder's absolute path, the first step) before it
writes anything else, and the same id in its run folder's config.toml. A new run or a resume
reads both and gets a verdict here; `blocktune.run.checkpoint.StoreCheckpoint` acts on it.
"""

from __future__ import annotations

import secrets
import time
import tomllib
from pathlib import Path

from blocktune.errors import ConfigError
from blocktune.store.store import BlockStore

__all__ = ["new_run_id", "recorded_run_id", "describe", "start_refusal", "resume_verdict", "lora_weights"]


def new_run_id() -> str:
    """A run's id: when it started, and enough randomness that two runs never share one."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


def recorded_run_id(out: Path) -> str | None:
    """The run id in `out`/config.toml; None where the run never wrote one (it was killed before,
    or never started, or ran before runs had ids)."""
    try:
        value = tomllib.loads((out / "config.toml").read_text()).get("run_id")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return value if isinstance(value, str) and value else None


def describe(run: dict | None) -> str:
    """A run as the messages name it: its id and run folder."""
    if run is None:
        return "a run that recorded no owner (the library's Engine writes in place)"
    if not run.get("id"):
        return "a run recorded before runs had ids"
    return f"run {run['id']} ({run.get('out') or 'run folder not recorded'})"


def start_refusal(store: BlockStore, start_from: str) -> str | None:
    """Why a new full run may not start on `store` as asked, or None. A store whose weights
    another run tuned is not trained on silently: --start-from says how."""
    tuned = store.holds_tuned()
    if start_from == "tuned" and not tuned:  # most likely the wrong --store (a fresh copy, say)
        return (f"{store.path}: --start-from tuned, but no full fine-tune has tuned this store (its weights "
                f"are the model as prepared, step {store.step}); give the store a full run tuned, or leave "
                "--start-from out to train these weights")
    if start_from == "base" and tuned and not store.keeps_base:
        return (f"{store.path}: --start-from base, but no base model is kept (it was tuned with "
                "--in-place); --start-from tuned continues its weights, or prepare the store again")
    if not tuned or start_from:
        return None
    run = store.run_record()
    ways = [f"resume that run with --resume --out {run['out']}"] if run and run.get("out") else []
    if store.keeps_base:
        ways.append(f"start from the base model kept at step {store.manifest['base']['step']} with "
                    "--start-from base (the tuned weights are dropped: export them first to keep them)")
    ways.append("continue the tuned weights on purpose, as a new run, with --start-from tuned"
                + ("" if store.keeps_base else " (no base model is kept: they were tuned --in-place)"))
    return (f"{store.path}: holds the tuned weights of {describe(run)} at store step {store.step}; a new "
            f"full run would train on top of them without a word: {'; or '.join(ways)}")


def resume_verdict(store: BlockStore, out: Path, mine: str | None) -> tuple[str, str | None]:
    """Whether `store`'s tuned state is the run in `out` (its id `mine`, from its config.toml):
    "own", "none" (no run ever started on the store: the resume starts it) or "foreign", with
    the message that refuses it."""
    run = store.run_record()
    here = str(out.resolve())
    if run is None:
        metrics = out / "metrics.jsonl"
        if mine is None and not (metrics.is_file() and metrics.stat().st_size):
            return "none", None  # a requeued or killed start: nothing trained yet
        return "foreign", (
            f"{store.path}: no full fine-tune was ever started on this store, but {out} records run "
            f"{mine or '(no id)'} and its steps; --store is not that run's store (give the store it "
            "trained), or start afresh with --overwrite")
    if (run.get("id") or None) == mine or (mine is None and run.get("out") == here) or not run.get("id"):
        return "own", None  # an id in both, the run folder killed before its config, or a run from before ids
    return "foreign", (
        f"{store.path}: its tuned state belongs to {describe(run)}, not to {out} "
        f"({'run ' + mine if mine else 'no run id recorded there'}); resume that run with --out "
        f"{run.get('out')}, or start a new run in a new --out (--start-from says from which weights). "
        f"Nothing was written to {out} or the store")


def lora_weights(store: BlockStore, start_from: str) -> tuple[bool, str | None]:
    """Which weights a LoRA run on `store` adapts: (whether the kept base model, the line that says
    so where a full run tuned the store). A LoRA run never changes the store, so it needs no claim:
    by default it adapts the tuned weights; --start-from base, the kept base (`BlockStore.open_base`).
    --start-from that asks for weights the store does not hold is refused (`start_refusal`)."""
    refusal = start_refusal(store, start_from) if start_from else None
    if refusal:
        raise ConfigError(refusal)
    if not store.holds_tuned():
        return False, None  # the store's weights are its base: there is one choice
    tuned = f"the tuned weights of {describe(store.run_record())} (store step {store.step})"
    if start_from == "base":
        return True, (f"LoRA adapts the base model kept at step {store.manifest['base']['step']} "
                      f"(--start-from base), not {tuned}")
    other = "; --start-from base adapts the kept base model instead" if store.keeps_base and not start_from else ""
    return False, f"LoRA adapts {tuned}{other}"
