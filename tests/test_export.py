"""Invariant 5 and the formats: Meta -> store -> Meta is the identity; HF both ways; LoRA merge."""

import json
import os
import pickle
import shutil

import pytest
import torch
from blocktune import Engine, EngineConfig, LoraConfig, StoreError
from blocktune.formats.adapters import load_adapter, save_adapter
from blocktune.model.args import ConfigError, ModelArgs
from blocktune.model.llama import Transformer
from blocktune_bench.corpus import tokenizer_path
from blocktune_bench.synthetic import SHAPES as PRESETS
from blocktune_bench.synthetic import write_meta_checkpoint
from blocktune_export.hf import export_hf, import_hf
from blocktune_export.meta import export_meta, import_meta
from conftest import random_batch


@pytest.fixture(scope="module", params=["tiny-7b", "tiny-13b", "tiny-70b"])
def meta_dir(request, tmp_path_factory):
    return write_meta_checkpoint(tmp_path_factory.mktemp(request.param) / "meta", request.param, seed=7)


def _shards(folder):
    return sorted(p.name for p in folder.glob("consolidated.*.pth"))


def test_meta_round_trip_is_identity(meta_dir, tmp_path):
    store = import_meta(meta_dir, tmp_path / "store")
    out = export_meta(store, tmp_path / "out")
    assert _shards(out) == _shards(meta_dir)
    assert json.loads((out / "params.json").read_text()) == json.loads((meta_dir / "params.json").read_text())
    assert (out / "tokenizer.model").read_bytes() == (meta_dir / "tokenizer.model").read_bytes()
    for name in _shards(meta_dir):
        a = torch.load(meta_dir / name, weights_only=True)
        b = torch.load(out / name, weights_only=True)
        assert list(a) == list(b)  # same keys, same order
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    print(f"{meta_dir.parent.name}: {len(_shards(meta_dir))} shard(s) bitwise identical")


def independent_meta_model(folder) -> Transformer:
    """A straightforward loader written for this test: concatenate shards along Meta's axes."""
    params = json.loads((folder / "params.json").read_text())
    args = ModelArgs(**params)
    shards = [torch.load(p, weights_only=True) for p in sorted(folder.glob("consolidated.*.pth"))]
    dim1 = ("tok_embeddings", "wo", "w2")
    full = {}
    for k in shards[0]:
        if k == "rope.freqs":
            continue
        if k.endswith("norm.weight"):
            full[k] = shards[0][k]
        else:
            axis = 1 if any(f"{d}.weight" in k for d in dim1) else 0
            full[k] = torch.cat([s[k] for s in shards], dim=axis)
    model = Transformer(args)
    renamed = {("embed." + k if k.startswith("tok_") else "head." + k if k in ("norm.weight", "output.weight") else k): v.float()
               for k, v in full.items()}
    model.load_state_dict(renamed, strict=True)
    return model.eval()


def test_store_logits_equal_independent_loader(meta_dir, tmp_path):
    store = import_meta(meta_dir, tmp_path / "store")
    tok, _ = random_batch(store.args, 2, 12)
    engine = Engine(store, EngineConfig(method="full", device="cpu", compute_dtype="fp32"))
    with torch.no_grad():
        want = independent_meta_model(meta_dir)(tok)
    got = engine.logits(tok)
    print(f"max |Δlogit| = {(got - want).abs().max():.3e}")
    assert torch.equal(got, want)


