"""Benchmark group of pipeline stages: what each rank reads and waits for, S = 1, 2, 4, from the
CLI; and a worked model of a 70B step on 4 and 8 machines from per-block times measured here.

    python -m blocktune_bench.run --only stages
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from blocktune.engine.recompute import skip_unread_product
from blocktune.model.args import LoraConfig, ModelArgs
from blocktune.model.llama import Block
from blocktune.model.lora import add_lora, init_lora_

from .common import cached_store, disk_bandwidth, machine, save
from .corpus import demo_text, tokenizer_path

LLAMA2_70B = ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, multiple_of=4096,
                       ffn_dim_multiplier=1.3)
LINKS = {"10 GbE": 1.25e9, "100 GbE": 12.5e9}  # bytes/s
GPU_FLOPS = 200e12  # an assumed sustained bf16 rate for the model's second table (not a measurement)


def staged_run(store: Path, data: Path, out: Path, stages: int, budget: str, steps: int = 3) -> dict:
    """`blocktune finetune --nproc S --stages S` (LoRA, batch 4 x 256 as 4 micro-batches of 1):
    the last step's time and each rank's bytes read and time blocked on its neighbours."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "blocktune", "finetune", "--store", str(store), "--data", str(data),
           "--out", str(out), "--method", "lora", "--steps", str(steps), "--batch-size", "1", "--grad-accum", "4",
           "--seq-len", "256", "--device-budget", budget, "--no-progress",
           "--set", "eval_every=0", "--set", "sample_every=0", "--set", "plot=false", "--set", "val_ratio=0.0"]
    if stages > 1:
        cmd += ["--nproc", str(stages), "--stages", str(stages)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"stages": stages, "budget": budget, "error": r.stderr[-1500:]}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    return {"stages": stages, "budget": budget, "step_seconds": [row["seconds"] for row in rows],
            "bytes_read_by_rank": last.get("bytes_read_by_rank", [int(last["gb_read"] * 1e9)]),
            "pipeline_wait_s_by_rank": last.get("pipeline_wait_s_by_rank", [0.0])}


def block_seconds(args: ModelArgs, tokens: int, reps: int = 2) -> dict:
    """One block's share of a LoRA step at `args`' shape, fp32 (the CPU's compute dtype), for
    `tokens` tokens: the forward without a graph, then the recompute and the backward (input
    gradient, and the adapters'), as the engine runs them. The median of `reps` after a warm-up."""
    torch.manual_seed(0)
    block = add_lora(Block(args), LoraConfig(rank=16, targets=("wq", "wk", "wv", "wo")))
    init_lora_(block)
    for name, p in block.named_parameters():
        p.requires_grad_(".lora_" in name)
    x = torch.randn(1, tokens, args.dim)
    g = torch.randn(1, tokens, args.dim)
    fwd, bwd = [], []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        with torch.no_grad():
            block(x)
        t1 = time.perf_counter()
        xi = x.clone().requires_grad_(True)
        with skip_unread_product(block):
            out = block(xi)
        out.backward(g)
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        block.zero_grad(set_to_none=True)
    return {"tokens": tokens, "forward_s": statistics.median(fwd[1:]), "backward_s": statistics.median(bwd[1:])}


def step_model(L: int, fwd: float, bwd: float, io: float, block_bytes: int, S: int, D: int, M: int,
               act_bytes: float, link: float, resident: bool) -> dict:
    """Seconds per step of a LoRA fine-tune over S stages x D replicas (an explicit model).

    fwd, bwd: one block's forward / recompute+backward for the whole global batch on one
    machine; io: one block's read from disk; M micro-batches per replica; act_bytes: one
    micro-batch's activation at a boundary. Each replica computes 1/D of the tokens.

    resident (every stage's share in its RAM): each micro-batch goes through a stage's L/S
    blocks in turn and on (GPipe): (M + S - 1) slots of one micro-batch through L/S blocks,
    forward and backward, plus the fill's transfers; no disk.
    On disk (block-major, as blocktune runs a stage whose share does not fit): the stages work
    one after another, each block read twice (forward, backward) with the read overlapped
    with the compute: L x (max(fwd, io) + max(bwd, io)) whatever S, plus the last micro-batch's
    transfers at each boundary. So stages cut each rank's reads by S, not the step."""
    f, b = fwd / D, bwd / D
    hop = act_bytes / link
    if resident:
        slots = (M + S - 1) / M
        compute = slots * (L / S) * (f + b)
        network = 2 * (S - 1) * hop
        return {"seconds": compute + network, "compute_s": compute, "network_s": network, "read_GB": 0.0,
                "bubble": 1 - 1 / slots}
    compute = L * (max(f, io) + max(b, io))
    network = 2 * (S - 1) * hop
    return {"seconds": compute + network, "compute_s": compute, "network_s": network,
            "read_GB": 2 * block_bytes * (L / S) / 1e9, "bubble": 1 - 1 / S}


