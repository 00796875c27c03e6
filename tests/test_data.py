"""The data people bring (alpaca, ShareGPT, a .json array, Parquet, a `datasets` folder), read
as transformers' apply_chat_template reads the same rows; files that are none of these refused;
a model without a chat template refused for chats, with the fix; eval scoring rows as finetune
trains on them; rows cut by --seq-len counted; and runs that say what they did (#28)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from blocktune import BlockStore, DataError, Engine, EngineConfig
from blocktune.errors import ConfigError
from blocktune.formats.chat import CHATML_TEMPLATE, chat_format
from blocktune.formats.tokenizer import load_tokenizer
from blocktune.run.data import eval_examples, load_dataset
from blocktune_bench.corpus import demo_text
from blocktune_bench.families import make_checkpoint
from blocktune_bench.synthetic import write_meta_checkpoint
from blocktune_export.hf import import_hf
from blocktune_export.meta import import_meta
from conftest import bt

transformers = pytest.importorskip("transformers")

CHAT = [{"role": "system", "content": "You are a gardener."},
        {"role": "user", "content": "How do I keep basil alive?"},
        {"role": "assistant", "content": "Water at the roots, not the leaves."},
        {"role": "user", "content": "And tomatoes?"},
        {"role": "assistant", "content": "Sun, steady water and a stake to climb."}]
ALPACA = [{"instruction": "Name a herb that likes sun.", "input": "", "output": "Basil."},
          {"instruction": "Translate to English.", "input": "Bonjour le jardin", "output": "Hello garden."}]
SHAREGPT = [{"conversations": [{"from": "system", "value": "You are a gardener."},
                               {"from": "human", "value": "When do I sow peas?"},
                               {"from": "gpt", "value": "Early spring, as soon as the soil can be worked."}]}]
# the same rows as chat messages, written out by hand (what TRL and torchtune make of them)
ALPACA_AS_CHAT = [[{"role": "user", "content": "Name a herb that likes sun."},
                   {"role": "assistant", "content": "Basil."}],
                  [{"role": "user", "content": "Translate to English.\n\nBonjour le jardin"},
                   {"role": "assistant", "content": "Hello garden."}]]
SHAREGPT_AS_CHAT = [[{"role": "system", "content": "You are a gardener."},
                     {"role": "user", "content": "When do I sow peas?"},
                     {"role": "assistant", "content": "Early spring, as soon as the soil can be worked."}]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (HF folder, store): Qwen2 (ChatML template) and Llama 3 (header template) made by
    transformers, and a Qwen2 'base' whose tokenizer has no chat template (and, as Qwen2.5's
    base models, <|endoftext|> as its EOS)."""
    root = tmp_path_factory.mktemp("data")
    out = {}
    for fam in ("qwen2", "llama3"):
        make_checkpoint(root / fam, fam)
        out[fam] = (root / fam, import_hf(root / fam, root / f"{fam}-store"))
    base = root / "qwen2-base"
    shutil.copytree(root / "qwen2", base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    cfg["eos_token"] = "<|endoftext|>"
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    for name in ("config.json", "generation_config.json"):  # the model's EOS too
        if (base / name).is_file():
            model_cfg = json.loads((base / name).read_text())
            model_cfg["eos_token_id"] = 0  # <|endoftext|>, the tokenizer's first special token
            (base / name).write_text(json.dumps(model_cfg))
    out["qwen2-base"] = (base, import_hf(base, root / "qwen2-base-store"))
    return out


def _write_rows(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        path.write_text(json.dumps(rows, indent=1))
    return path


def _check_against_transformers(ex, theirs, msgs, **kw):
    """The example is apply_chat_template's tokens, the loss on the assistant turns only."""
    want = list(theirs.apply_chat_template(msgs, tokenize=True, return_dict=True, **kw)["input_ids"])
    n = len(want) - 1
    assert ex.tokens[:n].tolist() == want[:-1]
    assert ex.targets[n:].eq(-100).all()  # padding
    trained = [t for t in ex.targets.tolist() if t != -100]
    spoken = theirs.decode(trained)
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert all(a in spoken for a in answers) and "user" not in spoken
    assert len(trained) < n


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_alpaca_sharegpt_and_json_arrays_equal_apply_chat_template(models, family, tmp_path):
    src, store = models[family]
    ours, theirs = load_tokenizer(store), transformers.AutoTokenizer.from_pretrained(src)
    cases = [(_write_rows(tmp_path / "alpaca.json", ALPACA), ALPACA_AS_CHAT),
             (_write_rows(tmp_path / "alpaca.jsonl", ALPACA), ALPACA_AS_CHAT),
             (_write_rows(tmp_path / "sharegpt.jsonl", SHAREGPT), SHAREGPT_AS_CHAT),
             (_write_rows(tmp_path / "sharegpt.json", SHAREGPT), SHAREGPT_AS_CHAT),
             (_write_rows(tmp_path / "chats.json", [{"messages": CHAT}]), [CHAT])]
    for path, chats in cases:
        said = []
        train, _ = load_dataset(path, ours, 200, store.args.max_seq_len, val_ratio=0.0, log=said.append)
        assert len(train) == len(chats), path
        for ex, msgs in zip(train.examples, chats):
            _check_against_transformers(ex, theirs, msgs)
        assert f"{len(chats)} rows" in said[0] and "cut" not in said[0], said


def test_parquet_and_datasets_folder(models, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    src, store = models["qwen2"]
    ours, theirs = load_tokenizer(store), transformers.AutoTokenizer.from_pretrained(src)
    pq.write_table(pa.Table.from_pylist(ALPACA), tmp_path / "alpaca.parquet")
    pq.write_table(pa.Table.from_pylist([{"messages": CHAT}] * 2), tmp_path / "chats.parquet")
    for path, chats in ((tmp_path / "alpaca.parquet", ALPACA_AS_CHAT), (tmp_path / "chats.parquet", [CHAT] * 2)):
        train, _ = load_dataset(path, ours, 200, store.args.max_seq_len, val_ratio=0.0)
        for ex, msgs in zip(train.examples, chats, strict=True):
            _check_against_transformers(ex, theirs, msgs)
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(SHAREGPT * 3).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict(train=datasets.Dataset.from_list(ALPACA),
                         test=datasets.Dataset.from_list(SHAREGPT)).save_to_disk(str(tmp_path / "dict"))
    train, _ = load_dataset(tmp_path / "one", ours, 200, store.args.max_seq_len, val_ratio=0.0)
    assert len(train) == 3
    _check_against_transformers(train.examples[0], theirs, SHAREGPT_AS_CHAT[0])
    train, _ = load_dataset(tmp_path / "dict", ours, 200, store.args.max_seq_len, val_ratio=0.0)
    for ex, msgs in zip(train.examples, ALPACA_AS_CHAT, strict=True):  # the train split
        _check_against_transformers(ex, theirs, msgs)


def test_files_that_are_no_format_are_refused(models, tmp_path):
    """Before #28 each of these trained as raw text (a .csv, a JSON object, alpaca as 324
    windows of JSON syntax); now each is refused, naming the file, the row and the formats."""
    _, store = models["qwen2"]
    tok = load_tokenizer(store)
    (tmp_path / "d.csv").write_text("prompt,response\nhi,hello\n")
    (tmp_path / "obj.json").write_text(json.dumps({"data": ALPACA}))
    _write_rows(tmp_path / "odd.jsonl", [ALPACA[0], {"question": "q", "answer": "a"}])
    _write_rows(tmp_path / "odd.json", [ALPACA[0], ["a", "list"]])
    _write_rows(tmp_path / "turns.jsonl", [{"conversations": [{"from": "bot", "value": "x"}]}])
    (tmp_path / "folder").mkdir()
    for name, said in [("d.csv", r"d\.csv: its extension '\.csv' is not a data format.*alpaca"),
                       ("obj.json", r"obj\.json: a JSON dict with keys \['data'\], not an array of rows"),
                       ("odd.jsonl", r"odd\.jsonl:2: a row with keys \['answer', 'question'\] is none of.*ShareGPT"),
                       ("odd.json", r"odd\.json\[1\]: a row must be a JSON object, got list"),
                       ("turns.jsonl", r"turns\.jsonl:1: turn 0 must be .*'gpt'"),
                       ("folder", r"folder: a folder, but not one `datasets` saved")]:
        with pytest.raises(DataError, match=said):
            load_dataset(tmp_path / name, tok, 32, 256)
    r = bt("finetune", "--store", store.path, "--data", tmp_path / "d.csv", "--out", tmp_path / "run", "--seq-len", "32")
    assert r.returncode == 2 and "d.csv" in r.stderr and "Traceback" not in r.stderr


def test_parquet_without_pyarrow_names_the_extra(models, tmp_path):
    """A process where pyarrow cannot be imported: exit 2, naming the `data` extra."""
    _, store = models["qwen2"]
    shadow = tmp_path / "shadow" / "pyarrow"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no pyarrow in this process')\n")
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "blocktune", "eval", "--store", str(store.path), "--data",
                        str(tmp_path / "x.parquet"), "--seq-len", "32"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "x.parquet" in r.stderr and "blocktune-core[data]" in r.stderr, r.stderr


def test_chats_without_a_template_are_refused_with_the_fix(models, tmp_path):
    """Before #28 an HF tokenizer without chat_template trained chats (and answered generate
    --chat) in Llama 2's [INST] format; transformers refuses the same folder."""
    src, store = models["qwen2-base"]
    tok = load_tokenizer(store)
    theirs = transformers.AutoTokenizer.from_pretrained(src)
    with pytest.raises(ValueError):
        theirs.apply_chat_template(CHAT, tokenize=False)
    chats = _write_rows(tmp_path / "chats.jsonl", [{"messages": CHAT}] * 4)
    r = bt("finetune", "--store", store.path, "--data", chats, "--out", tmp_path / "run", "--steps", "1", "--seq-len", "200")
    assert r.returncode == 2 and "chats.jsonl:1" in r.stderr and "--chat-template" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()  # refused before the first step: no run folder left (#28)
    r = bt("generate", "--store", store.path, "--chat", "--prompt", "Hi")
    assert r.returncode == 2 and "--chat-template" in r.stderr and "chatml" in r.stderr, r.stderr
    # text still trains without a template
    (tmp_path / "t.txt").write_text(demo_text())
    assert len(load_dataset(tmp_path / "t.txt", tok, 32, 256)[0]) > 0
    # the fix, by name or as a jinja file: apply_chat_template's tokens with that template
    (tmp_path / "chatml.jinja").write_text(CHATML_TEMPLATE)
    for option in ("chatml", str(tmp_path / "chatml.jinja")):
        train, _ = load_dataset(chats, tok, 200, 256, val_ratio=0.0, chat_template=option)
        _check_against_transformers(train.examples[0], theirs, CHAT, chat_template=CHATML_TEMPLATE)
        fmt = chat_format(tok, option)
        # generation stops at the turn's end, <|im_end|>, not only at the base model's EOS
        assert tok.token_id("<|im_end|>") in fmt.stop_ids() and tok.token_id("<|im_end|>") not in tok.eos_ids
    r = bt("generate", "--store", store.path, "--chat", "--chat-template", tmp_path / "chatml.jinja",
           "--prompt", "Hi", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    with pytest.raises(ConfigError, match="neither a file nor a format name"):
        chat_format(tok, "chatlm")
    with pytest.raises(ConfigError, match=r"llama3: its tokens \['<\|start_header_id\|>'"):
        chat_format(tok, "llama3")


def test_eval_scores_rows_as_finetune_trains_on_them(models, tmp_path):
    """Before #28, eval --data chats.jsonl scored the raw JSON text; now the assistant tokens of
    each chat, as finetune's loss counts them."""
    _, store = models["qwen2"]
    tok = load_tokenizer(store)
    chats = _write_rows(tmp_path / "chats.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:3]}])
    r = bt("eval", "--store", store.path, "--data", chats, "--seq-len", "96", "--json", "--device", "cpu", check=True)
    got = json.loads(r.stdout)
    train, _ = load_dataset(chats, tok, 96, 256, val_ratio=0.0)
    examples = eval_examples(chats, tok, 96, 256)
    assert [e.targets.tolist() for e in examples] == [e.targets.tolist() for e in train.examples]
    engine = Engine(BlockStore.open(store.path), EngineConfig(device="cpu", read_only=True))
    total = count = 0
    for e in examples:
        loss, n = engine.eval_loss(e.tokens[None], e.targets[None])
        total, count = total + loss * n, count + n
    engine.close()
    print(f"eval over {got['tokens']} assistant tokens: loss {got['loss']:.5f} (by hand {total / count:.5f})")
    assert got["tokens"] == count == sum(int((e.targets != -100).sum()) for e in examples)
    assert abs(got["loss"] - total / count) < 1e-5


def test_rows_cut_by_seq_len_are_counted(models, tmp_path):
    """Rows longer than --seq-len are cut and counted (rows, tokens lost); a row whose prompt
    alone fills it is left out and named, not a reason to stop the run."""
    _, store = models["qwen2"]
    tok = load_tokenizer(store)
    chats = [CHAT, CHAT[1:3], [{"role": "user", "content": "Tell me everything about basil. " * 12},
                               {"role": "assistant", "content": "Later."}]]
    path = _write_rows(tmp_path / "rows.jsonl", [{"messages": c} for c in chats])
    encoded = [chat_format(tok).tokens(c) for c in chats]
    seq = len(encoded[1][0]) + 2  # the short chat fits
    said = []
    train, _ = load_dataset(path, tok, seq, 256, val_ratio=0.0, log=said.append)
    print(f"row lengths {[len(i) for i, _ in encoded]}; at --seq-len {seq}: {said[0]}")
    kept = [(ids, m) for ids, m in encoded if any(m[1:seq + 1])]
    cut = [len(ids) for ids, _ in kept if len(ids) > seq + 1]
    assert len(kept) == 2 and len(cut) == 1 and len(train) == 2
    assert train.cut_rows == 1 and train.cut_tokens == cut[0] - seq - 1
    assert f"1 longer than --seq-len {seq} were cut, losing {train.cut_tokens} tokens" in said[0]
    assert f"1 left out, their prompt alone filling --seq-len {seq} ({path}:3)" in said[0]
    with pytest.raises(DataError, match="no row left; raise --seq-len"):
        load_dataset(path, tok, 8, 256)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Meta-layout Llama 2 store (sentencepiece) and a text."""
    root = tmp_path_factory.mktemp("tiny")
    store = import_meta(write_meta_checkpoint(root / "meta", "tiny-7b", seed=0), root / "store", dtype=torch.float32)
    (root / "text.txt").write_text(demo_text())
    return store.path, root / "text.txt"


def _finetune(store, text, out, *extra):
    return bt("finetune", "--store", store, "--data", text, "--out", out, "--seq-len", "16", "--batch-size", "1",
              "--grad-accum", "1", "--device", "cpu", "--no-progress", "--set", "sample_every=0", *extra)


def test_runs_say_what_they_did(tiny, tmp_path):
    """--adapter against explicit LoRA settings is refused (before: silently replaced); a resume
    with another --steps says the schedule changed."""
    store, text = tiny
    r = _finetune(store, text, tmp_path / "a", "--steps", "2", "--checkpoint-every", "1", "--set", "lora_rank=4")
    assert r.returncode == 0, r.stderr
    adapter = tmp_path / "a" / "adapter.safetensors"
    r = _finetune(store, text, tmp_path / "b", "--steps", "1", "--adapter", adapter,
                  "--set", "lora_rank=32", "--set", 'lora_targets=["wq"]')
    assert r.returncode == 2 and "lora_rank=32" in r.stderr and "lora_targets=['wq']" in r.stderr, r.stderr
    assert not (tmp_path / "b").exists()  # refused before the first step: no run folder left (#28)
    r = _finetune(store, text, tmp_path / "c", "--steps", "1", "--adapter", adapter)
    assert r.returncode == 0 and "rank 4" in r.stderr and "the adapter's own" in r.stderr, r.stderr
    r = _finetune(store, text, tmp_path / "a", "--steps", "3", "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming with steps 2 -> 3" in r.stderr and "schedule" in r.stderr, r.stderr


def test_generate_says_it_stopped_at_the_context(models):
    _, store = models["qwen2"]  # a context of 256 tokens
    tok = load_tokenizer(store)
    words = demo_text().split()
    n = next(i for i in range(len(words)) if len(tok.encode(" ".join(words[:i]), bos=True)) >= 250)
    r = bt("generate", "--store", store.path, "--prompt", " ".join(words[:n]), "--max-new-tokens", "20",
           "--device", "cpu")
    assert r.returncode == 0 and "stopped at the model's context of 256 tokens" in r.stderr, r.stderr[-500:]


def test_tool_turns_where_the_template_has_them(models, tmp_path):
    src, store = models["qwen2"]
    ours, theirs = load_tokenizer(store), transformers.AutoTokenizer.from_pretrained(src)
    chat = [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": "Let me look."},
            {"role": "tool", "content": "Oslo: 4 C, rain"}, {"role": "assistant", "content": "Cold and wet."}]
    path = _write_rows(tmp_path / "tool.jsonl", [{"messages": chat}])
    train, _ = load_dataset(path, ours, 200, 256, val_ratio=0.0)
    _check_against_transformers(train.examples[0], theirs, chat)
    assert "Oslo: 4" not in theirs.decode([t for t in train.examples[0].targets.tolist() if t != -100])
    # a template that drops the tool turn: refused, not trained without it
    (tmp_path / "no-tool.jinja").write_text(CHATML_TEMPLATE.replace("{% for m in messages %}",
                                                                    "{% for m in messages if m['role'] != 'tool' %}"))
    with pytest.raises(DataError, match=r"tool.jsonl:1: a tool turn, and the chat template .* no tool role"):
        load_dataset(path, ours, 200, 256, val_ratio=0.0, chat_template=str(tmp_path / "no-tool.jinja"))
    # Meta's Llama 2 format has none; the row named, as other data errors name theirs (before the fix: no row)
    with pytest.raises(DataError, match=r"tool.jsonl:1: the Llama-2 chat format .* no tool turns"):
        load_dataset(path, ours, 200, 256, val_ratio=0.0, chat_template="llama2")
