"""`--compute-dtype auto` (the run's default): bf16 on a CPU that computes it natively, fp32
elsewhere, said in the log; a bf16 step on the CPU against the in-memory reference in bf16, with
the adapters, masters and moments kept in fp32."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from blocktune import Engine, EngineConfig
from blocktune.errors import ConfigError
from blocktune.machine.cpubf16 import ENV
from blocktune.paging.pager import resident_sizes
from blocktune.run.config import RunConfig
from blocktune_bench.corpus import demo_text
from blocktune_bench.synthetic import make_store, write_meta_checkpoint
from blocktune_export.meta import import_meta
from test_emulated import assert_bf16_full_matches
from test_equivalence import assert_matches, run_pair


def test_auto_is_the_runs_default_and_the_librarys_is_unchanged():
    assert RunConfig().compute_dtype == "auto" and EngineConfig().compute_dtype is None
    with pytest.raises(ConfigError, match="compute_dtype=.bf32.: choose auto, fp32, bf16 or fp16"):
        RunConfig(compute_dtype="bf32")


@pytest.mark.parametrize("said,dtype", [("0", torch.float32), ("1", torch.bfloat16)])
def test_auto_follows_the_probe(tiny_store, monkeypatch, said, dtype):
    monkeypatch.setenv(ENV, said)
    engine = Engine(tiny_store, EngineConfig(device="cpu", compute_dtype="auto"))
    assert engine.dtype == dtype
    assert engine.dtype_note == f"compute {'bf16' if said == '1' else 'fp32'} (auto: {ENV}={said})"
    assert Engine(tiny_store, EngineConfig(device="cpu")).dtype == torch.float32  # the library's default
    monkeypatch.setenv(ENV, "yes")
    with pytest.raises(ConfigError, match=f"{ENV}='yes': set it to 1"):
        Engine(tiny_store, EngineConfig(device="cpu", compute_dtype="auto"))


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64", reason="reads x86 flags")
def test_the_probe_times_bf16_once_per_machine(tmp_path):
    """Without the flags fp32, nothing timed; with them a matmul timed once and kept in the cache
    folder, read back by the next process; bf16 only where it is clearly faster."""
    env = {k: v for k, v in os.environ.items() if k != ENV} | {"BLOCKTUNE_CACHE": str(tmp_path)}

    def probe() -> tuple[bool, str]:
        r = subprocess.run([sys.executable, "-c", "from blocktune.machine.cpubf16 import cpu_bf16; "
                            "print(repr(cpu_bf16()))"], capture_output=True, text=True, env=env, check=True)
        print(r.stdout.strip())
        return eval(r.stdout)

    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    native, why = probe()
    kept = tmp_path / "cpu-bf16.json"
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        assert not native and "no avx512_bf16 or amx_bf16" in why and not kept.exists()
        return
    assert "matmul timed now" in why and kept.is_file()
    assert probe() == (native, why.replace("a 128x4096x4096 matmul timed now", "a matmul timed on this machine before"))
    table = json.loads(kept.read_text())
    (key,) = table
    for speedup, want in ((2.0, (True, "computes bf16 2.0x as fast as fp32")),
                          (1.1, (False, "computes bf16 at 1.10x fp32's speed"))):
        table[key]["speedup"] = speedup
        kept.write_text(json.dumps(table))
        native, why = probe()
        assert native == want[0] and want[1] in why


def test_the_cli_says_what_it_chose(tmp_path):
    """The resolved config names the dtype and why; the override reaches a fresh process."""
    store = import_meta(write_meta_checkpoint(tmp_path / "meta", "tiny-7b", seed=0), tmp_path / "store",
                        dtype=torch.float32)
    (tmp_path / "t.txt").write_text(demo_text())
    for said, name in (("1", "bf16"), ("0", "fp32")):
        r = subprocess.run([sys.executable, "-m", "blocktune", "finetune", "--store", str(store.path), "--data",
                            str(tmp_path / "t.txt"), "--out", str(tmp_path / f"run{said}"), "--steps", "1",
                            "--seq-len", "16", "--grad-accum", "1", "--no-progress"],
                           capture_output=True, text=True, env={**os.environ, ENV: said})
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"compute {name} (auto: {ENV}={said})" in r.stderr
        assert 'compute_dtype = "auto"' in (tmp_path / f"run{said}" / "config.toml").read_text()
    r = subprocess.run([sys.executable, "-m", "blocktune", "finetune", "--store", str(store.path), "--data",
                        str(tmp_path / "t.txt"), "--out", str(tmp_path / "bad"), "--compute-dtype", "bf32"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "bf32" in r.stderr


@pytest.mark.parametrize("method,opt", [("full", "sgd"), ("full", "adamw"), ("lora", "adamw")])
def test_cpu_bf16_equals_the_bf16_reference(tmp_path, tiny_args, method, opt):
    """Three paged steps in bf16 on the CPU, one unit resident, against the in-memory reference
    in bf16: LoRA to the bit (fp32 adapters and moments beside bf16 weights, as the reference);
    a full fine-tune steps fp32 masters with fp32 moments (the reference steps bf16 weights: they
    part by bf16's rounding of each update) to the emulated accelerator's bf16 tolerance."""
    store = make_store(tmp_path / "s", tiny_args.with_dropout(0.1), seed=3)
    budget = max(resident_sizes(store, torch.bfloat16).values())
    engine, ref, losses = run_pair(store, method, opt, steps=3, budget=budget, device="cpu", dtype="bf16")
    assert engine.dtype == torch.bfloat16 and engine.pager.stats.peak_resident <= budget
    if method == "lora":
        assert all(p.dtype == torch.float32 for p in engine.adapter_params())
        assert all(t.dtype == torch.float32 for s in engine.lora_optimizer.state.values() for t in s.values())
        assert_matches(store.path, engine, ref, method, losses)
        return
    st = assert_bf16_full_matches(store.path, engine, ref, opt, losses)
    # the fp32 store's unit file is the masters (the state holds the moments alone)
    state = st.read_state("block_00")
    assert not any(k.startswith("master.") for k in state) and all(t.dtype == torch.float32 for t in state.values())
    assert all(t.dtype == torch.float32 for t in st.read_unit("block_00").values())
