"""The command line's settings: one source of defaults for the library and the CLI, --set for
every RunConfig field, --print-config, the shipped example configs, and exit codes that tell
a wrong command line from a failed run."""

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from blocktune.engine.engine import EngineConfig
from blocktune.engine.optim import OptimizerConfig
from blocktune.errors import ConfigError
from blocktune.model.args import LoraConfig
from blocktune.run.config import RunConfig
from blocktune.run.flags import flag_of
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


# --- one typed value per setting, from the command line to its use (#26) ---

def _sample(f: dataclasses.Field) -> tuple[list[str], object]:
    """A command line for the setting `f` and the value the run must get from it."""
    choices = [c for c in f.metadata["choices"] or () if c]
    if f.type == "bool":
        return [flag_of(f)], not f.default
    if choices:
        return [flag_of(f), choices[-1]], choices[-1]
    text, value = {"int": ("3", 3), "float": ("0.5", 0.5), "str": ("x", "x"), "list[str]": ("wq,w2", ["wq", "w2"]),
                   "Budget": ("2GiB", 2 << 30), "Size": ("inf", None)}[f.type]
    return [flag_of(f), text], value


def test_every_setting_is_a_flag_of_its_type():
    """finetune's flags are made from RunConfig's fields: every field (one added tomorrow too) is a
    flag spelled from its name that reaches the field typed; only what the run sets itself is not."""
    from blocktune.cli import build_parser
    from blocktune.run.flags import given_settings

    parser = build_parser()
    for f in dataclasses.fields(RunConfig):
        if not f.metadata["flag"]:
            assert f.name == "run_id"
            continue
        argv, want = _sample(f)
        cfg = RunConfig.load(None, **given_settings(parser.parse_args(["finetune", *argv])))
        assert getattr(cfg, f.name) == want, (argv, getattr(cfg, f.name))
        if f.type == "Budget":  # `inf` is a value (no limit), not a flag left out: the default is auto
            cfg = RunConfig.load(None, **given_settings(parser.parse_args(["finetune", flag_of(f), "inf"])))
            assert getattr(cfg, f.name) is None, (f.name, getattr(cfg, f.name))
    # the spellings users have been writing, all still there
    text = bt("finetune", "--help").stdout
    for flag in ("--no-progress", "--overwrite", "--in-place", "--start-from", "--keep-activations", "--device-budget",
                 "--host-budget", "--activation-budget", "--frozen-reads", "--compute-dtype", "--chat-template",
                 "--adapter", "--lora-rank", "--lora-targets", "--val-ratio", "--warmup-steps", "--eval-every",
                 "--nproc", "--resume", "--config", "--set", "--print-config", "--no-plot"):
        assert flag in text, flag
    for section in ("data:", "LoRA:", "optimizer and schedule:", "machine and budgets:", "run folder and output:"):
        assert section in text


def test_sizes_are_parsed_once_and_written_back_as_written():
    cfg = RunConfig(device_budget="1.5GiB", host_budget="inf", activation_budget=3 << 20, keep_activations="6GiB")
    assert (cfg.device_budget, cfg.host_budget, cfg.activation_budget, cfg.keep_activations) == (
        3 << 29, None, 3 << 20, 6 << 30)
    ecfg = cfg.engine_config()  # passed through, not parsed again
    assert (ecfg.device_budget, ecfg.host_budget, ecfg.keep_budget) == (3 << 29, None, 6 << 30)
    toml = tomllib.loads(cfg.to_toml())
    assert (toml["device_budget"], toml["host_budget"], toml["activation_budget"], toml["keep_activations"]) == (
        "1536MiB", "inf", "3MiB", "6GiB")
    assert RunConfig(**toml) == cfg and RunConfig().device_budget == "auto"
    assert RunConfig(keep_activations="0").keep_activations == 0  # as an older run folder's config.toml has it
    assert RunConfig(device_budget=1000).to_toml().count('device_budget = 1000\n') == 1
    with pytest.raises(ConfigError, match="device_budget='2GiB'"):
        EngineConfig(device_budget="2GiB")  # the engine takes parsed budgets only


