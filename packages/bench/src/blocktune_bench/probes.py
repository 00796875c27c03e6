"""Measured programs the benchmark groups run in a fresh interpreter each (so a process's own
memory and start are what is measured): `python -m blocktune_bench.probes WHAT ARGS...`."""

from __future__ import annotations

import json
import sys
import time


def prepare(src: str, dst: str) -> None:
    """`import_meta` of a Meta folder: seconds, peak RSS and peak anonymous memory."""
    from blocktune.machine.hostmem import peak_rss_bytes
    from blocktune_export.meta import import_meta

    from .measure import track_anon_peak

    peak = track_anon_peak()
    t = time.perf_counter()
    import_meta(src, dst)
    print(time.perf_counter() - t, peak_rss_bytes(), peak())


def generate(store_path: str, mode: str, n: int = 48) -> None:
    """Greedy tokens per second after a 16-token prompt, paged engine or the in-memory model."""
    import torch
    from blocktune import BlockStore, Engine, EngineConfig
    from blocktune.model.llama import KVCache
    from blocktune.run.generate import SamplingConfig, generate_tokens

    from .reference import model_from_store

    torch.set_num_threads(2)
    store = BlockStore.open(store_path)
    prompt = list(range(1, 17))
    if mode == "paged":
        eng = Engine(store, EngineConfig(method="full", device="cpu", read_only=True))
        list(generate_tokens(eng, prompt, SamplingConfig(4, stop_at_eos=False)))  # warm: units resident
        t = time.perf_counter()
        out = list(generate_tokens(eng, prompt, SamplingConfig(n, stop_at_eos=False)))
    else:
        model, a = model_from_store(store).eval(), store.args

        def run(k: int) -> list[int]:
            caches = [KVCache(1, len(prompt) + k, a.kv_heads, a.head_dim, torch.float32, "cpu")
                      for _ in range(a.n_layers)]
            toks, start, got = list(prompt), 0, []
            with torch.no_grad():
                for _ in range(k):
                    logits = model(torch.tensor([toks[start:]]), caches, start)[0, -1]
                    start = len(toks)
                    toks.append(int(logits.argmax()))
                    got.append(toks[-1])
            return got

        run(4)
        t = time.perf_counter()
        out = run(n)
    dt = time.perf_counter() - t
    print(json.dumps({"mode": mode, "tokens": len(out), "seconds": dt, "tokens_per_s": len(out) / dt,
                      "out": out[:8]}))


def export(*argv: str) -> int:
    """`blocktune export ARGV...` in this process, so its memory is measured: seconds and the
    anonymous memory it added at its peak, on stderr."""
    from blocktune.cli import main

    from .measure import rss_anon, track_anon_peak

    start, peak = rss_anon(), track_anon_peak()
    t = time.perf_counter()
    code = main(["export", *argv])
    print(time.perf_counter() - t, peak() - start, file=sys.stderr)
    return code


if __name__ == "__main__":
    what, rest = sys.argv[1], sys.argv[2:]
    sys.exit({"prepare": prepare, "generate": generate, "export": export}[what](*rest) or 0)
