"""The GPU script: CUDA correctness, then 7B-shaped benchmarks, in one call of a few minutes.

    python -m blocktune_bench.cuda --out DIR            (nox -s bench_cuda)

1. correctness on the GPU: paged vs in-memory reference, dropout 0.1, 3 steps, budget of one
   unit with the pinned host tier: fp32 (losses and tensors to 1e-5, which one wrong step
   fails: a stale host tier moved the loss by 1.3e-4) and bf16 (bf16 tolerance); replay off
   must break it. The units' device memory is measured from the slot buffers alive at once
   (followed by weak references, as the unit test does), not from the slots' own counter.
2. host->device bandwidth, pinned and pageable.
3. a 7B-shaped model (dim 4096, 32 layers, random weights made on the spot, bf16): store open
   time, and a LoRA step at batch 2 x 2048 with units streamed from pinned host RAM under a
   4 GiB device budget (a smaller model: two units or a third of it, so that it pages), against
   the copy floor (bytes copied / pinned bandwidth), against the in-memory reference (plain
   autograd and per-block checkpointing) and, where transformers and peft are installed,
   against HF transformers + peft with the model whole on the GPU.
   Its device memory, with no slack: CUDA's peak allocated (PYTORCH_CUDA_ALLOC_CONF
   expandable_segments, so that reserved stays near it; reserved past it is reported) less the
   slot buffers' peak, against `allowance`: the working set the budgets reckon with and the
   adapters' state. On emu that is measured from the step's own storages (`StepBytes`).

Writes cuda.json and cuda.md into --out as it goes, each replaced whole (a killed run keeps
what it measured), within --seconds in all (default 4 minutes: a lent GPU allows one call 6).
Exits 1 when the correctness section fails (a wrong step, or unit slots past the budget), or
the 7B-shaped step held more device memory than its slots and `allowance` (no slack).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
import weakref
from pathlib import Path

import torch
from blocktune import Engine, EngineConfig, LoraConfig, ModelArgs, OptimizerConfig
from blocktune.machine.devices import EmuStream, parse_dtype, resolve_device
from blocktune.paging.budgets import working_set
from blocktune.paging.pager import resident_sizes
from blocktune.store.build import build_store
from blocktune.store.records import unit_names
from blocktune.store.safefiles import readable_size
from blocktune.store.store import BlockStore
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .reference import ReferenceTrainer
from .synthetic import SHAPES, make_store, random_batch

GiB = 1 << 30


class Recorder:
    """The results so far, in cuda.json and cuda.md, each replaced whole after every section:
    a run killed at any point leaves what it had measured, never a torn file."""

    def __init__(self, out: Path, meta: dict, start: float):
        self.out, self.data, self.start = out, {"meta": meta, "sections": {}}, start
        out.mkdir(parents=True, exist_ok=True)

    def put(self, section: str, values: dict) -> None:
        self.data["sections"][section] = values
        print(f"[{section}] {json.dumps(values)}", flush=True)
        self.save()

    def save(self) -> None:
        self.data["meta"]["seconds"] = time.perf_counter() - self.start
        for name, text in (("cuda.json", json.dumps(self.data, indent=1)), ("cuda.md", markdown(self.data))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


class AliveSlots:
    """The bytes of an engine's device slot buffers alive at once, followed by their lifetimes
    (weak references to their storages), not by the slots' own count: the count is what the
    slots enforce their cap with, so it cannot show them overshooting it."""

    def __init__(self, eng: Engine):
        slots = eng.pager.slots
        if slots is None or slots.made:
            raise RuntimeError("AliveSlots must watch an accelerator engine's slots before its first load")
        self.alive: dict[int, int] = {}
        self.peak = 0
        self.making = False  # a slot buffer is being made now (`StepBytes` leaves it out)
        make = type(slots)._make

        def tracked(nbytes: int, slots=slots):
            self.making = True
            try:
                slot = make(slots, nbytes)
            finally:
                self.making = False
            storage = slot.buf.untyped_storage()
            key = storage.data_ptr()
            self.alive[key] = nbytes
            weakref.finalize(storage, self.alive.pop, key, None)
            self.peak = max(self.peak, sum(self.alive.values()))
            return slot

        slots._make = tracked  # this engine's slots only


class StepBytes(TorchDispatchMode):
    """The device working set of steps on `emu` (whose "device" tensors are CPU tensors, so no
    allocator can count them): the bytes of the storages that the computing thread's ops make,
    alive at once (followed by weak references), less the unit slots' buffers (`AliveSlots`).
    That is the stash, a block's recompute and its backward, the loss chunk, the adapters'
    gradients and the optimizer's temporaries; `held` adds what was there before (the adapters
    and their moments), so that `peak` is what a GPU would hold beside the slots."""

    def __init__(self, watch: AliveSlots | None = None, held: tuple[torch.Tensor, ...] = ()):
        super().__init__()
        self.slots = watch.alive if watch is not None else {}
        self.making = (lambda: watch.making) if watch is not None else (lambda: False)
        self.alive: dict[int, int] = {}  # storage -> bytes
        self.now = self.peak = 0
        self.paused, self._land = False, EmuStream.run_until
        for t in held:
            self._note(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (self.paused or self.making()):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._note(t)
        return out

    def _note(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.alive or key in self.slots:
            return
        self.alive[key] = storage.nbytes()
        self.now += self.alive[key]
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._gone, key)

    def _gone(self, key: int) -> None:
        self.now -= self.alive.pop(key)

    def __enter__(self):
        # emu lands a copy by way of a buffer of its raw bytes, on the thread that waits for it
        # (here, the compute): the copy engine's, not the step's (a GPU's same-dtype copy has none)
        me = threading.get_ident()

        def landing(stream, number, land=self._land):
            mine = threading.get_ident() == me
            self.paused |= mine
            try:
                land(stream, number)
            finally:
                self.paused &= not mine

        EmuStream.run_until = landing
        return super().__enter__()

    def __exit__(self, *exc):
        EmuStream.run_until = self._land
        return super().__exit__(*exc)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()




def correctness(dev: str, rec: Recorder) -> bool:
    lora = LoraConfig(rank=4, alpha=8, dropout=0.1, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    results = {}
    for preset in ("tiny-7b", "tiny-70b"):
        args = SHAPES[preset].with_dropout(0.1)
        for dtype, method, opt, replay in [("fp32", "lora", "adamw", True), ("fp32", "full", "sgd", True),
                                           ("bf16", "lora", "adamw", True), ("fp32", "full", "sgd", False)]:
            with tempfile.TemporaryDirectory() as tmp:
                store = make_store(Path(tmp) / "s", args, seed=3,
                                   dtype=torch.float32 if dtype == "fp32" else torch.bfloat16)
                # one unit: the largest device slot (stored dtype == compute dtype)
                one = max(resident_sizes(store, parse_dtype(dtype), device=resolve_device(dev)).values())
                ocfg = OptimizerConfig(opt, lr=1e-2)
                eng = Engine(store, EngineConfig(method=method, lora=lora, optimizer=ocfg, device=dev,
                                                 compute_dtype=dtype, device_budget=max(one, 1),
                                                 host_budget=None, replay_rng=replay, loss_chunk=4096))
                watch = AliveSlots(eng)
                ref = ReferenceTrainer(store, method, lora, ocfg, dtype=eng.dtype, device=dev)
                tok, _ = random_batch(args, 2, 32, seed=0)
                logit_err = _rel(eng.logits(tok), ref.logits(tok))
                loss_err = 0.0
                for s in range(3):
                    mb = [random_batch(args, 2, 32, seed=10 + s)]
                    a, b = eng.train_step(mb).loss, ref.train_step(mb)
                    loss_err = max(loss_err, abs(a - b) / abs(b))
                if method == "lora":
                    mine, theirs = eng.adapter_state(), ref.adapter_state()
                    tensor_err = max(_rel(mine[k], theirs[k]) for k in theirs)
                else:
                    eng.close()
                    st = BlockStore.open(store.path)
                    tensor_err = max(_rel(st.read_unit(u)[k].to(ref.device.torch), v) for u in st.units
                                     for k, v in ref.unit_state(u).items())
                key = f"{preset}/{dtype}/{method}-{opt}" + ("" if replay else "/replay-off")
                slots = eng.pager.slots  # the device buffers the units were in, alive at once
                results[key] = {"logits_rel": logit_err, "loss_rel": loss_err, "tensor_rel": tensor_err,
                                "slot_bytes_peak": watch.peak, "slot_bytes_counted": slots.peak_bytes,
                                "slot_overflows": slots.overflows, "budget": one}
                eng.close()
    rec.put("correctness", {"cases": results, **verdict(results)})
    return rec.data["sections"]["correctness"]["pass"]


FP32_TOL = 1e-5  # fp32 paged vs in-memory, losses and tensors: one wrong step is 1e-4 or more
BF16_LOSS_TOL = 2e-2


def verdict(results: dict[str, dict]) -> dict:
    """Whether the correctness cases pass: fp32 losses and tensors to `FP32_TOL`, bf16 losses
    to bf16's tolerance, replay off visibly wrong, and no slot buffers alive past the budget."""
    fp32 = [v for k, v in results.items() if "/fp32/" in k and "replay-off" not in k]
    bf16 = [v for k, v in results.items() if "/bf16/" in k]
    off = [v for k, v in results.items() if "replay-off" in k]
    out = {
        "fp32_max_tensor_rel": max(v["tensor_rel"] for v in fp32),
        "fp32_max_loss_rel": max(v["loss_rel"] for v in fp32),
        "bf16_max_loss_rel": max(v["loss_rel"] for v in bf16),
        "replay_off_min_tensor_rel": min(v["tensor_rel"] for v in off),
        "budget_held": all(0 < v["slot_bytes_peak"] <= v["budget"] and v["slot_overflows"] == 0
                           for v in results.values()),
    }
    out["pass"] = (out["fp32_max_tensor_rel"] <= FP32_TOL and out["fp32_max_loss_rel"] <= FP32_TOL
                   and out["bf16_max_loss_rel"] <= BF16_LOSS_TOL and out["replay_off_min_tensor_rel"] > 1e-4
                   and out["budget_held"])
    return out


