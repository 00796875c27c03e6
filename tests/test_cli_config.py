"""The command line's settings: one source of defaults for the library and the CLI, --set for
every RunConfig field, --print-config, the shipped example configs, and exit codes that tell
a wrong command line from a failed run."""

import dataclasses
import tomllib
from pathlib import Path

import pytest
from blocktune.engine.engine import EngineConfig
from blocktune.engine.optim import OptimizerConfig
from blocktune.model.args import LoraConfig
from blocktune.run.config import RunConfig
from conftest import bt

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.toml"))


def test_library_and_cli_defaults_are_one():
    """A library user (EngineConfig()) and a CLI user (RunConfig()) get the same LoRA and optimizer
    (they differed: lr 1e-4 vs 2e-4, targets wq/wv vs wq/wk/wv/wo, LoRA dropout 0 vs 0.05)."""
    run, lib = RunConfig().engine_config(), EngineConfig()
    assert run.lora == lib.lora == LoraConfig()
    assert run.optimizer == lib.optimizer == OptimizerConfig()


def test_set_reaches_every_field_and_print_config_shows_it(tmp_path):
    r = bt("finetune", "--store", "s", "--data", "d", "--set", "lora_rank=16", "--set", 'lora_targets=["wq","w2"]',
           "--set", "sample_prompt=Once upon", "--set", "eval-every=7", "--lr", "3e-4", "--compute-dtype", "bf16",
           "--print-config")
    assert r.returncode == 0, r.stderr
    cfg = RunConfig(**tomllib.loads(r.stdout))
    assert (cfg.lora_rank, cfg.lora_targets, cfg.sample_prompt, cfg.eval_every) == (16, ["wq", "w2"], "Once upon", 7)
    assert cfg.lr == 3e-4 and cfg.compute_dtype == "bf16"
    assert set(tomllib.loads(r.stdout)) == {f.name for f in dataclasses.fields(RunConfig)}
    # a flag wins over --set, --set over --config
    (tmp_path / "c.toml").write_text("steps = 5\nseq_len = 99\n")
    r = bt("finetune", "--store", "s", "--data", "d", "--config", tmp_path / "c.toml", "--set", "steps=6",
           "--set", "seq_len=77", "--seq-len", "88", "--print-config")
    cfg = tomllib.loads(r.stdout)
    assert (cfg["steps"], cfg["seq_len"]) == (6, 88)


def test_bad_settings_are_usage_errors_and_failed_runs_are_not(tmp_path):
    r = bt("finetune", "--store", "s", "--data", "d", "--set", "lora_rnak=4")
    assert r.returncode == 2 and "'lora_rnak' is not a setting" in r.stderr
    r = bt("finetune", "--store", "s", "--data", "d", "--set", "method=adam", "--print-config")
    assert r.returncode == 2 and "method='adam'" in r.stderr
    r = bt("finetune", "--store", tmp_path / "nothing", "--data", tmp_path / "d.txt")
    assert r.returncode == 1 and "not a blocktune store" in r.stderr
    assert bt("finetune", "--no-such-flag").returncode == 2


def test_help_shows_defaults():
    r = bt("finetune", "--help")
    assert "(default: 0.0002)" in r.stdout and "(default: 'lora')" in r.stdout
    assert "--set" in r.stdout and "--print-config" in r.stdout and "--compute-dtype" in r.stdout


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_shipped_example_configs_load(path):
    values = tomllib.loads(path.read_text())
    cfg = RunConfig.load(path, store="s", data="d")
    assert all(getattr(cfg, k) == v for k, v in values.items())
    cfg.engine_config()  # every value is one the engine takes
