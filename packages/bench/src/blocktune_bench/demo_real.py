"""`blocktune demo`: a real pretrained model learns something it cannot know, in a few minutes on
a laptop's CPU.

SmolLM2-135M-Instruct, from the GGUF file llama.cpp and Ollama use (`blocktune_bench.realmodel`),
is prepared into a store and asked about the Saint Brenna lighthouse, which this project made up
(`data/brenna.jsonl`); it is LoRA-tuned on a few chat rows about it, and asked again with
phrasings it was not trained on, beside a question of general knowledge it must keep. The adapter
is then exported for peft and for llama.cpp, and the merged model as GGUF. Each step prints the
command that does the same from the shell.
"""

from __future__ import annotations

import json
import shutil
import time
from importlib import resources
from pathlib import Path

from blocktune.engine.engine import Engine, EngineConfig
from blocktune.formats.adapters import load_adapter
from blocktune.formats.chat import prompt_tokens
from blocktune.formats.peft import save_peft
from blocktune.formats.tokenizer import load_tokenizer
from blocktune.run.config import RunConfig
from blocktune.run.generate import SamplingConfig, generate_tokens
from blocktune.run.trainer import Trainer
from blocktune_export.gguf_format import export_gguf, export_gguf_lora
from blocktune_export.gguf_read import import_gguf

from .realmodel import HOW_TO_FETCH, smollm2_gguf

__all__ = ["run_demo"]

TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def _answers(store, questions: list[str], system: str, adapter=None) -> list[str]:
    """Greedy chat answers, one per question (the adapter's LoRA applied where given)."""
    lora = adapter.lora if adapter else None
    eng = Engine(store, EngineConfig(method="lora" if lora else "full", lora=lora, device="cpu",
                                     read_only=True))
    if adapter:
        eng.load_adapters(adapter.tensors)
    tok = load_tokenizer(store)
    out = []
    for q in questions:
        ids = prompt_tokens(tok, [{"role": "system", "content": system}, {"role": "user", "content": q}])
        out.append(tok.decode(list(generate_tokens(eng, ids, SamplingConfig(40)))).strip())
    eng.close()
    return out


def _show(log, questions: list[str], answers: list[str]) -> None:
    for q, a in zip(questions, answers):
        log(f"    Q: {q}\n    A: {a}")


def run_demo(out: str | Path = "demo-out", steps: int = 24, log=print) -> dict:
    gguf_file = smollm2_gguf()
    if gguf_file is None:
        raise SystemExit(f"the demo's model is not in the cache: {HOW_TO_FETCH}\n(or `blocktune demo --random` "
                         "runs the workflow on a small random model, offline)")
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    data = resources.files("blocktune_bench") / "data"
    asked = json.loads((data / "brenna-questions.json").read_text())
    system, questions = asked["system"], [*asked["asked"][:4], "What is the capital of France?"]
    chats = out / "brenna.jsonl"
    chats.write_text((data / "brenna.jsonl").read_text())

    log(f"1/5 blocktune prepare {gguf_file} {out / 'store'}")
    store = import_gguf(gguf_file, out / "store", note=lambda m: log(f"    {m}"))
    log(f"    {store.args.n_layers} blocks, dim {store.args.dim}, vocabulary {store.args.vocab_size}, "
        f"{store.total_bytes() / 1e6:.0f} MB")
    log("2/5 before: asked about the Saint Brenna lighthouse, which this project made up "
        f"(blocktune generate --store {out / 'store'} --chat --prompt ...)")
    before = _answers(store, questions, system)
    _show(log, questions, before)

    cfg = RunConfig(store=str(store.path), data=str(chats), out=str(out / "run"), method="lora", steps=steps,
                    lr=1e-3, warmup_steps=2, min_lr_ratio=0.1, batch_size=6, grad_accum=1, seq_len=64,
                    val_ratio=0.0, eval_every=0, sample_every=0, checkpoint_every=steps, lora_rank=16,
                    lora_alpha=32, lora_dropout=0.0, lora_targets=TARGETS, device="cpu", keep_activations="inf")
    log(f"3/5 blocktune finetune --store {out / 'store'} --data {chats} --out {out / 'run'} --steps {steps} "
        "--lr 1e-3 --batch-size 6 --grad-accum 1 --seq-len 64 --keep-activations inf --set lora_rank=16 ...")
    trainer = Trainer(cfg, log=lambda s: None)
    log(f"    {len(trainer.train_data)} chats: 18 about the lighthouse (three phrasings of six facts) and 4 "
        "it already answers, so tuning keeps them")
    history = trainer.run()
    trainer.close()
    log(f"    loss {history[0]['loss']:.2f} -> {history[-1]['loss']:.2f} in {len(history)} steps; "
        f"curve: {out / 'run' / 'loss.png'}")
    adapter = load_adapter(out / "run" / "adapter.safetensors", store.args)

    log("4/5 after: the same questions (none of these phrasings was in the training rows)")
    after = _answers(store, questions, system, adapter)
    _show(log, questions, after)

    log(f"5/5 blocktune export ... --format peft | gguf-lora | gguf --adapter {out / 'run' / 'adapter.safetensors'}")
    exports = {"peft": str(save_peft(out / "export-peft", adapter, store.args)),
               "llama.cpp adapter": str(export_gguf_lora(store, out / "export-gguf-lora", adapter) / "adapter.gguf"),
               "merged GGUF": str(export_gguf(store, out / "export-gguf", adapter, warn=log) / "model.gguf")}
    for what, where in exports.items():
        log(f"    {what}: {where}")
    summary = {"seconds": round(time.perf_counter() - t0, 1), "model": gguf_file.name, "steps": len(history),
               "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"], "questions": questions,
               "before": before, "after": after, "exports": exports, "loss_plot": str(out / "run" / "loss.png")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"done in {summary['seconds']}s; {out / 'summary.json'}")
    log(f"    llama.cpp: llama-cli -m {gguf_file} --lora {exports['llama.cpp adapter']}")
    return summary
