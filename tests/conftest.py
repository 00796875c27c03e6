import os
import subprocess
import sys

import pytest
import torch
from blocktune_bench.synthetic import SHAPES as PRESETS
from blocktune_bench.synthetic import make_store, random_batch

# `--compute-dtype auto` times a matmul once per machine to choose bf16 or fp32 on a CPU with bf16
# instructions; the suite's numbers must not depend on that (a CI machine may be faster in bf16, and
# a noisy one may time either way): the suite runs fp32 unless a test asks otherwise
# (test_cpubf16 sets, or removes, BLOCKTUNE_CPU_BF16 itself and tests the probe in fresh processes)
os.environ.setdefault("BLOCKTUNE_CPU_BF16", "0")

__all__ = ["PRESETS", "random_batch"]  # tests import them from here

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_args():
    return PRESETS["tiny-7b"]


@pytest.fixture
def tiny_store(tmp_path, tiny_args):
    """A fresh fp32 store of the tiny-7b preset (4 layers, dim 64)."""
    return make_store(tmp_path / "store", tiny_args, seed=1)




def prepared_root(root):
    """`root` holding a tiny Meta checkpoint with its tokenizer prepared into an fp32 store (`store`),
    a text (`text.txt`) and a quiet run config (`run.toml`), for tests that run `blocktune finetune`."""
    from blocktune_bench.corpus import demo_text
    from blocktune_bench.synthetic import write_meta_checkpoint
    from blocktune_export.meta import import_meta

    store = import_meta(write_meta_checkpoint(root / "meta", "tiny-7b", seed=0), root / "store", dtype=torch.float32)
    store.close()
    (root / "text.txt").write_text(demo_text())
    (root / "run.toml").write_text("eval_every = 0\nsample_every = 0\nplot = false\ntensorboard = false\n"
                                   "val_ratio = 0.0\nwarmup_steps = 0\nprogress = false\n")
    return root


def bt(*args, check: bool = False) -> subprocess.CompletedProcess:
    """`blocktune ARGS...` as a user runs it (a fresh interpreter); with `check`, a failure
    fails the test with the command's stderr."""
    r = subprocess.run([sys.executable, "-m", "blocktune", *map(str, args)], capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def finetune_cmd(root, store, out, method, batch, steps=3, extra=(), accum=2) -> list[str]:
    """The multi-process tests' `blocktune finetune`: root holds text.txt and run.toml. fp32 (not
    `auto`, bf16 on a CPU with avx512_bf16): they compare runs split over processes with one
    process's to 1e-6, and a bf16 matmul's rounding depends on the batch it is given."""
    return [sys.executable, "-m", "blocktune", "finetune", "--store", str(store), "--data", str(root / "text.txt"),
            "--out", str(out), "--method", method, "--steps", str(steps), "--seq-len", "16",
            "--batch-size", str(batch), "--grad-accum", str(accum), "--lr", "0.1", "--device", "cpu",
            "--compute-dtype", "fp32", "--no-progress", "--config", str(root / "run.toml"), *extra]


def multi_process_root(root, config: str):
    """A tiny-7b store in fp32 imported from Meta's layout, text.txt and run.toml (`config`) in root."""
    from blocktune_bench.corpus import demo_text
    from blocktune_bench.synthetic import write_meta_checkpoint
    from blocktune_export.meta import import_meta

    store = import_meta(write_meta_checkpoint(root / "meta", "tiny-7b", seed=0), root / "store", dtype=torch.float32)
    (root / "text.txt").write_text(demo_text() * 2)
    (root / "run.toml").write_text(config)
    return store.path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def signal_rank_one(cmd: list[str], metrics, sig) -> tuple[int, float, str]:
    """Ranks 0 and 1 of `cmd` on loopback; once `metrics` has two rows, `sig` to rank 1. Returns
    rank 0's exit code, the seconds it took to exit after the signal, and its stderr."""
    import time

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    assert metrics.exists(), procs[0].stderr.read()[-2000:]
    procs[1].send_signal(sig)
    t0 = time.time()
    try:
        code = procs[0].wait(timeout=90)
    finally:
        for p in procs:
            p.kill()
    waited = time.time() - t0
    err = procs[0].stderr.read()
    print(f"rank 0 exited {code} after {waited:.1f}s: {err.strip().splitlines()[-1]}")
    return code, waited, err