def test_hf_round_trip_and_logits(meta_dir, tmp_path):
    store = import_meta(meta_dir, tmp_path / "store", dtype=torch.float32)
    hf = export_hf(store, tmp_path / "hf", dtype=torch.float32)
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["intermediate_size"] == store.args.hidden_dim
    back = import_hf(hf, tmp_path / "store2")
    assert back.args.hidden_dim == store.args.hidden_dim
    for unit in store.units:
        a, b = store.read_unit(unit), back.read_unit(unit)
        assert all(torch.equal(a[k], b[k]) for k in a), unit
    # the permutation is right: an HF-layout model computes what the Meta-layout one does
    tok, _ = random_batch(store.args, 1, 10)
    want = Engine(store, EngineConfig(method="full", device="cpu")).logits(tok)
    assert torch.equal(Engine(back, EngineConfig(method="full", device="cpu")).logits(tok), want)
    # and HF's own rotate-half layout (checked with HF's formula, written out here) agrees
    from safetensors.torch import load_file

    hf_t = {}
    for f in hf.glob("*.safetensors"):
        hf_t.update(load_file(str(f)))
    wq_meta = store.read_unit("block_00")["attention.wq.weight"]
    wq_hf = hf_t["model.layers.0.self_attn.q_proj.weight"]
    n, d = store.args.n_heads, store.args.dim
    assert torch.equal(wq_hf, wq_meta.view(n, d // n // 2, 2, d).transpose(1, 2).reshape(d, d))


def test_lora_merge_matches_adapters(tmp_path):
    meta = write_meta_checkpoint(tmp_path / "meta", "tiny-7b", seed=3)
    store = import_meta(meta, tmp_path / "store")
    lora = LoraConfig(rank=4, alpha=8, targets=("wq", "wv", "w1", "w2"))
    engine = Engine(store, EngineConfig(method="lora", lora=lora, device="cpu", seed=1))
    g = torch.Generator().manual_seed(0)
    adapters = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in engine.adapter_state().items()}
    engine.load_adapters(adapters)
    save_adapter(tmp_path / "a.safetensors", adapters, lora, store.args)
    adapter = load_adapter(tmp_path / "a.safetensors", store.args)
    merged = export_meta(store, tmp_path / "merged", adapter=adapter)
    merged_store = import_meta(merged, tmp_path / "merged_store")
    tok, _ = random_batch(store.args, 2, 12)
    want = engine.logits(tok)
    got = Engine(merged_store, EngineConfig(method="full", device="cpu")).logits(tok)
    base = Engine(store, EngineConfig(method="full", device="cpu")).logits(tok)
    err, effect = (got - want).abs().max().item(), (base - want).abs().max().item()
    print(f"merged vs adapters: max |Δlogit| {err:.2e}; the adapters themselves move logits by {effect:.2e}")
    # bf16 export rounds each merged weight to 8 bits of mantissa: a stated tolerance
    assert err < 0.02 * want.abs().max().item()
    assert effect > 20 * err


def test_adapter_for_another_model_is_refused(tmp_path):
    lora = LoraConfig(rank=2)
    args = PRESETS["tiny-7b"]
    save_adapter(tmp_path / "a.safetensors", {"layers.0.attention.wq.lora_a": torch.zeros(2, 64)}, lora, args)
    with pytest.raises(ConfigError, match="different model") as err:  # a wrong --adapter: exit 2
        load_adapter(tmp_path / "a.safetensors", PRESETS["tiny-70b"])
    assert "hidden size: the adapter's 64, the store's" in str(err.value) and "multiple_of" not in str(err.value)
    # a field the adapter's model left unset: the value that model uses (before #28: "none")
    assert "key/value heads: the adapter's 4, the store's 2" in str(err.value), str(err.value)
    assert "head size: the adapter's 16, the store's 8" in str(err.value)


# ---- bad input: a clear error naming the file, and nothing written to DST ----

@pytest.fixture
def two_shards(tmp_path):
    return write_meta_checkpoint(tmp_path / "src", "tiny-13b", seed=1)


def _refused(src, tmp_path, match):
    dst = tmp_path / "dst"
    with pytest.raises((StoreError, ConfigError), match=match) as info:
        import_meta(src, dst)
    print(info.value)
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst")]


def test_missing_shard(two_shards, tmp_path):
    (two_shards / "consolidated.00.pth").unlink()
    _refused(two_shards, tmp_path, r"consolidated\.00\.pth.*missing")


def test_shard_count_does_not_match_shapes(two_shards, tmp_path):
    shutil.copyfile(two_shards / "consolidated.01.pth", two_shards / "consolidated.02.pth")
    _refused(two_shards, tmp_path, "shapes do not match params.json and 3 shard")


def test_unknown_key(two_shards, tmp_path):
    sd = torch.load(two_shards / "consolidated.01.pth", weights_only=True)
    sd["layers.0.attention.bias"] = torch.zeros(3)
    torch.save(sd, two_shards / "consolidated.01.pth")
    _refused(two_shards, tmp_path, r"consolidated\.01\.pth: unknown key 'layers\.0\.attention\.bias'")


def test_wrong_params(two_shards, tmp_path):
    params = json.loads((two_shards / "params.json").read_text())
    (two_shards / "params.json").write_text(json.dumps({**params, "n_layers": 7}))
    _refused(two_shards, tmp_path, "n_layers=7")
    (two_shards / "params.json").write_text("{not json")
    _refused(two_shards, tmp_path, "params.json: not valid JSON")
    (two_shards / "params.json").write_text(json.dumps({**params, "dim": 100}))
    _refused(two_shards, tmp_path, "params.json")


def test_tokenizer_vocab_mismatch(tmp_path):
    args = PRESETS["tiny-7b"].replace(vocab_size=512)
    src = write_meta_checkpoint(tmp_path / "src", args)
    shutil.copyfile(tokenizer_path(), src / "tokenizer.model")
    _refused(src, tmp_path, "tokenizer has 1024 pieces but tok_embeddings has 512 rows")


class Payload:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /tmp/blocktune-pwned",))


def test_pickle_with_code_is_refused(two_shards, tmp_path):
    torch.save({"tok_embeddings.weight": Payload()}, two_shards / "consolidated.01.pth")
    _refused(two_shards, tmp_path, r"consolidated\.01\.pth: refused to load")
    assert not os.path.exists("/tmp/blocktune-pwned")
    with open(two_shards / "consolidated.01.pth", "wb") as f:  # a bare pickle, not torch's zip
        pickle.dump({"tok_embeddings.weight": Payload()}, f)
    _refused(two_shards, tmp_path, r"consolidated\.01\.pth: not a readable torch checkpoint")
    assert not os.path.exists("/tmp/blocktune-pwned")


def test_pickle_that_is_not_a_tensor_dict(two_shards, tmp_path):
    torch.save([torch.zeros(2)], two_shards / "consolidated.00.pth")
    _refused(two_shards, tmp_path, r"consolidated\.00\.pth: expected a dict")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_shard_pieces_are_written_without_copies_and_without_their_neighbours(dtype):
    """A shard's piece of a unit that needs no conversion is the unit's own memory (no copy),
    and torch.save writes only the piece, not the unit around it; a converted or strided
    piece owns exactly its bytes."""
    import io

    from blocktune_export.meta import _shard_piece

    whole = torch.randn(512, 64).to(dtype)
    piece = _shard_piece(whole, 0, 1, 2, dtype, "w")  # rows 256.., contiguous
    assert piece.data_ptr() == whole[256:].data_ptr() and torch.equal(piece, whole[256:])

    def saved(t):
        buf = io.BytesIO()
        torch.save({"t": t}, buf)
        return len(buf.getvalue())

    half = whole.numel() * whole.element_size() // 2
    assert saved(piece) <= saved(whole[256:].clone()) < saved(whole) - half // 2
    for axis, dt in ((1, dtype), (0, torch.float16)):  # strided; converted
        p = _shard_piece(whole, axis, 1, 2, dt, "w")
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
        assert torch.equal(p, whole.chunk(2, axis)[1].to(dt))


def test_meta_export_reads_each_unit_once_whatever_the_shard_count(tmp_path):
    """Exporting 8 shards read (crc-checked, merged) every unit 8 times; now once, and the
    8 shards equal a 1-shard export cut by Meta's rules."""
    src = write_meta_checkpoint(tmp_path / "src", "tiny-70b", seed=2)
    store = import_meta(src, tmp_path / "store", dtype=torch.float32)
    reads = []
    real = store.read_unit

    def counting(name, *a, **kw):
        reads.append(name)
        return real(name, *a, **kw)

    store.read_unit = counting
    out8 = export_meta(store, tmp_path / "out8", n_shards=8, dtype=torch.float32)
    assert sorted(reads) == sorted(store.units)
    one = torch.load(export_meta(store, tmp_path / "out1", n_shards=1, dtype=torch.float32) / "consolidated.00.pth")
    parts = [torch.load(out8 / f"consolidated.{i:02d}.pth") for i in range(8)]
    from blocktune_export.meta import split_axis

    for k, t in one.items():
        axis = split_axis(k) if k != "rope.freqs" else None
        got = parts[0][k] if axis is None else torch.cat([p[k] for p in parts], axis)
        assert torch.equal(got, t), k
    assert not (out8 / ".pieces").exists()
