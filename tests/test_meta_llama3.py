"""Meta-layout Llama 3 (params.json with use_scaled_rope, a tiktoken tokenizer.model) against
Meta's own reference code, llama-models: its Transformer computes the logits, its Tokenizer the
tokens. The checkpoint is that Transformer's state dict, saved with torch.save."""

import dataclasses
import json
import subprocess

import pytest
import torch
from blocktune.engine.engine import Engine, EngineConfig
from blocktune.formats.tokenizer import load_tokenizer
from blocktune_bench.corpus import corpus_text
from blocktune_bench.families import train_tiktoken_file
from blocktune_export.meta import export_meta, import_meta

pytest.importorskip("fairscale")
llama3_model = pytest.importorskip("llama_models.llama3.model")
from llama_models.llama3.args import ModelArgs as MetaArgs  # noqa: E402
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def meta_llama3(tmp_path_factory):
    import tempfile

    import fairscale.nn.model_parallel.initialize as fs_init
    import torch.distributed as dist

    if not dist.is_initialized():  # llama-models' layers are fairscale's model-parallel ones (1 rank)
        dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)
    src = tmp_path_factory.mktemp("meta-llama3")
    train_tiktoken_file(src / "tokenizer.model")
    n_words = MetaTokenizer(src / "tokenizer.model").n_words
    params = {"dim": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "vocab_size": n_words,
              "multiple_of": 32, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0,
              "use_scaled_rope": True}
    (src / "params.json").write_text(json.dumps(params))
    torch.manual_seed(0)
    model = llama3_model.Transformer(MetaArgs(**params, max_seq_len=256, max_batch_size=2))
    with torch.no_grad():  # its layers are made with init_method=identity: uninitialised
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.05 * torch.randn_like(p))
    torch.save(model.state_dict(), src / "consolidated.00.pth")
    return src, model.eval()


def test_logits_equal_llama_models(meta_llama3, tmp_path):
    src, model = meta_llama3
    store = import_meta(src, tmp_path / "store")
    assert store.args.rope_scaling["rope_type"] == "llama3" and store.manifest["tokenizer_kind"] == "tiktoken"
    tok = torch.randint(0, store.args.vocab_size, (2, 100), generator=torch.Generator().manual_seed(1))
    want = model(tok, 0)
    got = Engine(store, EngineConfig(device="cpu", compute_dtype="fp32", read_only=True)).logits(tok)
    assert (got - want).abs().max().item() < 1e-5
    # the scaling matters here: without it the logits differ
    plain = import_meta(src, tmp_path / "plain")
    plain.args = plain.args.replace(rope_scaling=None)
    off = Engine(plain, EngineConfig(device="cpu", compute_dtype="fp32", read_only=True)).logits(tok)
    assert (off - want).abs().max().item() > 1e-3


def test_tokenizer_equals_llama_models(meta_llama3, tmp_path):
    src, _ = meta_llama3
    store = import_meta(src, tmp_path / "store")
    ours, theirs = load_tokenizer(store), MetaTokenizer(src / "tokenizer.model")
    text = corpus_text(30_000)
    for line in text.splitlines()[:200] + [text, "<|eot_id|> is text here"]:
        assert ours.encode(line, bos=True) == theirs.encode(line, bos=True, eos=False)
    ids = theirs.encode(text, bos=True, eos=True)
    assert ours.decode(ids) == text
    assert ours.bos_id == theirs.bos_id and ours.eos_ids == set(theirs.stop_tokens)


