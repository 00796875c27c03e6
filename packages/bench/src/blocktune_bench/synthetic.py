"""Synthetic Llama-2 models: deterministic random weights of any shape.

`random_units` makes the tensors; `make_store` writes them straight to a block store;
`write_meta_checkpoint` (with `blocktune_export`) writes them in Meta's exact layout, N shards,
with the project's real sentencepiece tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from blocktune.model.args import ModelArgs
from blocktune.model.llama import stored_shapes
from blocktune.store.build import build_store
from blocktune.store.records import unit_names
from blocktune.store.store import BlockStore

__all__ = ["SHAPES", "random_batch", "random_unit", "random_units", "make_store", "preset"]

# Shapes for tests and benchmarks, scaled from the real families (same head_dim ratios, GQA and
# FFN rules); the real models' shapes are core's `blocktune.model.args.PRESETS`.
SHAPES: dict[str, ModelArgs] = {
    # llama-2-7b shape, shrunk: MHA, multiple_of 256 rule kept (multiple_of 32)
    "tiny-7b": ModelArgs(dim=64, n_layers=4, n_heads=4, vocab_size=1024, multiple_of=32, max_seq_len=256),
    # llama-2-13b shape, shrunk: 40 heads -> 5 heads, stored in 2 shards
    "tiny-13b": ModelArgs(dim=80, n_layers=5, n_heads=5, vocab_size=1024, multiple_of=32, max_seq_len=256),
    # llama-2-70b shape, shrunk: GQA 8:1, ffn_dim_multiplier 1.3, stored in 8 shards
    "tiny-70b": ModelArgs(dim=128, n_layers=3, n_heads=16, n_kv_heads=2, vocab_size=1024,
                          multiple_of=64, ffn_dim_multiplier=1.3, max_seq_len=256),
    # the demo's model: small enough to train visibly in a minute on 2 cores
    "demo": ModelArgs(dim=192, n_layers=6, n_heads=6, vocab_size=1024, multiple_of=64, max_seq_len=512),
    # the benchmark shape of issue 2: 16 layers, dim 1024
    "bench-1k": ModelArgs(dim=1024, n_layers=16, n_heads=16, vocab_size=8192, multiple_of=256,
                          max_seq_len=512),
    # Llama-2-7B's exact shape (random weights)
    "shape-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256),
}

META_SHARDS = {"tiny-7b": 1, "tiny-13b": 2, "tiny-70b": 8, "demo": 1, "bench-1k": 1, "shape-7b": 1}


def preset(name: str) -> ModelArgs:
    try:
        return SHAPES[name]
    except KeyError:
        raise KeyError(f"unknown synthetic preset {name!r}; choose from {sorted(SHAPES)}") from None


def random_batch(args: ModelArgs | int, batch: int = 2, seq: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic random tokens and their next-token targets, each (batch, seq), over the
    vocabulary of `args` (or a vocabulary size)."""
    vocab = args if isinstance(args, int) else args.vocab_size
    tok = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
    return tok[:, :-1], tok[:, 1:]


def random_unit(args: ModelArgs, unit: str, seed: int, std: float = 0.02,
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One unit's tensors; each unit has its own stream, so units can be made in any order."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + unit_names(args).index(unit))
    out = {}
    for key, shape in stored_shapes(args, unit).items():  # a tied head: its norm only
        if key.endswith("norm.weight"):
            # near 1, not exactly: a golden test must notice a norm that is skipped
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) * std
        out[key] = t.to(dtype)
    return out


def random_units(args: ModelArgs, seed: int = 0, dtype=torch.float32) -> Iterator[tuple[str, dict]]:
    for unit in unit_names(args):
        yield unit, random_unit(args, unit, seed, dtype=dtype)


def make_store(path: str | Path, args: ModelArgs | str, seed: int = 0,
               dtype: torch.dtype = torch.float32, tokenizer: str | Path | None = None) -> BlockStore:
    args = preset(args) if isinstance(args, str) else args
    return build_store(path, args, random_units(args, seed, dtype), dtype, tokenizer=tokenizer)


def write_meta_checkpoint(out: str | Path, args: ModelArgs | str, seed: int = 0,
                          n_shards: int | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A random Llama-2 checkpoint in Meta's exact layout: params.json, tokenizer.model (the
    project's real sentencepiece model, when the vocab size matches) and N consolidated shards,
    `rope.freqs` included as in Meta's files."""
    from blocktune_export.meta import write_meta

    from .corpus import tokenizer_path

    name = args if isinstance(args, str) else None
    args = preset(args) if isinstance(args, str) else args
    n = n_shards or (META_SHARDS.get(name, 1) if name else 1)
    tok = tokenizer_path()
    import sentencepiece as spm

    use_tok = spm.SentencePieceProcessor(model_file=str(tok)).vocab_size() == args.vocab_size
    half = args.head_dim // 2
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2)[:half].float() / args.head_dim))
    out = Path(out)
    write_meta(out, args, lambda u: random_unit(args, u, seed), n, dtype,
               extras={"rope.freqs": freqs.to(dtype)}, tokenizer=tok if use_tok else None)
    return out