def bandwidth(rec: Recorder) -> float:
    n = 1 * GiB
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(n, dtype=torch.uint8)
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    out = {}
    for name, src in (("pinned", pinned), ("pageable", pageable)):
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[f"{name}_h2d_GBps"] = n / statistics.median(times) / 1e9
    rec.put("bandwidth", out)
    del pinned, pageable, dst
    return out["pinned_h2d_GBps"]


def make_7b_store(path: Path, args: ModelArgs, dev) -> BlockStore:
    """Random bf16 weights drawn on the device (fast), written unit by unit to a store on disk."""
    from blocktune.model.llama import Block, Embed, Head

    gen = torch.Generator(device=dev.torch).manual_seed(0)

    def units():
        for unit in unit_names(args):
            with torch.device("meta"):
                mod = Embed(args) if unit == "embed" else Head(args) if unit == "head" else Block(args)
            tensors = {}
            for k, p in mod.state_dict().items():
                t = torch.randn(p.shape, device=dev.torch, generator=gen, dtype=torch.float32)
                t = 1.0 + 0.1 * t if k.endswith("norm.weight") else t * 0.02
                tensors[k] = t.to(torch.bfloat16).cpu()
            yield unit, tensors

    return build_store(path, args, units(), torch.bfloat16)


def _timed(dev, fn, warmup: int, reps: int) -> tuple[list[float], float, float]:
    """Times of `reps` calls after `warmup`, and the peak GB allocated and reserved (the
    allocator's cache included: what the GPU really gave up) over all of them."""
    dev.reset_peak_memory()
    for _ in range(warmup):
        fn()
    dev.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        dev.synchronize()
        times.append(time.perf_counter() - t0)
    return times, dev.peak_memory_bytes() / 1e9, dev.peak_reserved_bytes() / 1e9