def test_meta_export_gives_back_params_json_and_a_checklist(meta_llama3, tmp_path):
    """params.json byte for byte (llama-models builds ModelArgs from it; an added key breaks
    Meta's Llama-2 code), checklist.chk that md5sum accepts, a folder with ordinary permissions."""
    src, _ = meta_llama3
    store = import_meta(src, tmp_path / "store")
    out = export_meta(store, tmp_path / "out", dtype=torch.float32)
    assert (out / "params.json").read_bytes() == (src / "params.json").read_bytes()
    r = subprocess.run(["md5sum", "-c", "checklist.chk"], cwd=out, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.count(": OK") == 2, r.stdout + r.stderr
    assert (out.stat().st_mode & 0o777) == (0o777 & ~_umask())
    a, b = torch.load(src / "consolidated.00.pth"), torch.load(out / "consolidated.00.pth")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def _umask() -> int:
    import os

    m = os.umask(0)
    os.umask(m)
    return m


@dataclasses.dataclass
class MetaLlama2Args:
    """The fields of Meta's Llama-2 ModelArgs (llama/model.py), written out here: params.json is
    read as ModelArgs(**params), so a key it does not have is a TypeError."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    max_batch_size: int = 32
    max_seq_len: int = 2048


# Meta's model-parallel split, written here independently of blocktune_export: the axis each
# tensor is cut along across consolidated.NN.pth (None: every shard holds all of it)
_META_SPLIT = {"tok_embeddings.weight": 1, "output.weight": 0, "norm.weight": None,
               "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
               "attention.wo.weight": 1, "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0,
               "feed_forward.w2.weight": 1, "attention_norm.weight": None, "ffn_norm.weight": None}


@pytest.mark.parametrize("shards", [1, 2])
def test_llama2_meta_folder_round_trips(tmp_path, shards):
    """The issue's example, a Llama-2 params.json with vocab_size -1 and no rope_theta, over 1
    and 2 model-parallel shards cut by Meta's rules: export gives back params.json byte for byte
    (it wrote rope_theta and vocab_size 2000, which Meta's ModelArgs refuses) and every shard's
    tensors, in order."""
    import shutil

    from blocktune_bench.corpus import tokenizer_path

    src = tmp_path / "llama2"
    src.mkdir()
    raw = b'{"dim": 256, "multiple_of": 256, "n_heads": 8, "n_layers": 2, "norm_eps": 1e-05, "vocab_size": -1}'
    (src / "params.json").write_bytes(raw)
    shutil.copyfile(tokenizer_path(), src / "tokenizer.model")
    g = torch.Generator().manual_seed(0)
    full = {"tok_embeddings.weight": torch.randn(1024, 256, generator=g)}
    for i in range(2):
        for k, shape in (("attention.wq.weight", (256, 256)), ("attention.wk.weight", (256, 256)),
                         ("attention.wv.weight", (256, 256)), ("attention.wo.weight", (256, 256)),
                         ("feed_forward.w1.weight", (768, 256)), ("feed_forward.w2.weight", (256, 768)),
                         ("feed_forward.w3.weight", (768, 256)), ("attention_norm.weight", (256,)),
                         ("ffn_norm.weight", (256,))):
            full[f"layers.{i}.{k}"] = torch.randn(*shape, generator=g)
    full["norm.weight"] = torch.ones(256)
    full["output.weight"] = torch.randn(1024, 256, generator=g)
    parts = [{} for _ in range(shards)]
    for k, t in full.items():
        axis = _META_SPLIT[k.split(".", 2)[2] if k.startswith("layers.") else k]
        for n, piece in enumerate([t] * shards if axis is None else t.chunk(shards, axis)):
            parts[n][k] = piece.clone()
    for n, sd in enumerate(parts):
        torch.save(sd, src / f"consolidated.{n:02d}.pth")
    store = import_meta(src, tmp_path / "store", dtype=torch.float32)
    assert store.args.vocab_size == 1024 and store.args.hidden_dim == 768
    out = export_meta(store, tmp_path / "out", dtype=torch.float32)
    assert (out / "params.json").read_bytes() == raw
    MetaLlama2Args(**json.loads(raw))  # what Meta's code does with it
    assert sorted(p.name for p in out.glob("*.pth")) == sorted(p.name for p in src.glob("*.pth"))
    for n, sd in enumerate(parts):
        back = torch.load(out / f"consolidated.{n:02d}.pth")
        assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_chat_prompt_equals_meta_chat_format(meta_llama3, tmp_path):
    from blocktune.formats.chat import chat_tokens, prompt_tokens
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat

    src, _ = meta_llama3
    ours = load_tokenizer(import_meta(src, tmp_path / "store"))
    meta = ChatFormat(MetaTokenizer(src / "tokenizer.model"))
    chat = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "How do I keep basil alive?"},
            {"role": "assistant", "content": "Water at the roots, not the leaves."},
            {"role": "user", "content": "And tomatoes?"}]
    want = meta.encode_dialog_prompt([RawMessage(role=m["role"], content=m["content"]) for m in chat]).tokens
    assert prompt_tokens(ours, chat) == want
    ids, trained = chat_tokens(ours, chat[:3])
    assert ours.decode([i for i, t in zip(ids, trained) if t]) == "Water at the roots, not the leaves."
    assert ids[trained.index(True):][-1] == ours.special["<|eot_id|>"] and trained[-1]
