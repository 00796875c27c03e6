"""`blocktune prepare` and `blocktune export`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from blocktune.errors import ConfigError

from .exports import EXPORTS, ExportJob

__all__ = ["register_prepare", "register_export"]


def cmd_prepare(a: argparse.Namespace) -> int:
    # torch's imports are in the commands, so that `blocktune --help` starts without it
    from blocktune.machine.devices import dtype_name, parse_dtype
    from blocktune.run.report import Progress
    from blocktune.store.records import unit_names

    from .hf import import_hf
    from .meta import import_meta, open_tokenizer_model, read_params

    src = Path(a.src)
    _new_folder(a.dst, "a store")
    dtype = parse_dtype(a.dtype) if a.dtype else None
    is_hf = (src / "config.json").is_file() and not (src / "params.json").is_file()
    t0 = time.perf_counter()
    if src.is_file():  # a GGUF file, or nothing prepare reads
        _check_gguf(src)
        from .gguf_read import import_gguf, read_gguf

        model = read_gguf(src)
        bar = Progress(len(unit_names(model[0])), desc="prepare", unit="unit", every=10.0)
        try:
            store = import_gguf(model, a.dst, dtype, progress=lambda _: bar.update(1))
        finally:
            bar.close()
    elif is_hf:
        store = import_hf(src, a.dst, dtype)
    else:
        tok = src / "tokenizer.model"
        args = read_params(src, open_tokenizer_model(tok) if tok.is_file() else None)
        bar = Progress(len(unit_names(args)), desc="prepare", unit="unit", every=10.0)
        try:
            store = import_meta(src, a.dst, dtype, progress=lambda _: bar.update(1))
        finally:
            bar.close()
    dt = time.perf_counter() - t0
    gb = store.total_bytes() / 1e9
    print(f"prepared {store.path}: {len(store.units)} units, {gb:.2f} GB {dtype_name(store.dtype)}, "
          f"in {dt:.1f}s ({gb / dt:.2f} GB/s)")
    if a.stages:
        from blocktune.store.ranks import split_stage_stores

        pattern = f"{Path(a.dst)}-{{rank}}"
        outs = split_stage_stores(store.path, a.nproc or a.stages, a.stages, pattern)
        print(f"{len(outs)} per-rank stores for --stages {a.stages} ({outs[0]} ... {outs[-1]}, hard-linked "
              f"where the disk allows): a full fine-tune takes --store '{pattern}'")
    return 0


def _new_folder(dst: str, what: str) -> None:
    """Refuse a destination that is a file: `what` is written as a folder there."""
    if Path(dst).exists() and not Path(dst).is_dir():
        raise ConfigError(f"{dst} is a file; {what} is a folder: give the path of a new (or empty) "
                          "folder for it")


def _check_gguf(path: Path) -> None:
    """Refuse a file that is not GGUF (the only file prepare reads), saying what it starts with."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        what = "it is empty" if not magic else f"it starts with {magic!r}, not GGUF's magic b'GGUF'"
        raise ConfigError(f"{path} is not a GGUF file ({what}); prepare reads a .gguf file (llama.cpp, "
                          "Ollama) or a folder in Meta's (params.json) or Hugging Face's (config.json) layout: "
                          "download the file again, or give the model's folder")


def cmd_export(a: argparse.Namespace) -> int:
    from blocktune.formats.adapters import load_adapter
    from blocktune.machine.devices import parse_dtype
    from blocktune.store.store import BlockStore

    _new_folder(a.out, f"an export{' (' + a.format + ')' if a.format else ''}")
    store = BlockStore.open_base(a.store) if a.base else BlockStore.open(a.store)
    adapter = load_adapter(a.adapter, store.args) if a.adapter else None
    dtype = parse_dtype(a.dtype)
    if a.format is None:  # back to the layout it came in
        a.format = "hf" if store.manifest.get("source", {}).get("format") == "hf" else "meta"
    job = ExportJob(store, a.out, adapter, dtype, a.shards, store_name=a.store, adapter_name=a.adapter,
                    dtype_name=a.dtype)
    print(EXPORTS[a.format].write(job))
    return 0


def register_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="Meta or Hugging Face folder, or a GGUF file -> block store")
    p.add_argument("src", help="folder with params.json + consolidated.XX.pth, or HF config.json + safetensors, "
                                 "or a .gguf file (llama.cpp, Ollama; dequantized)")
    p.add_argument("dst", help="new store folder")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="stored dtype (default: as the checkpoint)")
    p.add_argument("--stages", type=int, help="also write DST-{rank}, a store per rank for a staged full fine-tune "
                                             "(`blocktune split-stages` does it for a store already prepared)")
    p.add_argument("--nproc", type=int, help="with --stages: the run's processes (default: one per stage)")
    p.set_defaults(func=cmd_prepare)


def register_export(sub) -> None:
    p = sub.add_parser("export", help="block store -> Meta (or HF) folder, LoRA merged on request")
    p.add_argument("store")
    p.add_argument("out")
    p.add_argument("--shards", type=int, help="Meta shard count (default: the imported count)")
    p.add_argument("--adapter", help="LoRA adapter (blocktune's file or a PEFT folder) to merge into the weights")
    p.add_argument("--base", action="store_true", help="the base model a full fine-tune kept, not the tuned one")
    p.add_argument("--format", choices=list(EXPORTS),
                   help="output layout (default: the one the store was prepared from); "
                        + "; ".join(f"{f.name}: {f.help}" for f in EXPORTS.values() if f.help))
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.set_defaults(func=cmd_export)
