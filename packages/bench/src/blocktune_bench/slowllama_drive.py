"""Run slowllama (github.com/okuvshynov/slowllama, a checkout the user gives) as its own scripts do,
on the CPU, timing each iteration; used by the `peer` bench group, one process per phase.

    python -m blocktune_bench.slowllama_drive CHECKOUT prepare META WORK fp32
    python -m blocktune_bench.slowllama_drive CHECKOUT train META WORK fp32 DATA ITERS

`prepare` is its prepare_model.py (a Meta folder -> its frozen blocks, one file per module);
`train` is its finetune.py with the settings of its conf.py: LoRA rank 4 (alpha 64, dropout 0.05)
on wq and wv, seq_len 128, batch_size 16, AdamW at lr 1e-4, random windows of the text, on
device 'cpu' (its default is 'mps'). `fp32` and `fp16` are its conf_fp32.py (compute fp32, frozen
weights bf16, eps 1e-8) and conf_fp16.py (both fp16, eps 1e-4). The two phases are two processes,
as its two scripts are: its modules number their files from one process-wide counter.
The last line printed is JSON: the seconds of prepare, or of each iteration, and the losses.
Nothing of slowllama is copied here; it is imported from the checkout.
"""

from __future__ import annotations

import json
import os
import sys
import time

CONFS = {"fp32": ("float32", "bfloat16", 1e-8), "fp16": ("float16", "float16", 1e-4)}


def main(argv: list[str]) -> int:
    checkout, phase, meta, work, conf = argv[:5]
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # it torch.loads whole modules
    sys.path.insert(0, checkout)
    import torch
    from llama2_loader import load_frozen, prepare_model  # slowllama's
    from utils import Tokenizer  # slowllama's

    compute, frozen, eps = CONFS[conf]
    with open(os.path.join(meta, "params.json")) as f:
        vocab = json.load(f)["vocab_size"]
    kw = dict(compute_dtype=getattr(torch, compute), frozen_dtype=getattr(torch, frozen), lora_rank=4,
              vocab_size_override=vocab)
    os.makedirs(work, exist_ok=True)
    os.chdir(work)  # it caches each block's input under ./inputs
    torch.random.manual_seed(54321)  # its conf's seed
    frozen_path = os.path.join(work, "frozen")
    t = time.perf_counter()
    if phase == "prepare":
        prepare_model(llama2_path=meta, frozen_path=frozen_path, **kw)
        print(json.dumps({"prepare_s": time.perf_counter() - t}))
        return 0
    data, iters = argv[5], int(argv[6])
    tok = Tokenizer(os.path.join(frozen_path, "tokenizer.model"))
    with open(data) as f:
        tokens = tok.encode(f.read(), True, True)
    model = load_frozen(frozen_path, **kw).to("cpu").to(kw["compute_dtype"])
    seq, batch = 128, 16

    def get_batch():  # its finetune.py's
        index = torch.randint(len(tokens) - seq, (batch,))
        x = torch.stack([torch.tensor(tokens[i:i + seq]).to(torch.int64) for i in index])
        y = torch.stack([torch.tensor(tokens[i + 1:i + seq + 1]).to(torch.int64) for i in index])
        return x, y

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=eps)
    steps, losses = [], []
    for i in range(iters):
        x, y = get_batch()
        t = time.perf_counter()
        opt.zero_grad()
        losses.append(model.manual_loop(x, y))
        opt.step()
        steps.append(time.perf_counter() - t)
        print(f"slowllama {conf} iteration {i}: {steps[-1]:.2f} s, loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    print(json.dumps({"step_s": steps, "loss": losses}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