def _free(dev) -> None:
    gc.collect()
    dev.empty_cache()


def bench_7b(rec: Recorder, dev, pinned_bw: float, workdir: Path, deadline: float, layers: int,
             seq: int, preset: str = "shape-7b", compare: bool = True) -> None:
    """The 7B-shaped store, the paged LoRA step on it and (with `compare`) the runs it is
    compared with: the in-memory reference, plain and checkpointed, and transformers + peft."""
    args = SHAPES[preset].replace(n_layers=layers)
    lora = LoraConfig(rank=16, alpha=32, dropout=0.0, targets=("wq", "wk", "wv", "wo"))
    t0 = time.perf_counter()
    store = make_7b_store(workdir / "store7b", args, dev)
    made = time.perf_counter() - t0
    opens = []
    for _ in range(5):
        t0 = time.perf_counter()
        BlockStore.open(store.path)
        opens.append(time.perf_counter() - t0)
    model_bytes = store.total_bytes()
    rec.put("store_7b", {"n_layers": layers, "bytes": model_bytes, "make_seconds": made,
                         "open_seconds_median": statistics.median(opens)})
    tok = torch.randint(0, args.vocab_size, (2, seq + 1), generator=torch.Generator().manual_seed(0))
    batch = [(tok[:, :-1], tok[:, 1:])]
    ocfg = OptimizerConfig("adamw", lr=1e-4)
    paged = paged_7b(rec, dev, store, lora, ocfg, batch, pinned_bw)
    if not compare:
        return
    for ckpt in (False, True):
        if time.perf_counter() > deadline:
            rec.put(f"reference_{'ckpt' if ckpt else 'plain'}", {"skipped": "out of time"})
            continue
        try:
            ref = ReferenceTrainer(store, "lora", lora, ocfg, dtype=torch.bfloat16, device=str(dev),
                                   checkpoint_blocks=ckpt)
            times, peak, reserved = _timed(dev, lambda r=ref: r.train_step(batch), warmup=1, reps=3)
            med = statistics.median(times)
            rec.put(f"reference_{'ckpt' if ckpt else 'plain'}",
                    {"step_seconds": times, "step_median": med, "peak_gpu_GB": peak, "peak_reserved_GB": reserved,
                     "paged_over_this": paged / med})
            ref = None
        except torch.OutOfMemoryError as exc:
            rec.put(f"reference_{'ckpt' if ckpt else 'plain'}", {"error": f"OOM: {exc}"[:300]})
        _free(dev)
    if time.perf_counter() < deadline:
        hf_peft(rec, dev, args, lora, batch, paged)


