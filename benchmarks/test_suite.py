"""pytest-benchmark suites: the paged engine beside the in-memory reference, per device.

    nox -s bench        (pytest benchmarks -m bench --benchmark-autosave ...)

Each benchmark synchronises the device, leaves warm-up out (pytest-benchmark's warmup rounds)
and records rates in extra_info. cuda and mps run where present and are skipped, with the
reason, elsewhere. `--benchmark-compare` against the last autosaved run flags regressions.
"""

import time

import pytest
from blocktune import Engine, EngineConfig, LoraConfig, OptimizerConfig
from blocktune.machine.devices import resolve_device
from blocktune.run.generate import SamplingConfig, generate_tokens
from blocktune.store.store import BlockStore
from blocktune_bench.reference import ReferenceTrainer
from blocktune_bench.synthetic import SHAPES, make_store, random_batch

pytestmark = pytest.mark.bench

LORA = LoraConfig(rank=16, alpha=32, targets=("wq", "wk", "wv", "wo"))
ARGS = SHAPES["bench-1k"].replace(n_layers=4)  # dim 1024: real matmuls, a quick suite


def _device(name):
    try:
        return resolve_device(name)
    except Exception as exc:
        pytest.skip(f"{name}: {exc}")


DEVICES = ["cpu", "cuda", "mps"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("bench") / "s", ARGS, seed=0)




def test_store_open(benchmark, store):
    benchmark(BlockStore.open, store.path)
    benchmark.extra_info["store_bytes"] = store.total_bytes()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["paged", "reference"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_step(benchmark, store, tmp_path, device, impl, method):
    dev = _device(device)
    batch = random_batch(ARGS, 2, 128)
    ocfg = OptimizerConfig("adamw", 1e-5)
    if impl == "paged":
        if method == "full":  # a full fine-tune rewrites its store: use a copy
            import shutil

            shutil.copytree(store.path, tmp_path / "s")
            st = BlockStore.open(tmp_path / "s")
        else:
            st = store
        unit = max(st.unit_bytes(u) for u in st.units)
        runner = Engine(st, EngineConfig(method=method, lora=LORA, optimizer=ocfg, device=str(dev),
                                         compute_dtype="fp32", device_budget=2 * unit))
    else:
        runner = ReferenceTrainer(store, method, LORA, ocfg, device=str(dev))

    def step():
        runner.train_step(batch)
        dev.synchronize()

    dev.reset_peak_memory()
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    tokens = batch[0][0].numel()
    benchmark.extra_info.update({
        "tokens_per_s": tokens / benchmark.stats.stats.median, "peak_memory_bytes": dev.peak_memory_bytes(),
        **({"bytes_read_per_step": runner.pager.stats.bytes_read / 4,
            "bytes_written_per_step": runner.pager.stats.bytes_written / 4} if impl == "paged" else {})})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["paged", "reference"])
def test_forward(benchmark, store, device, impl):
    dev = _device(device)
    tok = random_batch(ARGS, 2, 128)[0][0]
    if impl == "paged":
        engine = Engine(store, EngineConfig(method="full", device=str(dev), compute_dtype="fp32", read_only=True))
        fn = engine.logits
    else:
        fn = ReferenceTrainer(store, "full", device=str(dev)).logits

    def fwd():
        fn(tok)
        dev.synchronize()

    benchmark.pedantic(fwd, rounds=5, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = tok.numel() / benchmark.stats.stats.median


@pytest.mark.parametrize("device", DEVICES)
def test_generation(benchmark, store, device):
    dev = _device(device)
    engine = Engine(store, EngineConfig(method="full", device=str(dev), compute_dtype="fp32", read_only=True))
    cfg = SamplingConfig(32, stop_at_eos=False)

    def gen():
        t0 = time.perf_counter()
        n = len(list(generate_tokens(engine, list(range(1, 9)), cfg)))
        dev.synchronize()
        return n / (time.perf_counter() - t0)

    rate = benchmark.pedantic(gen, rounds=3, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = rate
