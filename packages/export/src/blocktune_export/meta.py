"""Meta's checkpoint layout: params.json, tokenizer.model, consolidated.00.pth … NN.pth.

Meta shards each tensor across model-parallel ranks; the table below says along which axis
(None: every shard holds a full copy). It is the whole of the format: import concatenates
along the axis, export splits along it.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from blocktune.errors import ConfigError, StoreError
from blocktune.formats import meta as params_json
from blocktune.formats.tokenizer import TiktokenTokenizer, Tokenizer, detect_kind
from blocktune.model.args import ModelArgs
from blocktune.model.llama import stored_shapes
from blocktune.model.units import unit_name, unit_prefix
from blocktune.store.build import build_store
from blocktune.store.fileio import RowPieces
from blocktune.store.records import unit_names
from blocktune.store.safefiles import staging_dir
from blocktune.store.store import BlockStore

__all__ = ["SPLIT_AXIS", "split_axis", "meta_key", "read_meta", "import_meta", "export_meta",
           "write_meta", "shard_files", "load_shard"]

# key (with layers.N. removed) -> axis Meta splits it along, None = replicated
SPLIT_AXIS: dict[str, int | None] = {
    "tok_embeddings.weight": 1,
    "norm.weight": None,
    "output.weight": 0,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}
NOT_PARAMETERS = ("rope.freqs",)
PARAMS_COPY = "source-params.json"  # the params.json a store was prepared from, verbatim  # in Meta's files, recomputed by the model
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")


def split_axis(key: str) -> int | None:
    m = _LAYER.match(key)
    local = m.group(2) if m else key
    try:
        return SPLIT_AXIS[local]
    except KeyError:
        raise KeyError(local) from None


def unit_of(key: str) -> tuple[str, str]:
    """Meta key -> (unit name, key inside the unit)."""
    m = _LAYER.match(key)
    if m:
        return unit_name(int(m.group(1))), m.group(2)
    if key == "tok_embeddings.weight":
        return "embed", key
    return "head", key


def meta_key(unit: str, key: str) -> str:
    return unit_prefix(unit) + key


def shard_files(src: Path) -> list[Path]:
    shards = sorted(src.glob("consolidated.*.pth"))
    if not shards:
        raise StoreError(f"{src}: no consolidated.XX.pth files; is this a Meta Llama folder?")
    indices = [int(_SHARD.match(p.name).group(1)) for p in shards if _SHARD.match(p.name)]
    expected = list(range(len(indices)))
    if sorted(indices) != expected:
        missing = sorted(set(range(max(indices) + 1)) - set(indices))
        raise StoreError(f"{src}: shard(s) {[f'consolidated.{i:02d}.pth' for i in missing]} missing "
                         f"(found {[p.name for p in shards]}); copy the complete checkpoint")
    return [src / f"consolidated.{i:02d}.pth" for i in expected]


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """Memory-map one shard; never unpickles anything but tensors (weights_only)."""
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise StoreError(f"{path}: refused to load: it is not a plain tensor checkpoint "
                         f"(weights_only unpickler said: {str(exc).splitlines()[0]})") from exc
    except (RuntimeError, OSError, EOFError) as exc:
        raise StoreError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    if not isinstance(sd, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    ):
        raise StoreError(f"{path}: expected a dict of name -> tensor, got {type(sd).__name__}")
    return sd


def open_tokenizer_model(path: Path):
    """A Meta tokenizer.model: sentencepiece (Llama 2) or tiktoken (Llama 3), told by content."""
    return TiktokenTokenizer(path) if detect_kind(path) == "tiktoken" else Tokenizer(path)


def _no_model_config(src: Path) -> str:
    """What `prepare` says of a folder with neither layout's model config."""
    if not src.is_dir():
        return f"{src}: no such folder; give a Meta or Hugging Face checkpoint folder, or a .gguf file"
    weights = sorted(p.name for p in src.iterdir() if p.suffix in (".safetensors", ".pth", ".bin"))
    return (f"{src}: neither config.json (a Hugging Face folder: config.json beside model*.safetensors) nor "
            f"params.json (Meta's layout: params.json beside consolidated.*.pth) is there"
            + (f" beside {', '.join(weights[:3])}{' ...' if len(weights) > 3 else ''}" if weights else "")
            + "; copy the model's config.json (or params.json) from where the weights came from into the folder")


