"""`blocktune demo`: the whole workflow on a model made on the spot, in a couple of minutes.

Make a small random Llama-2 (Meta layout, the project's sentencepiece tokenizer), prepare it
into a store, show a greedy completion, LoRA fine-tune it on a passage the project ships,
show the completion again, and export the merged model in Meta's layout.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from blocktune.run.config import RunConfig
from blocktune.run.trainer import Trainer
from blocktune_export.meta import export_meta, import_meta

from .corpus import demo_text
from .synthetic import write_meta_checkpoint

__all__ = ["run_demo"]

PROMPT = "The lighthouse keeper of Saint Brenna"


def run_demo(out: str | Path = "demo-out", steps: int = 150, log=print) -> dict:
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    log(f"1/5 making a random Llama-2 model (preset 'demo') in Meta layout: {out / 'meta'}")
    write_meta_checkpoint(out / "meta", "demo", seed=0)
    log(f"2/5 blocktune prepare {out / 'meta'} {out / 'store'}")
    store = import_meta(out / "meta", out / "store")
    data = out / "lighthouse.txt"
    data.write_text(demo_text())
    cfg = RunConfig(store=str(store.path), data=str(data), out=str(out / "run"), method="lora",
                    steps=steps, lr=5e-3, warmup_steps=5, min_lr_ratio=0.1, batch_size=4,
                    grad_accum=1, seq_len=64, val_ratio=0.0, eval_every=0, sample_every=0,
                    checkpoint_every=50, lora_rank=16, lora_alpha=32, lora_dropout=0.0,
                    lora_targets=["wq", "wk", "wv", "wo", "w1", "w2", "w3"], device="cpu",
                    sample_prompt=PROMPT, sample_tokens=40, grad_clip=1.0)
    trainer = Trainer(cfg, log=lambda s: None)
    before = trainer.sample()
    log(f"3/5 before fine-tuning: {PROMPT}{before}")
    log(f"4/5 LoRA fine-tune, {steps} steps on {data.name} ({len(trainer.train_data)} sequences)")
    history = trainer.run()
    after = trainer.sample()
    trainer.close()
    log(f"    loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}")
    log(f"    after fine-tuning: {PROMPT}{after}")
    log(f"5/5 blocktune export {out / 'store'} {out / 'export'} --adapter {out / 'run' / 'adapter.safetensors'}")
    from blocktune.formats.adapters import load_adapter

    adapter = load_adapter(out / "run" / "adapter.safetensors", store.args)
    export_meta(store, out / "export", adapter=adapter)
    summary = {"seconds": round(time.perf_counter() - t0, 1), "first_loss": history[0]["loss"],
               "last_loss": history[-1]["loss"], "before": before, "after": after,
               "export": str(out / "export"), "loss_plot": str(out / "run" / "loss.png")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"done in {summary['seconds']}s; loss curve {summary['loss_plot']}, Meta export {summary['export']}")
    return summary
