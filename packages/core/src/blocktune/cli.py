"""The `blocktune` command. Thin functions over the library.

Core commands live here; the export and bench packages add theirs (prepare, export, demo)
through the ``blocktune.commands`` entry-point group, so dependencies still point one way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from importlib.metadata import entry_points
from pathlib import Path

from blocktune import __version__
from blocktune.errors import BlocktuneError, BudgetError, ConfigError, DataError

# exit codes: 0 done; 1 the run failed (a store, checkpoint or adapter problem, training that
# cannot go on, a rank that died); 2 the command line, a setting or the data is wrong (argparse's
# usage errors are 2 too); 130 interrupted (Ctrl-C, or SIGTERM)
EXIT_FAILED, EXIT_USAGE = 1, 2

__all__ = ["main", "build_parser"]


def _launch(nproc: int, argv: list[str]) -> int:
    """`--nproc N` on one machine: torchrun's standalone launcher, N copies of this command."""
    from torch.distributed.run import main as torchrun

    rest, skip = [], False
    for arg in argv:  # the same command line without --nproc
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    # torchrun keeps each rank's error file in a log folder, by default a new torchelastic_* in
    # the temp folder that nothing removes (one left behind per run); this one goes at the end
    with tempfile.TemporaryDirectory(prefix="blocktune-ranks-") as logs:
        try:
            torchrun(["--standalone", f"--nproc-per-node={nproc}", "--log-dir", logs, "-m", "blocktune", *rest])
        except Exception as exc:  # torchrun's ChildFailedError: the first rank that failed, and how
            raise BlocktuneError(f"a rank failed (its error is printed above): {_first_failure(exc)}") from None
    return 0


def _first_failure(exc: Exception) -> str:
    """'rank 1 exited with -9 (SIGKILL)' from torchrun's ChildFailedError, or what the error says."""
    try:
        rank, failure = exc.get_first_failure()
        how = f" ({failure.signal_name()})" if failure.exitcode < 0 else ""
        return f"rank {rank} exited with {failure.exitcode}{how}"
    except Exception:  # another error, or another torch
        lines = [line.strip() for line in str(exc).splitlines() if line.strip() and set(line.strip()) != {"="}]
        return "; ".join(lines[:3]) or type(exc).__name__


def cmd_finetune(a: argparse.Namespace) -> int:
    from blocktune.run.config import RunConfig, check_out
    from blocktune.run.flags import given_settings, parse_sets
    from blocktune.run.trainer import Trainer

    sets = parse_sets(a.set or [])
    if a.resume and not a.out and not a.config and "out" not in sets:  # the newest run under runs/
        a.out = _default_out(a)
    out = a.out or sets.get("out")
    if a.resume and a.config is None and out and Path(out, "config.toml").is_file():
        a.config = str(Path(out, "config.toml"))
    # a flag wins over --set, --set over --config, --config over the defaults
    cfg = RunConfig.load(a.config, **{**sets, **given_settings(a)})
    if a.print_config:  # the resolved settings, as a --config file takes them
        sys.stdout.write(cfg.to_toml())
        return 0
    if not cfg.out:  # a new folder per run (or, resuming, the newest), named once for every rank
        cfg.out = _default_out(a)
    if a.nproc and a.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(a.nproc, [*sys.argv[1:], "--out", cfg.out])
    if not cfg.store or not cfg.data:
        raise ConfigError("finetune needs --store and --data (or store/data in --config)")
    check_out(cfg, a.resume)  # every rank, before any joins the others (and rank 0 writes there)
    trainer = Trainer(cfg, log=lambda s: print(s, file=sys.stderr))
    try:
        history = trainer.run(resume=a.resume)
    finally:
        trainer.close()
    if history and trainer.dist.is_main:  # the result, once for the run (rank 0's)
        last = history[-1]
        print(json.dumps({"step": last["step"], "loss": last["loss"], "val_loss": last.get("val_loss"),
                          "out": str(cfg.out)}))
    return 0