def allowance(eng: Engine, batch: int, seq: int) -> dict[str, int]:
    """What a step may hold on the device beside the units' slots, by kind, in bytes: the
    working set the budgets reckon with (`working_set`: the stash of block inputs, one block's
    recompute and its backward, the loss chunk, and activations kept up to the keep budget) and
    the adapters with their gradients and AdamW moments (fp32: 16 bytes a parameter)."""
    work = working_set(eng.args, eng.dtype, batch, seq, 1, eng.loss_chunk, device_type=eng.device.torch.type)
    keep = eng.budgets.keep
    return {"stash": work["stash"], "block": work["block"], "loss": work["loss"],
            "kept": work["kept"] if keep is None else min(keep, work["kept"]),
            "adapters": sum(p.numel() for p in eng.adapter_params()) * 4 * 4}


def adapter_tensors(eng: Engine) -> tuple[torch.Tensor, ...]:
    """The adapters and their optimizer state: the device memory a LoRA step finds there."""
    state = eng.lora_optimizer.state.values()
    return (*eng.adapter_params(), *(v for st in state for v in st.values() if isinstance(v, torch.Tensor)))


def paged_7b(rec: Recorder, dev, store: BlockStore, lora: LoraConfig, ocfg: OptimizerConfig, batch,
             pinned_bw: float) -> float:
    """The paged LoRA step under a 4 GiB device budget (where the model is not three times that:
    two units or a third of the model, so that it pages), units from the pinned host tier: its
    time against the copy floor, and the device memory it held against what it may hold (the
    units' slots alive at once, then `allowance` beside them, with no slack); the median step."""
    one = max(resident_sizes(store, torch.bfloat16, device=dev).values())
    budget, (b, seq) = min(4 * GiB, max(2 * one, store.total_bytes() // 3)), batch[0][0].shape
    base = torch.cuda.memory_allocated(dev.torch) if dev.type == "cuda" else 0
    eng = Engine(store, EngineConfig(method="lora", lora=lora, optimizer=ocfg, device=str(dev),
                                     compute_dtype="bf16", device_budget=budget, host_budget=None))
    watch = AliveSlots(eng)
    eng.train_step(batch)  # fills the pinned host tier from disk
    before = eng.pager.stats.snapshot()
    # on emu the device's tensors are the CPU's: counted from the step's own storages
    made = StepBytes(watch, adapter_tensors(eng)) if dev.type == "emu" else contextlib.nullcontext()
    with made:
        times, peak, reserved = _timed(dev, lambda e=eng: e.train_step(batch), warmup=1, reps=3)
    after = eng.pager.stats.snapshot()
    h2d = (after["bytes_to_device"] - before["bytes_to_device"]) / 4
    floor = max(h2d / (pinned_bw * 1e9), 1e-9)
    paged = statistics.median(times)
    allowed = allowance(eng, b, seq)
    # beside the slots: CUDA's count of our tensors past the slots' peak; on emu, measured
    beside = made.peak if dev.type == "emu" else dev.peak_memory_bytes() - base - watch.peak
    res = {"batch": f"{b}x{seq}", "device_slots_GB": watch.peak / 1e9, "slots_within_budget": watch.peak <= budget,
           "slot_overflows": eng.pager.slots.overflows, "slot_waits": eng.pager.slots.waits,
           "allowance_bytes": allowed, "allowed_beside_slots_GB": sum(allowed.values()) / 1e9,
           "beside_slots_GB": beside / 1e9, "within_allowance": beside <= sum(allowed.values()),
           "step_seconds": times, "step_median": paged, "peak_gpu_GB": peak, "peak_reserved_GB": reserved,
           "allocator_overhead_GB": reserved - peak,  # reserved past allocated: the allocator's cache
           "h2d_bytes_per_step": h2d, "copy_floor_seconds": floor, "ratio_to_copy_floor": paged / floor,
           "tokens_per_s": b * seq / paged, "device_budget_bytes": budget,
           "disk_bytes_read_after_warmup": after["bytes_read"] - before["bytes_read"]}
    rec.put("paged_lora_7b", res)
    eng.close()
    _free(dev)
    return paged


def hf_peft(rec: Recorder, dev, args: ModelArgs, lora: LoraConfig, batch, paged: float) -> None:
    try:
        import peft
        import transformers
    except ImportError as exc:
        rec.put("hf_peft", {"skipped": f"not installed: {exc}"})
        return
    from blocktune_export.hf import hf_config

    for ckpt in (True, False):
        try:
            cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config(args, torch.bfloat16).items()
                                              if k not in ("architectures", "model_type", "torch_dtype")})
            torch.set_default_dtype(torch.bfloat16)
            try:
                with torch.device(dev.torch):
                    model = transformers.LlamaForCausalLM(cfg)
            finally:
                torch.set_default_dtype(torch.float32)
            if ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
            pcfg = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
            model = peft.get_peft_model(model, pcfg)
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            tok = batch[0][0].to(dev.torch)  # HF shifts the labels itself: labels are the inputs

            def step(model=model, opt=opt, tok=tok):
                out = model(input_ids=tok, labels=tok)
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            times, peak, reserved = _timed(dev, step, warmup=1, reps=3)
            med = statistics.median(times)
            rec.put(f"hf_peft_{'ckpt' if ckpt else 'plain'}",
                    {"versions": f"transformers {transformers.__version__}, peft {peft.__version__}",
                     "step_seconds": times, "step_median": med, "peak_gpu_GB": peak, "peak_reserved_GB": reserved,
                     "paged_over_this": paged / med})
            model = opt = step = None
        except Exception as exc:  # a peer's failure must not lose our own figures
            rec.put(f"hf_peft_{'ckpt' if ckpt else 'plain'}", {"error": traceback.format_exc()[-600:],
                                                               "type": type(exc).__name__})
        _free(dev)