def read_params(src: Path, tokenizer: Tokenizer | None) -> ModelArgs:
    path = src / "params.json"
    if not path.is_file():
        raise ConfigError(_no_model_config(src))
    params = params_json.read_json(path)
    if params.get("vocab_size", -1) == -1:
        if tokenizer is None:
            raise ConfigError(f"{path}: vocab_size is -1 and there is no tokenizer.model to read it from")
        params["vocab_size"] = tokenizer.vocab_size
    return params_json.from_params(params, source=str(path))


def _check_shapes(args: ModelArgs, unit: str, tensors: dict[str, torch.Tensor], files) -> None:
    want = stored_shapes(args, unit)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if want != got:
        diff = [f"{meta_key(unit, k)}: {got.get(k)} vs params.json's {want.get(k)}"
                for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)]
        raise StoreError(f"{files[0].parent}: tensor shapes do not match params.json and "
                         f"{len(files)} shard(s): " + "; ".join(diff[:4]))


def _scan_keys(src: Path, files: list[Path]) -> tuple[dict[str, list[str]], dict[str, torch.Tensor], list[str]]:
    """One pass over the shards' keys (mapped: no tensor data read), checked before anything is
    written: (unit -> its keys, the non-parameter extras of shard 0, shard 0's key order)."""
    keys: dict[str, list[int]] = {}
    extras: dict[str, torch.Tensor] = {}
    order: list[str] = []
    for i, f in enumerate(files):
        for k, v in load_shard(f).items():
            if i == 0:
                order.append(k)
            if k in NOT_PARAMETERS:
                if i == 0:
                    extras[k] = v.clone()
                continue
            try:
                split_axis(k)
            except KeyError:
                raise StoreError(f"{f}: unknown key {k!r}; not a Llama-2 checkpoint "
                                 f"(known: {sorted(SPLIT_AXIS)} per layer)") from None
            keys.setdefault(k, []).append(i)
    incomplete = [k for k, where in keys.items() if len(where) != len(files)]
    if incomplete:
        raise StoreError(f"{src}: key(s) {incomplete[:3]} missing from some shards")
    by_unit: dict[str, list[str]] = {}
    for k in keys:
        by_unit.setdefault(unit_of(k)[0], []).append(k)
    return by_unit, extras, order


def read_meta(src: str | Path) -> tuple[ModelArgs, Iterator[tuple[str, dict]], dict]:
    """Validate a Meta folder and return (args, a generator of units, extras).

    Shards are memory-mapped afresh for each unit and released after it is written, so resident
    memory stays near one unit, whatever the checkpoint size; of a unit, only the tensors split
    along dim 1 are joined in anonymous memory (the others are written piece by piece from the
    mapped shards: `RowPieces`).
    """
    src = Path(src)
    tok_path = src / "tokenizer.model"
    tokenizer = open_tokenizer_model(tok_path) if tok_path.is_file() else None
    args = read_params(src, tokenizer)
    files = shard_files(src)
    by_unit, extras, order = _scan_keys(src, files)
    expected = unit_names(args)
    if set(by_unit) != set(expected):
        raise StoreError(f"{src}: checkpoint has units {sorted(by_unit)[:5]}…, params.json "
                         f"(n_layers={args.n_layers}) says {len(expected)} units")
    emb_rows = load_shard(files[0])["tok_embeddings.weight"].shape[0]
    if tokenizer is not None and tokenizer.vocab_size != emb_rows:
        raise StoreError(f"{tok_path}: tokenizer has {tokenizer.vocab_size} pieces but "
                         f"tok_embeddings has {emb_rows} rows; use the tokenizer.model that "
                         "came with these weights")

    def units() -> Iterator[tuple[str, dict]]:
        for unit in expected:
            shards = [load_shard(f) for f in files]  # mmap'd afresh for each unit
            out = {}
            for k in by_unit[unit]:
                axis = split_axis(k)
                pieces = [sd[k] for sd in shards]
                # only pieces split along dim 1 are joined in memory; the rest stay views of the
                # mapped shards (page cache) until the unit is written
                if axis is None or len(pieces) == 1:
                    out[unit_of(k)[1]] = pieces[0]
                elif axis == 0:
                    out[unit_of(k)[1]] = RowPieces(pieces)
                else:
                    out[unit_of(k)[1]] = torch.cat(pieces, axis)
                del pieces
            del shards  # the shards are unmapped once the unit's writer lets go of its pieces
            _check_shapes(args, unit, out, files)
            yield unit, out

    return args, units(), {"extras": extras, "tokenizer": tok_path if tokenizer else None,
                           "shards": len(files), "key_order": order}