@pytest.mark.parametrize("args,said", [
    (["--set", "lr=abc"], "lr='abc': must be a number"),
    (["--set", "lora_rank=abc"], "lora_rank='abc': must be a whole number"),
    (["--set", "steps=0"], "steps=0 must be positive"),
    (["--set", "progress=maybe"], "progress='maybe': must be true or false"),
    (["--set", "device_budget=lots"], "device_budget='lots': cannot read the size"),
    (["--set", "lora_targets=[1, 2]"], "lora_targets=[1, 2]: must be a list of names"),
    (["--keep-activations", "lots"], "keep_activations='lots'"),
    (["--host-budget=-1GiB"], "host_budget='-1GiB': must not be negative"),
    (["--set", "verify=sometimes"], "verify='sometimes': choose once, always or never"),
])
def test_a_value_of_the_wrong_type_is_a_usage_error_naming_the_setting(args, said):
    r = bt("finetune", "--store", "s", "--data", "d", *args, "--print-config")
    assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_config_file_of_the_wrong_type_is_a_usage_error_naming_the_file(tmp_path):
    path = tmp_path / "c.toml"
    for text, said in (('steps = "3"\n', "steps='3': must be a whole number"),
                       ("lr = true\n", "lr=True: must be a number"), ("store = 3\n", "store=3: must be a string")):
        path.write_text(text)
        r = bt("finetune", "--config", path, "--print-config")
        assert r.returncode == 2 and f"{path}: {said}" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A 2-step LoRA run started with relative paths from its own folder."""
    from blocktune_bench.corpus import demo_text
    from blocktune_bench.synthetic import write_meta_checkpoint
    from blocktune_export.meta import import_meta

    root = tmp_path_factory.mktemp("cfg")
    import_meta(write_meta_checkpoint(root / "meta", "tiny-7b", seed=0), root / "store", dtype=torch.float32).close()
    (root / "text.txt").write_text(demo_text())
    r = _bt_in(root, "finetune", "--store", "store", "--data", "text.txt", "--out", "run", "--steps", "2",
               "--seq-len", "16", "--grad-accum", "1", "--device", "cpu", "--set", "eval_every=0", "--set",
               "sample_every=0", "--no-plot", "--no-tensorboard", "--no-progress", "--lr", "0.001")
    assert r.returncode == 0, r.stderr[-2000:]
    return root, r.stderr


def _bt_in(cwd, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blocktune", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def test_a_run_prints_its_config_on_one_line_and_keeps_the_budget_arithmetic(small_run):
    root, stderr = small_run
    said = [line for line in stderr.splitlines() if line.startswith("config:")]
    assert len(said) == 1 and "steps=2" in said[0] and "lr=0.001" in said[0] and "budgets: device " in said[0]
    assert "batch_size=" not in said[0]  # a default is not repeated
    assert "device_budget auto:" not in stderr and "\nstore = " not in stderr
    assert "device_budget auto:" in (root / "run" / "budgets.txt").read_text()


def test_a_run_folder_config_has_absolute_paths_and_a_checksum(small_run, tmp_path):
    root, _ = small_run
    path = root / "run" / "config.toml"
    text = path.read_text()
    saved = tomllib.loads(text)
    assert (saved["store"], saved["data"]) == (str(root / "store"), str(root / "text.txt"))
    assert text.splitlines()[-1].startswith("# crc32: ")
    # a resume from elsewhere reads the same files
    r = _bt_in(tmp_path, "finetune", "--out", root / "run", "--resume", "--print-config")
    assert r.returncode == 0 and tomllib.loads(r.stdout)["data"] == str(root / "text.txt"), r.stderr
    # a digit changed in the file (a disk error, or an edit) is refused, and says what to do
    for key in ("lr", "seed", "weight_decay", "warmup_steps", "min_lr_ratio"):
        line = next(x for x in text.splitlines() if x.startswith(f"{key} = "))
        flipped = line[:-1] + str((int(line[-1]) + 1) % 10)
        path.write_text(text.replace(line + "\n", flipped + "\n"))
        r = _bt_in(tmp_path, "finetune", "--out", root / "run", "--resume")
        assert r.returncode == 2 and str(path) in r.stderr and "remove the checksum line" in r.stderr, r.stderr
    # edited on purpose: without the checksum line the file is taken as written
    path.write_text("".join(x + "\n" for x in text.splitlines() if not x.startswith("# crc32")).replace(
        "steps = 2\n", "steps = 3\n"))
    r = _bt_in(tmp_path, "finetune", "--out", root / "run", "--resume", "--print-config")
    assert r.returncode == 0 and tomllib.loads(r.stdout)["steps"] == 3, r.stderr
    path.write_text(text)