def _default_out(a: argparse.Namespace) -> str:
    """The run folder when --out is not given (`blocktune.run.config.default_out`); the ranks of
    a run started by torchrun itself cannot agree on a new one's name, so they must be given it."""
    from blocktune.run.config import default_out

    if "WORLD_SIZE" in os.environ and not a.resume:
        raise ConfigError("several processes write one run folder: name it with --out")
    return default_out(a.resume, lambda s: print(s, file=sys.stderr))


def _inference_engine(a: argparse.Namespace, batch: int, seq: int):
    """(store, engine, tokenizer) for generate and eval: read-only, with the adapter if given."""
    from blocktune.engine.engine import Engine
    from blocktune.formats.adapters import load_adapter
    from blocktune.formats.tokenizer import load_tokenizer
    from blocktune.run.config import MACHINE, RunConfig
    from blocktune.run.flags import given_settings
    from blocktune.store.store import BlockStore

    settings = RunConfig(**given_settings(a, MACHINE))  # typed as a run types them
    store = BlockStore.open_base(a.store) if a.base else BlockStore.open(a.store)
    tok = load_tokenizer(store)
    adapter = load_adapter(a.adapter, store.args) if a.adapter else None
    cfg = settings.inference_config(adapter.lora if adapter else None, batch, seq)
    engine = Engine(store, cfg, adapters=adapter.tensors if adapter else None)
    return store, engine, tok


