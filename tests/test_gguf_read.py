"""GGUF in (`blocktune prepare MODEL.gguf STORE`), against code nobody here wrote: transformers'
GGUF loader (its dequantization, its rotary layout, its tokenizer) reads the same files, and
`gguf`'s own quantizer and metadata copier make the quantized and the hostile ones. Each family's
checkpoint is built by transformers (`blocktune_bench.families`); the round trip through
`export --format gguf` at fp32 must give back every tensor of the store it came from."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from blocktune.engine.engine import Engine, EngineConfig
from blocktune.errors import ConfigError
from blocktune.formats.tokenizer import load_tokenizer
from blocktune.model.llama import rope_frequencies
from blocktune.store.store import BlockStore
from blocktune_bench.families import make_checkpoint
from blocktune_export.gguf_read import import_gguf
from blocktune_export.hf import import_hf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

FAMILIES = ["llama3", "mistral", "qwen2", "qwen3"]
MIXED = ("Hello world! In 2024 there were 366 days.\n\tdef f(x):\n        return x ** 2  # code\n"
         "Café ünïcödé, naïve — 日本語 🙂   spaces\n\n")


def _export(store: BlockStore, out, *flags) -> str:
    r = subprocess.run([sys.executable, "-m", "blocktune", "export", str(store.path), str(out), "--format", "gguf",
                        *flags], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return str(out / "model.gguf")


def _requantize(src: str, dst: str, qtype) -> None:
    """The file with its 2-D weights quantized by gguf's own quantizer (metadata copied as is)."""
    from gguf.scripts.gguf_new_metadata import copy_with_new_metadata

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    quantized = {}
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.F32 and data.ndim == 2 and data.shape[-1] % 32 == 0:
            quantized[t.name] = gguf.quants.quantize(data, qtype)
    # copy_with_new_metadata writes the reader's tensors: give it the quantized ones
    tensors = [t._replace(data=quantized[t.name], tensor_type=qtype) if t.name in quantized else t
               for t in reader.tensors]
    reader.tensors = tensors
    copy_with_new_metadata(reader, writer, {}, [])


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"gguf-{request.param}")
    # the qwen2 checkpoint's yarn scaling has no GGUF form here (export refuses it): its biases do
    plain = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}} if request.param == "qwen2" else {}
    make_checkpoint(root / "hf", request.param, **plain)
    store = import_hf(root / "hf", root / "store")
    return request.param, store, _export(store, root / "gguf", "--dtype", "fp32")


def test_round_trip_gives_back_every_tensor(family, tmp_path):
    """store -> export --format gguf (fp32) -> prepare: every tensor equal, the model's fields too
    (but what GGUF has no key for: Mistral's sliding window, its family name)."""
    name, store, path = family
    back = import_gguf(path, tmp_path / "back")
    assert back.units == store.units
    for unit in store.units:
        want, got = store.read_unit(unit), back.read_unit(unit)
        assert set(got) == set(want), unit
        for k in want:
            assert torch.equal(got[k], want[k].float()), f"{unit}.{k}"
    drop = {"family", "sliding_window", "max_seq_len", "multiple_of", "ffn_dim_multiplier", "rope_scaling"}
    a, b = store.args.to_dict(), back.args.to_dict()
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
    assert back.args.hidden_dim == store.args.hidden_dim
    # Llama 3's scaling travels as per-frequency factors: the frequencies are the same
    a, b = store.args, back.args
    want = rope_frequencies(a.head_dim, a.rope_theta, a.rope_scaling)[0]
    assert torch.allclose(rope_frequencies(b.head_dim, b.rope_theta, b.rope_scaling)[0], want, rtol=1e-5)
    assert back.manifest["source"]["format"] == "gguf"


