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
