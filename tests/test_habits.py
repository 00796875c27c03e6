"""The names and habits users bring from peft, TRL and torchtune (#28): LoRA targets by Hugging
Face's names and "all-linear", --epochs, a run folder per run, an adapter per checkpoint, and
the messages and exits of a Unix tool. Each test runs the command as a user does."""

import subprocess
import sys
import tomllib

import pytest
import torch
from blocktune_bench.corpus import demo_text
from blocktune_bench.synthetic import write_meta_checkpoint
from blocktune_export.meta import import_meta
from conftest import bt
from safetensors.torch import load_file

SEVEN = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny Meta checkpoint with its tokenizer prepared into an fp32 store, a text, a config."""
    root = tmp_path_factory.mktemp("habits")
    store = import_meta(write_meta_checkpoint(root / "meta", "tiny-7b", seed=0), root / "store", dtype=torch.float32)
    store.close()
    (root / "text.txt").write_text(demo_text())
    (root / "run.toml").write_text("eval_every = 0\nsample_every = 0\nplot = false\ntensorboard = false\n"
                                   "val_ratio = 0.0\nwarmup_steps = 0\nprogress = false\n")
    return root


def lora(prepared, *extra, steps: int | None = 2, cwd=None) -> subprocess.CompletedProcess:
    """A tiny LoRA `blocktune finetune` on the prepared store (run in `cwd`)."""
    cmd = [sys.executable, "-m", "blocktune", "finetune", "--store", str(prepared / "store"), "--data",
           str(prepared / "text.txt"), "--config", str(prepared / "run.toml"), "--seq-len", "16",
           "--batch-size", "2", "--grad-accum", "1", "--lr", "3e-3", "--device", "cpu", *map(str, extra)]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)


def test_lora_targets_by_hugging_face_names_and_all_linear(prepared, tmp_path):
    """q_proj/v_proj train the very tensors wq/wv do (the same adapter, bit for bit, and the
    same config.toml); all-linear is all seven; an unknown name is exit 2 with the valid ones."""
    meta = lora(prepared, "--out", tmp_path / "meta", "--set", 'lora_targets=["wq","wv"]')
    hf = lora(prepared, "--out", tmp_path / "hf", "--set", 'lora_targets=["q_proj","v_proj"]')
    assert meta.returncode == 0 and hf.returncode == 0, hf.stderr[-2000:]
    a, b = load_file(tmp_path / "meta" / "adapter.safetensors"), load_file(tmp_path / "hf" / "adapter.safetensors")
    assert sorted(a) == sorted(b) and {k.split(".")[3] for k in a} == {"wq", "wv"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert tomllib.loads((tmp_path / "hf" / "config.toml").read_text())["lora_targets"] == ["wq", "wv"]

    r = bt("finetune", "--store", "s", "--data", "d", "--set", "lora_targets=all-linear", "--print-config")
    assert r.returncode == 0 and tomllib.loads(r.stdout)["lora_targets"] == SEVEN, r.stderr
    r = bt("finetune", "--store", "s", "--data", "d", "--set", 'lora_targets=["gate_proj","wq","q_proj"]',
           "--print-config")
    assert tomllib.loads(r.stdout)["lora_targets"] == ["w1", "wq"]
    r = bt("finetune", "--store", "s", "--data", "d", "--set", 'lora_targets=["qproj"]', "--print-config")
    assert r.returncode == 2 and "['qproj']" in r.stderr and "q_proj" in r.stderr and "'wq'" in r.stderr
    assert "all-linear" in r.stderr and "Traceback" not in r.stderr
