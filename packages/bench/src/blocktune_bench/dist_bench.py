"""Data-parallel throughput: run under torchrun (or alone for one process).

    torchrun --standalone --nproc-per-node N -m blocktune_bench.dist_bench STORE GLOBAL_BATCH SEQ STEPS

Each of N ranks takes GLOBAL_BATCH / N sequences per step; rank 0 prints one JSON line with
the step times, tokens/s of the whole group, bytes all-reduced per step and bytes paged.
"""

import json
import statistics
import sys
import time

import torch
from blocktune import BlockStore, Engine, EngineConfig, LoraConfig, OptimizerConfig
from blocktune.dist.groups import init_from_env
from blocktune.machine.devices import resolve_device


def main() -> int:
    store_path, global_batch, seq, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    dev = resolve_device("cpu")
    dist = init_from_env(dev, 120)
    torch.set_num_threads(max(1, 2 // dist.world))  # this machine's 2 cores, shared by the ranks
    store = BlockStore.open(store_path)
    unit = max(store.unit_bytes(u) for u in store.units)
    engine = Engine(store, EngineConfig(method="lora", lora=LoraConfig(16, 32, targets=("wq", "wk", "wv", "wo")),
                                        device="cpu", device_budget=2 * unit,
                                        optimizer=OptimizerConfig("adamw", 1e-5)), dist=dist)
    local = global_batch // dist.world
    times, reduced = [], []
    for s in range(steps + 1):
        g = torch.Generator().manual_seed(s)
        tok = torch.randint(0, store.args.vocab_size, (global_batch, seq + 1), generator=g)
        mine = tok[dist.rank * local:(dist.rank + 1) * local]
        dist.bytes_reduced = 0
        t0 = time.perf_counter()
        r = engine.train_step([(mine[:, :-1], mine[:, 1:])])
        times.append(time.perf_counter() - t0)
        reduced.append(dist.bytes_reduced)
    if dist.is_main:
        med = statistics.median(times[1:])
        print(json.dumps({"ranks": dist.world, "global_batch": f"{global_batch}x{seq}", "step_seconds": times[1:],
                          "step_median": med, "tokens_per_s": global_batch * seq / med,
                          "bytes_all_reduced_per_step": reduced[-1], "bytes_read_per_step_per_rank": r.bytes_read,
                          "loss": r.loss}))
    engine.close()
    dist.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