def cmd_generate(a: argparse.Namespace) -> int:
    from blocktune.run.generate import SamplingConfig, generate_tokens, stream_text

    _, engine, tok = _inference_engine(a, 1, min(len(a.prompt) + a.max_new_tokens, 4096))
    sampling = SamplingConfig(a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed)
    stops = tok.eos_ids
    if a.chat:  # the prompt as the user's turn, in the model's chat template
        from blocktune.formats.chat import chat_format

        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [
            {"role": "user", "content": a.prompt}]
        chat = chat_format(tok, a.chat_template or "")
        prompt, stops = chat.prompt(messages), chat.stop_ids()  # the reply alone is printed
    else:
        if a.system or a.chat_template:
            raise ConfigError(f"{'--system' if a.system else '--chat-template'} needs --chat")
        prompt = tok.encode(a.prompt, bos=True)
        sys.stdout.write(a.prompt)
    t0 = time.perf_counter()
    out = stream_text(tok, prompt, generate_tokens(engine, prompt, sampling, stops),
                      lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    limit = engine.args.max_seq_len
    if len(out) < a.max_new_tokens and len(prompt) + len(out) >= limit and not (out and out[-1] in stops):
        print(f"[stopped at the model's context of {limit} tokens: the prompt's {len(prompt)} and "
              f"{len(out)} new; --max-new-tokens {a.max_new_tokens} asked for more]", file=sys.stderr)
    print(f"[{len(out)} tokens in {dt:.2f}s, {len(out) / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)
    engine.close()
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    import torch

    from blocktune.run.data import eval_examples

    store, engine, tok = _inference_engine(a, a.batch_size, a.seq_len)
    # a text file's windows, or a file of rows encoded as finetune trains on it
    windows = eval_examples(a.data, tok, a.seq_len, store.args.max_seq_len, a.chat_template or "",
                            log=lambda s: print(s, file=sys.stderr))
    total, count = 0.0, 0
    for i in range(0, len(windows), a.batch_size):
        ex = windows[i:i + a.batch_size]
        loss, n = engine.eval_loss(torch.stack([e.tokens for e in ex]), torch.stack([e.targets for e in ex]))
        total, count = total + loss * n, count + n
    engine.close()
    store.close()
    loss = total / count
    result = {"loss": loss, "ppl": math.exp(loss), "tokens": count, "step": store.step}
    print(json.dumps(result) if a.json else
          f"loss {loss:.4f}  perplexity {math.exp(loss):.2f}  over {count} tokens  (store step {store.step})")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from blocktune.store.store import BlockStore

    store = BlockStore.open(a.store)
    problems = store.verify()
    for p in problems:
        print(p, file=sys.stderr)
    for note in store.leftovers():
        print(f"note: {note}", file=sys.stderr)
    store.close()
    n = len(store.units) + len(store.manifest.get("state", {})) + len(store.manifest.get("checksums", {}))
    print(f"{a.store}: step {store.step}, {n} files checked, {len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_split_stages(a: argparse.Namespace) -> int:
    from blocktune.store.ranks import split_stage_stores

    outs = split_stage_stores(a.store, a.nproc or a.stages, a.stages, a.out)
    print(f"{len(outs)} per-rank stores ({outs[0]} ... {outs[-1]}): train with --store '{a.out}'")
    return 0


def cmd_merge_stages(a: argparse.Namespace) -> int:
    from blocktune.store.ranks import merge_stage_stores
    from blocktune.store.store import BlockStore

    out = merge_stage_stores(a.store, a.nproc, a.stages, a.out)
    store = BlockStore.open(out)
    print(f"{out}: step {store.step}, {len(store.units)} units from {a.stages} stages "
          f"({store.total_bytes() / 1e9:.2f} GB); export, eval and generate read it")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from blocktune.store.records import open_manifest  # the manifest alone: no torch to import

    t0 = time.perf_counter()
    store = open_manifest(a.store)
    opened = time.perf_counter() - t0
    args = store.args
    info = {"store": str(store.path), "step": store.step, "dtype": store.torch_dtype_name,
            "params": args.n_params(), "bytes": store.total_bytes(), "units": len(store.units),
            "largest_unit_bytes": max(store.unit_bytes(u) for u in store.units),
            "family": args.family, "model": {**args.to_params(), **{
                k: v for k, v in args.to_dict().items() if not k.endswith("dropout")}},
            "open_seconds": round(opened, 4),
            "tokenizer_kind": store.manifest.get("tokenizer_kind") if store.manifest.get("tokenizer") else None,
            "tokenizer": store.manifest.get("tokenizer"), "source": store.manifest.get("source"),
            **_tuned_state(store)}
    print(json.dumps(info, indent=1))
    return 0


def _tuned_state(store) -> dict:
    """`info`'s account of a store's full fine-tunes: the run that owns the tuned state, the base."""
    run = store.run_record()
    return {"tuned_by": None if run is None else {
                "run_id": run.get("id") or None, "out": run.get("out"), "first_step": run["first_step"],
                "steps_done": store.step - int(run["first_step"])},
            "holds_tuned": store.holds_tuned(), "base_kept": store.keeps_base,
            "base_step": store.manifest["base"]["step"] if store.keeps_base else None}


def cmd_report(a: argparse.Namespace) -> int:
    from blocktune.run.report import format_summary, plot_run, summarize

    run = Path(a.run)
    if not (run / "metrics.jsonl").is_file():
        raise ConfigError(f"{run}: no metrics.jsonl; give the --out folder of a finetune run")
    summary = summarize(run)
    figure = None if a.no_plot else plot_run(run, log=lambda s: print(s, file=sys.stderr))
    summary["figure"] = str(figure) if figure else None
    if a.json:
        print(json.dumps(summary, indent=1))
    else:
        print(format_summary(summary))
        if figure:
            print(f"figure    {figure}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blocktune", description=__doc__.splitlines()[0],
        epilog="exit codes: 0 done, 1 the run failed (store, checkpoint, training), 2 a wrong command "
               "line, setting or data file, 130 interrupted (Ctrl-C, or SIGTERM), 141 the output's reader "
               "went away (| head)")
    parser.add_argument("--version", action="version", version=f"blocktune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    _finetune_parser(sub)
    _inference_parsers(sub)
    _store_parsers(sub)
    for ep in sorted(entry_points(group="blocktune.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser




def _finetune_parser(sub) -> None:
    from blocktune.run.config import PROCESSES
    from blocktune.run.flags import add_setting_flags

    p = sub.add_parser("finetune", help="fine-tune a store (LoRA or full) on a text or JSONL file",
                       description="Every setting of a run is a flag below, a --set KEY=VALUE and a key of "
                                   "a --config file (a flag wins over --set, --set over --config).")
    p.add_argument("--config", help="TOML run config; flags override it")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any setting by its name, e.g. --set lora_rank=16 --set 'lora_targets=[\"wq\",\"wv\"]' "
                        "(repeatable; flags win over it, it wins over --config)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved settings as TOML (a --config file) and exit")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    groups = add_setting_flags(p)
    groups[PROCESSES].add_argument("--nproc", type=int, help="processes on this machine (torchrun --standalone): "
                                   "data parallel, or stages x replicas with --stages")
    p.set_defaults(func=cmd_finetune)


def _inference_parsers(sub) -> None:
    """generate and eval."""
    from blocktune.run.config import MACHINE
    from blocktune.run.flags import add_setting_flags

    p = sub.add_parser("generate", help="generate text, streaming, with a KV cache")
    p.add_argument("--store", required=True)
    p.add_argument("--base", action="store_true", help="the base model a full fine-tune kept, not the tuned one")
    p.add_argument("--adapter", help="LoRA adapter: a run's adapter.safetensors or a PEFT folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user turn in the model's chat template (Llama 2: [INST])")
    p.add_argument("--system", help="with --chat: a system prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    add_setting_flags(p, (*MACHINE, "chat_template"))
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="mean next-token loss and perplexity of a text file or of rows")
    p.add_argument("--store", required=True)
    p.add_argument("--base", action="store_true", help="the base model a full fine-tune kept, not the tuned one")
    p.add_argument("--data", required=True, help="a text file (its windows), or rows as finetune reads them "
                                                 "(scored as finetune trains: a chat on its assistant tokens)")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--adapter", help="LoRA adapter: a run's adapter.safetensors or a PEFT folder")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--json", action="store_true")
    add_setting_flags(p, (*MACHINE, "chat_template"))
    p.set_defaults(func=cmd_eval)


def _store_parsers(sub) -> None:
    """verify, report, info, split-stages and merge-stages."""
    p = sub.add_parser("verify", help="check every file of a store against its checksum")
    p.add_argument("store")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("report", help="summarise a run folder and redraw its loss.png (a killed run too)")
    p.add_argument("run", help="the --out folder of a finetune run")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-plot", action="store_true", help="print the summary only")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("info", help="describe a store")
    p.add_argument("store")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("split-stages", help="a store per rank for a staged full fine-tune (hard links)")
    p.add_argument("store")
    p.add_argument("--out", required=True, help="the per-rank stores' pattern, e.g. 'store-{rank}'")
    p.add_argument("--stages", type=int, required=True)
    p.add_argument("--nproc", type=int, help="the run's processes (default: one per stage)")
    p.set_defaults(func=cmd_split_stages)

    p = sub.add_parser("merge-stages", help="one store from a staged full fine-tune's per-rank stores")
    p.add_argument("out", help="a new folder for the merged store")
    p.add_argument("--store", required=True, help="the run's per-rank store pattern, e.g. 'store-{rank}'")
    p.add_argument("--nproc", type=int, required=True, help="the run's number of processes")
    p.add_argument("--stages", type=int, required=True, help="the run's --stages")
    p.set_defaults(func=cmd_merge_stages)


def _term_as_interrupt() -> None:
    """SIGTERM (what a scheduler, `docker stop` or systemd sends) stops a command as Ctrl-C
    does: KeyboardInterrupt in the main thread, the same clean stop, message and exit code 130.
    Left alone where SIGTERM is ignored or handled already (by the process that started us)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    _term_as_interrupt()
    try:
        code = a.func(a)
        sys.stdout.flush()  # a reader that stopped early (`| head`) shows here, not at exit
        return code
    except BrokenPipeError:  # as Unix tools end when their reader has gone: quietly, 128 + SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 128 + signal.SIGPIPE
    except BlocktuneError as exc:
        print(f"blocktune {a.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, (ConfigError, DataError, BudgetError)) else EXIT_FAILED
    except KeyboardInterrupt:
        print(f"blocktune {a.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
