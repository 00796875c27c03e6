"""Hostile and odd inputs (#29), with real files and processes: each ends in a message that names
the file, or just works; none makes blocktune allocate what the file claims before checking it."""

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from blocktune import BlockStore
from blocktune.formats.tokenizer import load_tokenizer
from blocktune.run.data import CHARS_PER_TOKEN, RowEncoder
from blocktune.run.rows import read_rows
from blocktune.store.lock import LOCK_DIR
from conftest import bt, multi_process_root

pytest.importorskip("transformers")
RUN_TOML = ("eval_every = 0\nsample_every = 0\nplot = false\nval_ratio = 0.0\nseq_len = 16\n"
            "batch_size = 2\ngrad_accum = 1\nlr = 3e-3\ndevice = \"cpu\"\nprogress = false\n"
            "tensorboard = false\n")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A Hugging Face folder (qwen3-shaped, its own tokenizer.json) and a tiny-7b store with a
    sentencepiece tokenizer, text.txt and run.toml."""
    from blocktune_bench.families import make_checkpoint

    root = tmp_path_factory.mktemp("hostile")
    make_checkpoint(root / "hf", "qwen3")
    multi_process_root(root, RUN_TOML)
    return root


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


@pytest.mark.parametrize("attack", ["header-length", "offsets-past-the-end", "offsets-against-the-shape"])
def test_a_hostile_safetensors_header_is_named(root, tmp_path, attack):
    """model.safetensors whose header claims 2**62 bytes, a tensor ending 10**15 bytes in, or a
    tensor whose offsets hold fewer bytes than its shape: `prepare` exits 1 naming the file and
    what is wrong, and writes nothing. (Before: a SafetensorError traceback naming no file.)"""
    src = tmp_path / "hf"
    shutil.copytree(root / "hf", src)
    path = src / "model.safetensors"
    header, data = _header(path)
    key = next(k for k in header if k != "__metadata__")
    lo, hi = header[key]["data_offsets"]
    if attack == "header-length":
        path.write_bytes(struct.pack("<Q", 1 << 62) + path.read_bytes()[8:])
    else:
        header[key]["data_offsets"] = [lo, 10**15] if attack == "offsets-past-the-end" else [lo, hi - 4]
        blob = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    r = bt("prepare", src, tmp_path / "st")
    print(r.stderr.strip().splitlines()[-1])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{path}: not a valid safetensors file" in r.stderr
    assert (key in r.stderr) == (attack != "header-length")
    assert not (tmp_path / "st").exists()


def test_a_garbage_tokenizer_json_fails_at_prepare(root, tmp_path):
    """A tokenizer.json that is not one: `prepare` refuses it (exit 2, the file named) instead of
    preparing a store that verifies and fails only at `finetune`."""
    src = tmp_path / "hf"
    shutil.copytree(root / "hf", src)
    (src / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nonsense"}}')
    r = bt("prepare", src, tmp_path / "st")
    print(r.stderr.strip().splitlines()[-1])
    assert r.returncode == 2 and f"{src / 'tokenizer.json'}: not a tokenizers file" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "st").exists() and not list(tmp_path.glob(".st.partial-*"))


def test_line_separators_inside_a_jsonl_string(tmp_path):
    """U+2028, U+2029 and U+0085 are valid unescaped inside a JSON string; the rows read as
    written. (Before: str.splitlines() cut the row there: "Unterminated string".)"""
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "a\u2028b", "response": "c\u0085d"}, {"prompt": "e\u2029f", "response": "g\x1ch"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    got = read_rows(path)
    assert [(r.prompt, r.response) for r in got] == [(r["prompt"], r["response"]) for r in rows]


def test_a_huge_row_is_tokenized_only_as_far_as_seq_len_can_use(root, tmp_path):
    """A valid 20 MB response (the report's was 200 MB: 147 s, 9.6 GB) gives one example of
    seq_len + 1 tokens, counted as cut; only about (seq_len + 1) * CHARS_PER_TOKEN characters
    are tokenized, so the tokens counted as lost are bounded by that. (Before: the whole
    response was tokenized, millions of tokens counted lost, seconds spent.)"""
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"prompt": "Say it.", "response": "word " * 4_000_000}) + "\n")
    store = BlockStore.open(root / "store")
    enc = RowEncoder(load_tokenizer(store), 64)
    t0 = time.perf_counter()
    examples = enc.encode(read_rows(path), str(path), log=print)
    took = time.perf_counter() - t0
    print(f"20 MB row: {took:.2f} s, {enc.cut_tokens} tokens counted lost")
    assert len(examples) == 1 and examples[0].tokens.numel() == 64 and enc.cut_rows == 1
    assert 0 < enc.cut_tokens < 65 * CHARS_PER_TOKEN
    assert took < 10


def test_a_path_with_a_non_utf8_byte(root, tmp_path):
    """A store and a run folder under a name holding byte 0xff: a LoRA step runs (the
    sentencepiece model is read from its bytes). (Before: sentencepiece's TypeError.)"""
    weird = Path(os.fsdecode(bytes(tmp_path) + b"/st\xff"))
    shutil.copytree(root / "store", weird, ignore=shutil.ignore_patterns(LOCK_DIR))
    r = bt("finetune", "--config", root / "run.toml", "--store", weird, "--data", root / "text.txt",
           "--out", Path(os.fsdecode(bytes(tmp_path) + b"/run\xff")), "--method", "lora", "--steps", "1")
    assert r.returncode == 0, r.stderr[-2000:]


def test_an_hf_exports_files_all_get_the_usual_mode(root, tmp_path):
    """model.safetensors as the export's other files: 0666 less the umask (before: 0600, which
    safetensors' writer gives, while config.json got 0644)."""
    r = subprocess.run([sys.executable, "-c", "import os, sys\nos.umask(0o022)\nfrom blocktune.cli import main\n"
                        "sys.exit(main(sys.argv[1:]))", "export", str(root / "store"), str(tmp_path / "out"),
                        "--format", "hf"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    print(modes)
    assert set(modes.values()) == {0o644}


def test_metrics_jsonl_a_link_or_a_damaged_row(root, tmp_path):
    """A link swapped in at metrics.jsonl during a run: the run stops, exit 1, the file named
    (before: a raw ELOOP traceback); a damaged row in the middle of metrics.jsonl: `--resume`
    and `report` say which line they skip (before: dropped silently)."""
    store, out = tmp_path / "s", tmp_path / "run"
    shutil.copytree(root / "store", store, ignore=shutil.ignore_patterns(LOCK_DIR))
    cmd = [sys.executable, "-m", "blocktune", "finetune", "--config", str(root / "run.toml"), "--store", str(store),
           "--data", str(root / "text.txt"), "--out", str(out), "--method", "lora", "--steps", "400"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    (tmp_path / "victim").write_text("")
    os.symlink(tmp_path / "victim", tmp_path / "link")
    os.replace(tmp_path / "link", metrics)
    err = p.communicate(timeout=120)[1]
    print(err.strip().splitlines()[-1])
    assert p.returncode == 1 and "Traceback" not in err and f"{metrics}: a symbolic link" in err, err[-2000:]
    assert (tmp_path / "victim").read_text() == ""

    metrics.unlink()
    r = bt(*cmd[3:-1], "3", "--overwrite")  # the killed run left its budgets.txt there
    assert r.returncode == 0, r.stderr[-2000:]
    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:20] + "#" + lines[1][21:]
    metrics.write_text("\n".join(lines) + "\n")
    r = bt("report", out)
    print(r.stderr.strip())
    assert f"{metrics}: skipped damaged line(s) 2" in r.stderr
    r = bt(*cmd[3:-1], "4", "--resume")
    assert r.returncode == 0 and "skipped damaged line(s) 2" in r.stderr, r.stderr[-2000:]