def import_meta(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None,
                progress: Callable[[str], None] | None = None) -> BlockStore:
    """Meta folder -> new block store at `dst` (all or nothing)."""
    args, units, info = read_meta(src)
    first = next(units)
    dtype = dtype or next(iter(first[1].values())).dtype

    def chain():
        yield first
        yield from units

    extra = {"source": {"format": "meta", "shards": info["shards"], "key_order": info["key_order"]}}
    files = {}
    if info["extras"]:  # small (rope.freqs): kept so that export gives back the same keys
        from safetensors.torch import save

        files["extras.safetensors"] = save(info["extras"])
    files[PARAMS_COPY] = (Path(src) / "params.json").read_bytes()  # given back byte for byte on export
    return build_store(dst, args, chain(), dtype, tokenizer=info["tokenizer"], progress=progress,
                       extra=extra, files=files)


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """`t` (contiguous) as a tensor whose storage is exactly its bytes, without a copy.

    torch.save writes a view's whole storage, so a slice of a mapped unit file would carry the
    file along; a storage of its own over the same memory (through numpy, which has no bf16:
    the bytes travel as int16) is written as just the slice, straight from the page cache.
    """
    if t.untyped_storage().nbytes() == t.numel() * t.element_size() and t.storage_offset() == 0:
        return t
    carrier = {2: torch.int16, 4: torch.int32, 8: torch.int64}.get(t.element_size())
    if carrier is None or t.dtype.is_complex:
        return t.clone()
    return torch.from_numpy(t.view(carrier).numpy()).view(t.dtype)


def _shard_piece(t: torch.Tensor, axis: int | None, i: int, n: int, dtype: torch.dtype,
                 name: str) -> torch.Tensor:
    """Shard i of n of one tensor, in `dtype`. Memory: a piece of a tensor that needs no
    conversion stays in the (mapped) memory it came from; anything converted or strided is
    copied at its own size, so the full converted tensor is let go at once."""
    converted = t.to(dtype)
    if axis is not None and t.shape[axis] % n:
        raise ConfigError(f"{name}: size {t.shape[axis]} along axis {axis} does not split into "
                          f"{n} shards; choose a shard count that divides it")
    piece = converted if axis is None else converted.chunk(n, axis)[i]
    if converted is t and piece.is_contiguous():
        return _own_storage(piece)
    piece = piece.contiguous()
    if piece.untyped_storage().nbytes() != piece.numel() * piece.element_size():
        piece = piece.clone()  # a slice of a converted whole: keep the slice, let the whole go
    return piece


def _write_spilled(out: Path, names: list[str], units, n: int, dtype: torch.dtype, save) -> None:
    """Several shards from one pass over the units: pieces to per-shard scratch files, then each
    scratch file mapped and saved as its shard."""
    import mmap
    import warnings

    scratch = out / ".pieces"
    scratch.mkdir()
    index: list[list[tuple[str, torch.dtype, tuple[int, ...], int, int]]] = [[] for _ in range(n)]
    files = [open(scratch / f"shard-{i:02d}", "wb") for i in range(n)]
    try:
        for unit in names:
            tensors = units(unit)
            for k, t in tensors.items():
                full = meta_key(unit, k)
                for i in range(n):
                    piece = _shard_piece(t, split_axis(full), i, n, dtype, full).contiguous()
                    raw = piece.view(torch.uint8).reshape(-1).numpy() if piece.numel() else b""
                    offset = files[i].tell()
                    files[i].write(memoryview(raw))
                    index[i].append((full, piece.dtype, tuple(piece.shape), offset, piece.numel() * piece.element_size()))
                    pad = -files[i].tell() % 64
                    files[i].write(b"\0" * pad)
            del tensors
    finally:
        for f in files:
            f.close()
    for i in range(n):
        path = scratch / f"shard-{i:02d}"
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) if path.stat().st_size else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a read-only mapping: nothing writes these tensors
            buf = torch.frombuffer(mm, dtype=torch.uint8) if mm is not None else torch.empty(0, dtype=torch.uint8)
        sd = {key: _own_storage(buf[off:off + nb].view(dt).reshape(shape))
              for key, dt, shape, off, nb in index[i]}
        save(i, sd)
        del sd, buf
        path.unlink()  # the scratch space goes shard by shard
    scratch.rmdir()


