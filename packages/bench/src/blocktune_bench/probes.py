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


def finetune(*argv: str) -> int:
    """`blocktune finetune ARGV...` in this process: its peak anonymous memory on stderr's last line."""
    from blocktune.cli import main

    from .measure import rss_anon, track_anon_peak

    start, peak = rss_anon(), track_anon_peak()
    code = main(["finetune", *argv])
    print(json.dumps({"anon_peak": peak(), "anon_start": start}), file=sys.stderr)
    return code


def hf_step(gguf_file: str, text_file: str, method: str, batch: str, seq: str, steps: str,
            dtype: str = "fp32", lr: str = "") -> None:
    """transformers (+ peft for LoRA) in memory on the same GGUF file and text: seconds per step
    (AdamW, blocktune's LoRA defaults) and the peak anonymous memory, as JSON. In bf16 as each is
    usually run and as blocktune computes: LoRA on bf16 weights with peft's fp32 adapters; a full
    fine-tune with fp32 weights and moments under torch.autocast (bf16 matmuls, fp32 masters).
    `lr`: the learning rate (blocktune's default if not given); every step's loss is printed too."""
    from pathlib import Path

    import peft
    import torch
    import transformers
    from blocktune.model.args import LoraConfig
    from blocktune.run.config import RunConfig

    from .measure import rss_anon, track_anon_peak

    start, peak = rss_anon(), track_anon_peak()
    path = Path(gguf_file)
    bf16 = dtype == "bf16"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.bfloat16 if bf16 and method == "lora" else torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if method == "lora":
        lora = LoraConfig()
        names = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
        model = peft.get_peft_model(model, peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha,
                                                           lora_dropout=lora.dropout,
                                                           target_modules=[names[t] for t in lora.targets]))
    model.train()
    cfg = RunConfig()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=float(lr) if lr else cfg.lr,
                            weight_decay=cfg.weight_decay)
    b, s = int(batch), int(seq)
    ids = torch.tensor(tok(Path(text_file).read_text(), add_special_tokens=False)["input_ids"])
    times, losses = [], []
    for i in range(int(steps)):
        chunk = ids[i * b * (s + 1):(i + 1) * b * (s + 1)].reshape(b, s + 1)
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and method == "full"):
            logits = model(input_ids=chunk[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 chunk[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    print(json.dumps({"seconds": times, "anon_peak": peak(), "anon_start": start, "loss": loss.item(), "losses": losses,
                      "adapter_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})}))


def hf_loss(folder: str, gguf_name: str, text_file: str, seq: str) -> None:
    """transformers' mean next-token loss over a text's windows of `seq` tokens (its own
    tokenizer), of an HF folder or (with `gguf_name`) a GGUF file: the held-out figure."""
    from pathlib import Path

    import torch
    import transformers

    kw = {"gguf_file": gguf_name} if gguf_name != "-" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, **kw)
    ids = torch.tensor(tok(Path(text_file).read_text(), add_special_tokens=False)["input_ids"])
    s = int(seq)
    n = (len(ids) - 1) // s
    total = 0.0
    with torch.no_grad():
        for i in range(n):
            x, y = ids[i * s:(i + 1) * s][None], ids[i * s + 1:(i + 1) * s + 1]
            total += torch.nn.functional.cross_entropy(model(input_ids=x).logits[0], y).item()
    print(json.dumps({"loss": total / n, "windows": n}))


def gguf_read_all(path: str) -> None:
    """Every tensor of a GGUF file read and dequantized by gguf (llama.cpp's reader): the floor
    under `blocktune prepare`, which does that and writes the store."""
    import gguf

    for t in gguf.GGUFReader(path).tensors:
        gguf.quants.dequantize(t.data, t.tensor_type)


if __name__ == "__main__":
    what, rest = sys.argv[1], sys.argv[2:]
    sys.exit({"prepare": prepare, "generate": generate, "export": export, "finetune": finetune,
              "hf_step": hf_step, "hf_loss": hf_loss,
              "gguf_read_all": gguf_read_all}[what](*rest) or 0)