def test_tokenizer_equals_transformers_gguf_tokenizer(family, tmp_path):
    _, _, path = family
    back = import_gguf(path, tmp_path / "back")
    ours = load_tokenizer(back)
    folder, file = path.rsplit("/", 1)
    theirs = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=file)
    assert ours.encode(MIXED, bos=False) == theirs(MIXED, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q5_0"])
def test_quantized_file_computes_transformers_logits(family, qtype, tmp_path):
    """Both read the same quantized file (gguf's own quantizer made it): blocktune's fp32 logits
    equal transformers' GGUF loader's (dequantized to fp32) to 1e-5."""
    name, _, path = family
    if name == "llama3":
        pytest.skip("transformers' GGUF loader ignores rope_freqs (Llama 3's scaling: it computes default "
                    "rope); llama.cpp checks this file in nox -s gguf")
    if name == "qwen3":
        pytest.skip("transformers' GGUF loader takes head_dim as hidden / heads (it reads no key_length), and "
                    "this Qwen3's is not; the round trip above and llama.cpp in nox -s gguf check it")
    if name != "qwen2" and qtype != "Q8_0":
        pytest.skip("one family is enough for the other block types")
    q = tmp_path / "q" / f"model-{qtype}.gguf"
    q.parent.mkdir()
    _requantize(path, str(q), gguf.GGMLQuantizationType[qtype])
    r = subprocess.run([sys.executable, "-m", "blocktune", "prepare", str(q), str(tmp_path / "store")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "quantized" in r.stderr and qtype in r.stderr
    store = BlockStore.open(tmp_path / "store")
    assert store.dtype == torch.float32 and store.manifest["source"]["tensor_types"][qtype] > 0
    _assert_transformers_logits(store, q)


def test_unknown_model_key_is_refused_by_name(family, tmp_path):
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    name, _, path = family
    arch = {"llama3": "llama", "mistral": "llama"}.get(name, name)
    out = tmp_path / "x.gguf"
    reader = gguf.GGUFReader(path)
    copy_with_new_metadata(reader, gguf.GGUFWriter(str(out), arch),
                           {f"{arch}.attention.sliding_window": MetadataDetails(gguf.GGUFValueType.UINT32, 64)}, [])
    with pytest.raises(ConfigError, match=rf"{arch}\.attention\.sliding_window"):
        import_gguf(out, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_unreadable_type_and_architecture_are_named(tmp_path):
    out = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(out), "phi2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = subprocess.run([sys.executable, "-m", "blocktune", "prepare", str(out), str(tmp_path / "s")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "phi2" in r.stderr and "llama" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """llama.cpp's own convert_hf_to_gguf.py (nox -s gguf fetches it) run on a transformers-made
    Mistral checkpoint (llama architecture, sentencepiece vocabulary), at f16 and q8_0. The other
    families' test tokenizers are BPEs the converter does not know (it names pre-tokenizers by a
    hash of their output, and refuses ours); their GGUF reading is checked above and by SmolLM2."""
    from blocktune_bench.realmodel import llama_cpp_converter

    script = llama_cpp_converter()
    if script is None:
        pytest.skip("llama.cpp's converter is not fetched: python -m blocktune_bench.realmodel fetch-converter")
    root = tmp_path_factory.mktemp("converted")
    # widths a multiple of 256, so that llama.cpp's quantizer can make K-quant blocks of them
    make_checkpoint(root / "hf", "mistral", hidden_size=256, intermediate_size=512)
    files = {}
    for kind in ("f16", "q8_0"):
        files[kind] = root / f"model-{kind}.gguf"
        r = subprocess.run([sys.executable, str(script), str(root / "hf"), "--outfile", str(files[kind]),
                            "--outtype", kind], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    return import_hf(root / "hf", root / "store"), files


def test_llama_cpp_converters_f16_file_gives_back_the_checkpoint(converted, tmp_path):
    """Every weight equal to the transformers checkpoint's at f16 (the rotary layout llama.cpp
    wrote for `llama`, undone), and the sentencepiece vocabulary tokenizes as the original (on
    single-spaced text: this test model normalizes whitespace, which a GGUF vocabulary cannot say
    and llama.cpp does not do)."""
    hf_store, files = converted
    back = import_gguf(files["f16"], tmp_path / "s")
    assert back.dtype == torch.float16
    for unit in hf_store.units:
        want, got = hf_store.read_unit(unit), back.read_unit(unit)
        assert set(got) == set(want), unit
        for k in want:
            assert torch.equal(got[k], want[k].to(torch.float16)), f"{unit}.{k}"
    text = "The keeper wrote three lines every evening. Then he lit the lamp, 1887 times."
    assert load_tokenizer(back).encode(text) == load_tokenizer(hf_store).encode(text)


def _assert_transformers_logits(store: BlockStore, path) -> None:
    """The store's fp32 logits equal transformers' GGUF loader's on `path` to 1e-5."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    tok = torch.randint(0, store.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(tok).logits
    eng = Engine(store, EngineConfig(device="cpu", compute_dtype="fp32", read_only=True))
    got = eng.logits(tok)
    eng.close()
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"{path.name}: blocktune vs transformers' GGUF loader {err:.2e}")
    assert err < 1e-5


def test_llama_cpp_converters_q8_0_file_computes_transformers_logits(converted, tmp_path):
    _, files = converted
    _assert_transformers_logits(import_gguf(files["q8_0"], tmp_path / "s", note=lambda m: None), files["q8_0"])


def test_llama_cpp_k_quant_computes_transformers_logits(converted, tmp_path):
    """A K-quant made by llama.cpp's own quantizer (llama_model_quantize, Q4_K_M: Q4_K and Q6_K
    blocks): blocktune's fp32 logits equal transformers' GGUF loader's (its own dequantizer) to
    1e-5. (llama.cpp's own logits differ from both by about 1e-2 here: its CPU kernels quantize the
    activations to 8 bits for K-quant dot products.)"""
    llama_cpp = pytest.importorskip("llama_cpp")
    _, files = converted
    q = tmp_path / "model-q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(str(files["f16"]).encode(), str(q).encode(), params) == 0
    store = import_gguf(q, tmp_path / "s", note=lambda m: None)
    kinds = store.manifest["source"]["tensor_types"]
    assert {"Q4_K", "Q6_K"} <= set(kinds), kinds
    _assert_transformers_logits(store, q)
