"""Data parallel over real processes on loopback (gloo): W ranks x batch B == 1 rank x batch W*B."""

import json
import shutil
import signal
import subprocess
import sys

import pytest
from blocktune import BlockStore
from conftest import finetune_cmd, multi_process_root, signal_rank_one
from safetensors.torch import load_file

PY = sys.executable
# SGD: each trained tensor moves by its gradient, so the comparison sees the gradients to their
# rounding (AdamW's first steps move near-zero gradients by about ±lr whatever their last bits).
CONFIG = ("dropout = 0.0\nlora_dropout = 0.0\nwarmup_steps = 1\neval_every = 0\nsample_every = 0\n"
          "plot = false\nval_ratio = 0.0\ncheckpoint_every = 1\ndist_timeout = 60.0\noptimizer = \"sgd\"\n")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    store = multi_process_root(root, CONFIG)
    return root, store


def _losses(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("method,budget", [("lora", "inf"), ("full", "inf"), ("full", "600KiB"), ("full", "300KiB")])
def test_two_ranks_equal_one_rank_with_double_batch(prepared, tmp_path, method, budget):
    """A full fine-tune overlaps each unit's all-reduce with the next unit's backward when the
    budget holds two units (600 KiB here: each unit is at most 256 KiB), and does not at one."""
    root, store = prepared
    single_store, rank_store = store, store
    if method == "full":
        single_store = tmp_path / "single"
        shutil.copytree(store, single_store)
        for r in (0, 1):
            shutil.copytree(store, tmp_path / f"rank-{r}")
        rank_store = tmp_path / "rank-{rank}"
    subprocess.run(finetune_cmd(root, single_store, tmp_path / "one", method, 4), check=True, capture_output=True)
    two = subprocess.run(finetune_cmd(root, rank_store, tmp_path / "two", method, 2,
                              extra=["--nproc", "2", "--device-budget", budget]),
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    one, dual = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    print("1 rank x 4:", [r["loss"] for r in one])
    print("2 ranks x 2:", [r["loss"] for r in dual], "all-reduced per step (GB):", [r["gb_all_reduced"] for r in dual])
    assert len(one) == len(dual) == 3
    for a, b in zip(one, dual):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"])
        assert a["tokens"] == b["tokens"]  # the global batch, counted once
    if method == "lora":
        a = load_file(str(tmp_path / "one" / "adapter.safetensors"))
        b = load_file(str(tmp_path / "two" / "adapter.safetensors"))
        worst = max(_rel(b[k], a[k]) for k in a)
    else:
        s1, r0, r1 = (BlockStore.open(p) for p in (single_store, tmp_path / "rank-0", tmp_path / "rank-1"))
        assert [r0.record(u).crc32 for u in r0.units] == [r1.record(u).crc32 for u in r1.units]
        # both ranks' stores name one run, the one in the run folder (#28)
        assert r0.run_record() == r1.run_record() and f'run_id = "{r0.run_record()["id"]}"' in (
            tmp_path / "two" / "config.toml").read_text()
        worst = max(_rel(r0.read_unit(u)[k], v) for u in s1.units for k, v in s1.read_unit(u).items())
    print(f"worst relative difference of the trained tensors: {worst:.2e}")
    assert worst <= 1e-6


@pytest.mark.parametrize("extra,said", [([], "rank 0 of 2: lost contact"),
                                        (["--stages", "2"], "rank 0 of 2 (stage 0 of 2, next to ranks [1]): lost contact")])
def test_a_dead_rank_stops_the_others(prepared, tmp_path, extra, said):
    """Data parallel, or pipeline stages: rank 1 is killed mid-run; rank 0 stops with an error."""
    root, store = prepared
    cmd = finetune_cmd(root, store, tmp_path / "run", "lora", 2, steps=10_000, extra=extra)
    code, _, err = signal_rank_one(cmd, tmp_path / "run" / "metrics.jsonl", signal.SIGKILL)
    assert code == 1 and said in err and "Traceback" not in err
