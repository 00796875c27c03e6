"""GGUF export, read back by the `gguf` package (llama.cpp's own reader) and, where
llama-cpp-python is installed (it builds llama.cpp from source: `nox -s gguf`), run by llama.cpp:
its logits and its tokens against blocktune's."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from blocktune.engine.engine import Engine, EngineConfig
from blocktune.formats.tokenizer import load_tokenizer
from blocktune_bench.corpus import corpus_text
from blocktune_bench.families import make_checkpoint
from blocktune_export.hf import import_hf

gguf = pytest.importorskip("gguf")

FAMILIES = ["llama3", "mistral", "qwen3"]


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp(request.param)
    make_checkpoint(root / "hf", request.param)
    store = import_hf(root / "hf", root / "store")
    r = subprocess.run([sys.executable, "-m", "blocktune", "export", str(store.path), str(root / "gguf"),
                        "--format", "gguf", "--dtype", "fp32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # the shipped sentencepiece model normalizes (nmt_nfkc), Meta's does not, nor does llama.cpp: said
    assert ("normalizes text" in r.stderr) == (store.manifest.get("tokenizer_kind") == "sentencepiece")
    return request.param, store, root / "gguf" / "model.gguf"


def test_gguf_reads_back(exported):
    family, store, path = exported
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == {"llama3": "llama", "mistral": "llama"}.get(family, family)
    names = {t.name for t in reader.tensors}
    a = store.args
    assert "token_embd.weight" in names and ("output.weight" in names) == (not a.tie_embeddings)
    assert all(f"blk.{i}.attn_q.weight" in names for i in range(a.n_layers))
    assert ("rope_freqs.weight" in names) == (family == "llama3")
    assert ("blk.0.attn_q_norm.weight" in names) == (family == "qwen3")
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    want = store.read_unit("embed")["tok_embeddings.weight"].numpy()
    assert np.array_equal(np.asarray(emb.data).reshape(want.shape), want)


def test_llama_cpp_computes_blocktunes_logits(exported):
    llama_cpp = pytest.importorskip("llama_cpp")
    family, store, path = exported
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    tok = load_tokenizer(store)
    text = corpus_text(4000)[:1000]
    if tok.kind == "sentencepiece":  # see the warning above: one line, single spaces
        text = " ".join(text.split())
    ours = tok.encode(text)
    assert llm.tokenize(text.encode(), add_bos=True, special=False) == ours
    ids = ours[:120]  # past original_max_position_embeddings (64) of the llama3 scaling
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    eng = Engine(store, EngineConfig(device="cpu", compute_dtype="fp32", read_only=True))
    mine = eng.logits(torch.tensor([ids]))[0].numpy()
    eng.close()
    err = np.abs(theirs - mine).max() / np.abs(mine).max()
    print(f"{family}: llama.cpp vs blocktune, max |diff| / max |logit| = {err:.2e}")
    assert err < 1e-3


def _random_adapter(store, tmp_path):
    """A LoRA adapter on every linear of every layer, A and B both non-zero (a trained adapter's
    shape), saved in blocktune's file."""
    from blocktune.formats.adapters import save_adapter
    from blocktune.model.args import LoraConfig

    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    eng = Engine(store, EngineConfig(device="cpu", compute_dtype="fp32", method="lora", lora=lora))
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in eng.adapter_state().items()}
    eng.close()
    return save_adapter(tmp_path / "adapter.safetensors", tensors, lora, store.args), tensors, lora


def _export_lora(store, adapter_file, out):
    r = subprocess.run([sys.executable, "-m", "blocktune", "export", str(store.path), str(out), "--format",
                        "gguf-lora", "--adapter", str(adapter_file), "--dtype", "fp32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out / "adapter.gguf"


def test_gguf_lora_reads_back_as_llama_cpp_expects(exported, tmp_path):
    """llama.cpp's adapter layout (convert_lora_to_gguf.py): its keys, `<base tensor>.lora_a`
    (rank x in) and `.lora_b` (out x rank) named after a tensor the base file has."""
    family, store, path = exported
    adapter_file, tensors, lora = _random_adapter(store, tmp_path)
    reader = gguf.GGUFReader(str(_export_lora(store, adapter_file, tmp_path / "lora")))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == lora.alpha
    base = {t.name: [int(d) for d in t.shape] for t in gguf.GGUFReader(str(path)).tensors}
    got = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    assert len(got) == len(tensors)
    for name, shape in got.items():
        weight, part = name.rsplit(".", 1)
        out_in = base[weight]  # GGUF lists dimensions fastest first: [in, out]
        assert shape == ([out_in[0], lora.rank] if part == "lora_a" else [lora.rank, out_in[1]]), name


def test_llama_cpp_applies_the_gguf_lora(exported, tmp_path):
    """llama.cpp with the base GGUF and `--lora adapter.gguf` computes blocktune's logits with the
    adapter (and they differ from the base's)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    family, store, path = exported
    adapter_file, tensors, _ = _random_adapter(store, tmp_path)
    lora_path = _export_lora(store, adapter_file, tmp_path / "lora")
    llm = llama_cpp.Llama(model_path=str(path), lora_path=str(lora_path), n_ctx=128, logits_all=True,
                          verbose=False, n_threads=2)
    ids = load_tokenizer(store).encode(" ".join(corpus_text(2000).split())[:400])[:64]
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    from blocktune.model.args import LoraConfig

    eng = Engine(store, EngineConfig(device="cpu", compute_dtype="fp32", read_only=True, method="lora",
                                     lora=LoraConfig(rank=4, alpha=8.0, dropout=0.0,
                                                     targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))))
    base = eng.logits(torch.tensor([ids]))[0].numpy()
    eng.load_adapters(tensors)
    mine = eng.logits(torch.tensor([ids]))[0].numpy()
    eng.close()
    err = np.abs(theirs - mine).max() / np.abs(mine).max()
    moved = np.abs(base - mine).max() / np.abs(mine).max()
    print(f"{family}: llama.cpp + LoRA vs blocktune + LoRA {err:.2e} (the adapter moves logits by {moved:.2e})")
    assert err < 1e-3 < moved