def _parts(allowed: dict[str, int]) -> str:
    """`allowance`'s parts, summed: "2.10 GB (stash 1.1 GB + ...)"."""
    parts = " + ".join(f"{k} {readable_size(v)}" for k, v in allowed.items() if v)
    return f"{readable_size(sum(allowed.values()))} ({parts})"


def markdown(data: dict) -> str:
    m, s = data["meta"], data["sections"]
    lines = [f"# CUDA benchmark — {m['device']}", "",
             f"date {m['date']}, torch {m['torch']}, commit {m.get('commit', '?')}, command `{m['command']}`", ""]
    if "correctness" in s:
        c = s["correctness"]
        lines += ["## Correctness (paged vs in-memory on the GPU, dropout 0.1, 3 steps, one-unit budget)", "",
                  f"fp32 worst relative error {c['fp32_max_tensor_rel']:.2e} (tensors), "
                  f"{c.get('fp32_max_loss_rel', float('nan')):.2e} (losses); bf16 worst loss error "
                  f"{c['bf16_max_loss_rel']:.2e}; replay off: error {c['replay_off_min_tensor_rel']:.2e} "
                  f"(must be large); unit slot buffers alive at once within the one-unit budget, no overflow: "
                  f"{c['budget_held']}; "
                  f"**pass: {c['pass']}**", ""]
    if "bandwidth" in s:
        b = s["bandwidth"]
        lines += [f"Host→device: pinned {b['pinned_h2d_GBps']:.1f} GB/s, pageable {b['pageable_h2d_GBps']:.1f} GB/s", ""]
    if "paged_lora_7b" in s:
        p = s["paged_lora_7b"]
        st = s["store_7b"]
        lines += [f"## 7B-shaped LoRA step, batch {p['batch']}, bf16, {st['n_layers']} layers, "
                  f"{st['bytes'] / 1e9:.1f} GB store (open {st['open_seconds_median'] * 1e3:.1f} ms)", "",
                  "| run | s/step (median) | peak GPU GB allocated / reserved | paged / this |",
                  "| --- | ---: | ---: | ---: |",
                  f"| blocktune paged, {readable_size(p['device_budget_bytes'])} device budget, pinned host tier | "
                  f"{p['step_median']:.3f} | "
                  f"{p['peak_gpu_GB']:.1f} / {p.get('peak_reserved_GB', 0):.1f} | 1.00 |",
                  f"| copy floor ({p['h2d_bytes_per_step'] / 1e9:.1f} GB / pinned bandwidth) | "
                  f"{p['copy_floor_seconds']:.3f} | | {p['ratio_to_copy_floor']:.2f} |"]
        if "device_slots_GB" in p:
            tail = [f"Device slots (the units' memory) peaked at {readable_size(p['device_slots_GB'] * 1e9)} of the "
                    f"{readable_size(p['device_budget_bytes'])} budget, "
                    f"{p['slot_overflows']} overflows, {p['slot_waits']} waits; beside them the step held "
                    f"{readable_size(p['beside_slots_GB'] * 1e9)} against {_parts(p['allowance_bytes'])} allowed "
                    f"(the working set and the adapters' state, no slack): within: **{p['within_allowance']}**; "
                    f"the allocator reserved {readable_size(p['allocator_overhead_GB'] * 1e9)} past its peak "
                    f"allocated", ""]
        else:
            tail = []
        for key, label in (("reference_plain", "in-memory reference, plain autograd"),
                           ("reference_ckpt", "in-memory reference, per-block checkpointing"),
                           ("hf_peft_plain", "HF transformers + peft, whole model on GPU"),
                           ("hf_peft_ckpt", "HF transformers + peft, gradient checkpointing")):
            r = s.get(key)
            if r and "step_median" in r:
                lines.append(f"| {label} | {r['step_median']:.3f} | {r['peak_gpu_GB']:.1f} / "
                             f"{r.get('peak_reserved_GB', 0):.1f} | {r['paged_over_this']:.2f} |")
            elif r:
                lines.append(f"| {label} | {r.get('skipped') or r.get('type') or 'error'} | | |")
    if "paged_lora_7b" in s:
        lines += [""] + tail
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cuda"))
    p.add_argument("--workdir", type=Path, default=None, help="where to write the 7B-shaped store")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--seconds", type=float, default=240,
                   help="the whole run's time: sections past it are skipped (default 4 minutes)")
    p.add_argument("--sections", default="correctness,bandwidth,7b,compare",
                   help="which sections to run, comma-separated (correctness, bandwidth, 7b: the paged step, "
                        "compare: the runs the 7b step is compared with)")
    p.add_argument("--commit", default="?")
    p.add_argument("--device", default="cuda", help="emu only for a dry run of the script itself")
    p.add_argument("--preset", default="shape-7b", help="the benchmark's model shape (tiny-7b for a dry run)")
    a = p.parse_args(argv)
    start = time.perf_counter()
    deadline = start + a.seconds
    sections = set(a.sections.split(","))
    if a.device.startswith("cuda"):  # before the allocator starts: it grows segments in place, so
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # reserved ≈ allocated
    dev = resolve_device(a.device)
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor() or dev.type
    meta = {"device": name, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": platform.node(), "commit": a.commit,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
            "command": "python -m blocktune_bench.cuda " + " ".join(sys.argv[1:] if argv is None else argv)}
    rec = Recorder(a.out, meta, start)
    ok = True
    try:
        if "correctness" in sections:
            ok = correctness(str(dev), rec)
        bw = bandwidth(rec) if dev.type == "cuda" and "bandwidth" in sections else float("inf")
        if "7b" in sections and time.perf_counter() < deadline:
            with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
                bench_7b(rec, dev, bw, Path(tmp), deadline, a.layers, a.seq, a.preset, "compare" in sections)
            p7 = rec.data["sections"]["paged_lora_7b"]
            ok = ok and p7["within_allowance"] and p7["slots_within_budget"]
        elif "7b" in sections:
            rec.put("store_7b", {"skipped": "out of time"})
    finally:
        rec.save()
        print(markdown(rec.data))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