def group_stages(work: Path, reps: int) -> None:
    store = cached_store(work / "bench-1k-tok", "bench-1k", seed=0, tokenizer=tokenizer_path())
    data = work / "stages-text.txt"
    data.write_text(demo_text() * 4)
    runs = []
    for _ in range(reps):
        for budget in ("120MiB", "inf"):
            for S in (1, 2, 4):
                runs.append(staged_run(store, data, work / f"stages-{S}-{budget}", S, budget))
                print(json.dumps(runs[-1]), flush=True)
    disk = disk_bandwidth(work, 1 << 30)

    # the worked model: Llama-2-70B, bf16 store, LoRA, 4096 tokens a step
    T, M = 4096, 4
    small = block_seconds(LLAMA2_70B, 128)
    fwd, bwd = small["forward_s"] * T / small["tokens"], small["backward_s"] * T / small["tokens"]
    block_bytes = 2 * _block_params(LLAMA2_70B)
    io = block_bytes / (disk["read_GBps"] * 1e9)
    L = LLAMA2_70B.n_layers
    # the same model with a GPU's arithmetic (an assumed rate, not measured here: no GPU was lent)
    # and bf16 activations, the forward's FLOPs 2 x params x tokens, the backward's in this CPU's ratio
    gpu_fwd = 2 * _block_params(LLAMA2_70B) * T / GPU_FLOPS
    computes = {"this CPU (measured)": (fwd, bwd, 4), f"a GPU at {GPU_FLOPS / 1e12:.0f} TFLOP/s (assumed)":
                (gpu_fwd, gpu_fwd * bwd / fwd, 2)}
    model = []
    for compute, (f, b, act_size) in computes.items():
        for machines, S, D in ((1, 1, 1), (4, 1, 4), (4, 4, 1), (8, 8, 1), (8, 4, 2)):
            for link_name, link in LINKS.items():
                for resident in (False, True):
                    if resident and S == 1:
                        continue  # 140 GB in one machine's RAM: not the case this is for
                    act = (T / (M * D)) * LLAMA2_70B.dim * act_size  # one micro-batch's activation
                    m = step_model(L, f, b, io, block_bytes, S, D, M, act, link, resident)
                    model.append({"compute": compute, "machines": machines, "stages": S, "replicas": D,
                                  "link": link_name, "share": "RAM" if resident else "disk", **m})

    table = ["Measured with the CLI: `blocktune finetune --method lora --batch-size 1 --grad-accum 4 --seq-len 256 "
             "--device-budget B [--nproc S --stages S]` on bench-1k (16 layers, dim 1024, fp32, 1.06 GB), "
             f"3 steps, the last one's figures, medians of {reps} alternated runs. The S processes share this "
             "machine's 2 cores, so step times are not a speed-up: read the bytes and the waits. At 120 MiB (about two units) "
             "the stages are block-major and read their units every step; at inf they stay resident.", "",
             "| budget | S | s/step | bytes read per step, by rank | IO share at the cold disk rate "
             f"({disk['read_GBps']:.2f} GB/s), by rank | waiting on neighbours (s), by rank |",
             "| --- | ---: | ---: | --- | --- | --- |"]
    for budget in ("120MiB", "inf"):
        for S in (1, 2, 4):
            mine = [r for r in runs if r["stages"] == S and r["budget"] == budget and "error" not in r]
            if not mine:
                table.append(f"| {budget} | {S} | failed | | | |")
                continue
            step = statistics.median(r["step_seconds"][-1] for r in mine)
            read = mine[0]["bytes_read_by_rank"]
            waits = [statistics.median(r["pipeline_wait_s_by_rank"][k] for r in mine) for k in range(len(read))]
            share = [b / (disk["read_GBps"] * 1e9) for b in read]
            table.append(f"| {budget} | {S} | {step:.2f} | {', '.join(f'{b / 1e6:.0f} MB' for b in read)} | "
                         f"{', '.join(f'{s:.2f} s' for s in share)} | {', '.join(f'{w:.2f}' for w in waits)} |")
    table += ["", f"Worked model (`blocktune_bench.run_stages.step_model`): Llama-2-70B (80 blocks of "
              f"{block_bytes / 1e9:.2f} GB bf16), LoRA rank 16 on wq/wk/wv/wo, {T} tokens a step as {M} "
              f"micro-batches per replica, fp32 compute at this machine's measured block times (one block, "
              f"{small['tokens']} tokens: forward {small['forward_s']:.2f} s, recompute + backward "
              f"{small['backward_s']:.2f} s; scaled to {T} tokens: {fwd:.0f} s + {bwd:.0f} s; attention's "
              f"T² term left out, under 8% at {T} tokens), disk at {disk['read_GBps']:.2f} GB/s "
              f"(one block read: {io:.2f} s), activations at each stage boundary in the compute dtype. On this "
              "CPU compute dominates, so what counts is the pipeline's overlap (RAM-resident shares) and the "
              f"replicas. The second half puts an assumed GPU rate ({GPU_FLOPS / 1e12:.0f} TFLOP/s sustained, bf16; "
              "not measured) in place of the CPU's: there the disk dominates, and stages whose share is in RAM "
              "take it out of the step.", "",
              "| compute | machines | stages x replicas | link | share in | s/step | compute | network | "
              "disk read per rank (GB) | bubble |",
              "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for m in model:
        table.append(f"| {m['compute']} | {m['machines']} | {m['stages']} x {m['replicas']} | {m['link']} | {m['share']} | "
                     f"{m['seconds']:.1f} | {m['compute_s']:.1f} | {m['network_s']:.3f} | {m['read_GB']:.0f} | "
                     f"{m['bubble']:.0%} |")
    save("stages", {"machine": machine(), "runs": runs, "disk": disk, "block": small, "model": model}, table)


def _block_params(args: ModelArgs) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Block(args).parameters())
