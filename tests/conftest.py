import os
import subprocess
import sys

import pytest
import torch
from blocktune_bench.synthetic import PRESETS, make_store

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_args():
    return PRESETS["tiny-7b"]


@pytest.fixture
def tiny_store(tmp_path, tiny_args):
    """A fresh fp32 store of the tiny-7b preset (4 layers, dim 64)."""
    return make_store(tmp_path / "store", tiny_args, seed=1)


def random_batch(args, batch=2, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, args.vocab_size, (batch, seq + 1), generator=g)
    return tok[:, :-1], tok[:, 1:]


def bt(*args, check: bool = False) -> subprocess.CompletedProcess:
    """`blocktune ARGS...` as a user runs it (a fresh interpreter); with `check`, a failure
    fails the test with the command's stderr."""
    r = subprocess.run([sys.executable, "-m", "blocktune", *map(str, args)], capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r