def write_meta(out: Path, args: ModelArgs, units: Callable[[str], dict[str, torch.Tensor]],
               n_shards: int, dtype: torch.dtype = torch.bfloat16,
               extras: dict[str, torch.Tensor] | None = None,
               tokenizer: Path | None = None, key_order: list[str] | None = None,
               params: bytes | None = None) -> None:
    """Write a Meta folder; `units(name)` returns one unit's tensors (Meta names inside it).

    Each unit is read (checked, merged) once whatever the shard count. One shard: its tensors go
    to `torch.save` from the mapped unit files where they need no conversion. Several: each
    unit's pieces are spilled to one scratch file per shard, which is then mapped and saved as
    that shard (scratch space on the output's disk: the model's size, freed shard by shard), so
    memory holds one unit and the disk is read once, not once per shard. Keys are written in
    `key_order` (the order of the imported files) when given, else in the model's own order:
    tok_embeddings, layers…, norm, output, rope.freqs.
    """
    names = unit_names(args)
    rank = {k: i for i, k in enumerate(key_order or [])}
    out.mkdir(parents=True, exist_ok=True)

    def save(i: int, sd: dict[str, torch.Tensor]) -> None:
        for k, v in (extras or {}).items():
            sd[k] = v.clone()
        keys = sorted(sd, key=lambda k: rank.get(k, len(rank)))  # stable: model order otherwise
        torch.save({k: sd[k] for k in keys}, out / f"consolidated.{i:02d}.pth")

    if n_shards == 1:
        sd = {}
        for unit in names:
            for k, t in units(unit).items():
                full = meta_key(unit, k)
                sd[full] = _shard_piece(t, split_axis(full), 0, 1, dtype, full)
        save(0, sd)
        del sd
    else:
        _write_spilled(out, names, units, n_shards, dtype, save)
    if params is not None:
        (out / "params.json").write_bytes(params)
    else:
        (out / "params.json").write_text(json.dumps(params_json.to_params(args)))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "tokenizer.model")
    write_checklist(out)


def write_checklist(out: Path) -> None:
    """checklist.chk as Meta ships it: `md5sum` lines for the shards and params.json."""
    import hashlib

    lines = []
    for path in sorted(out.glob("consolidated.*.pth")) + [out / "params.json"]:
        h = hashlib.md5()
        with open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        lines.append(f"{h.hexdigest()}  {path.name}\n")
    (out / "checklist.chk").write_text("".join(lines))


def _check_meta_expressible(store: BlockStore) -> None:
    """Meta's Llama-2 layout has no biases, q/k norms, head size, RoPE scaling or tied head:
    a store that has any of them is refused by name rather than written as another model."""
    a = store.args
    found = [name for name, on in (("q/k/v biases", a.qkv_bias or a.o_bias), ("MLP biases", a.mlp_bias),
                                   ("q/k norms", a.qk_norm), ("an explicit head_dim", a.explicit_head_dim),
                                   ("RoPE scaling other than Meta's use_scaled_rope",
                                    a.rope_scaling and "use_scaled_rope" not in params_json.to_params(a)),
                                   ("tied embeddings", a.tie_embeddings),
                                   ("a sliding window", a.sliding_window)) if on]
    if a.hidden_dim != ModelArgs(**{**a.to_dict(), "ffn_dim": None}).hidden_dim:
        found.append(f"an FFN width ({a.hidden_dim}) that Meta's multiple_of rule does not give")
    if found:
        raise ConfigError(f"{store.path}: a {a.family} model with {', '.join(found)}: Meta's Llama-2 "
                          "layout cannot hold it; export with --format hf")
    if store.manifest.get("tokenizer_kind", "sentencepiece") == "hf":
        raise ConfigError(f"{store.path}: its tokenizer is a tokenizer.json, which Meta's layout has no "
                          "place for; export with --format hf")


def export_meta(store: BlockStore, out: str | Path, n_shards: int | None = None,
                adapter=None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Store (optionally with merged LoRA adapters) -> Meta folder, written all or nothing."""
    from .merge import merged_unit

    _check_meta_expressible(store)
    source = store.manifest.get("source", {})
    n = n_shards or source.get("shards", 1)
    extras = {}
    if (store.path / "extras.safetensors").is_file():
        store.check_small_file("extras.safetensors")
        from safetensors.torch import load_file

        extras = load_file(str(store.path / "extras.safetensors"))
    params = None
    if (store.path / PARAMS_COPY).is_file():
        store.check_small_file(PARAMS_COPY)
        params = (store.path / PARAMS_COPY).read_bytes()
    with staging_dir(Path(out)) as tmp:
        write_meta(tmp, store.args, lambda u: merged_unit(store, u, adapter), n, dtype,
                   extras, store.tokenizer_path, source.get("key_order"), params)
    return Path(out)
