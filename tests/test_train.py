"""The user-facing workflow: training, exact resume after kill -9, data, generation, CLI."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from blocktune import BlockStore, DataError, Engine, EngineConfig
from blocktune.formats.tokenizer import Tokenizer
from blocktune.run.config import RunConfig, lr_at
from blocktune.run.data import eval_windows, load_dataset
from blocktune.run.generate import SamplingConfig, generate_tokens
from blocktune.run.trainer import Trainer
from blocktune_bench.corpus import demo_text
from blocktune_bench.reference import ReferenceTrainer
from blocktune_bench.synthetic import write_meta_checkpoint
from blocktune_export.meta import import_meta
from conftest import bt as run_bt

PY = sys.executable


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny Meta checkpoint with the real tokenizer, prepared into an fp32 store, and a text."""
    root = tmp_path_factory.mktemp("train")
    meta = write_meta_checkpoint(root / "meta", "tiny-7b", seed=0)
    store = import_meta(meta, root / "store", dtype=torch.float32)
    text = root / "text.txt"
    text.write_text(demo_text())
    return store.path, text


def _copy_store(src: Path, dst: Path) -> str:
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_finetune_learns_the_text(prepared, tmp_path):
    store, text = prepared
    cfg = RunConfig(store=_copy_store(store, tmp_path / "s"), data=str(text), out=str(tmp_path / "run"),
                    method="full", steps=80, lr=3e-3, warmup_steps=5, batch_size=4, grad_accum=1,
                    seq_len=32, val_ratio=0.15, eval_every=40, sample_every=0, checkpoint_every=40,
                    device="cpu", progress=False)
    trainer = Trainer(cfg, log=lambda s: None)
    val_before = trainer.validate()
    history = trainer.run()
    prompt = "The lighthouse keeper of Saint Brenna"
    continuation = trainer.sample(prompt, max_new=24)
    trainer.close()
    print(f"val loss {val_before:.3f} -> {history[-1]['val_loss']:.3f}; train loss "
          f"{history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}; continuation {continuation!r}")
    assert history[-1]["val_loss"] < val_before - 0.25  # held-out text: a clear drop, not memorised
    assert (prompt + continuation)[:60] in demo_text()
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 81))


def _finetune_cmd(store, text, out, method, steps, extra=()):
    return [PY, "-m", "blocktune", "finetune", "--store", store, "--data", str(text), "--out", str(out),
            "--method", method, "--steps", str(steps), "--seq-len", "16", "--batch-size", "2",
            "--grad-accum", "2", "--lr", "3e-3", "--checkpoint-every", "1", "--device", "cpu",
            "--no-progress", "--config", str(out.parent.parent / f"{method}.toml"), *extra]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_kill_between_checkpoint_and_metrics_leaves_no_gap(prepared, tmp_path, method):
    """The files a kill leaves right after step 3's checkpoint (a full fine-tune: its commit)
    and before its metrics row: resume fills the row from the checkpoint (it left a gap)."""
    store, text = prepared
    (tmp_path / f"{method}.toml").write_text("eval_every = 0\nsample_every = 0\nplot = false\nval_ratio = 0.0\n")
    run = tmp_path / "x" / "run"
    run.parent.mkdir()
    s = _copy_store(store, tmp_path / "s")
    subprocess.run(_finetune_cmd(s, text, run, method, 3), check=True, capture_output=True)
    rows = (run / "metrics.jsonl").read_text().splitlines()
    lost = json.loads(rows[-1])
    (run / "metrics.jsonl").write_text("\n".join(rows[:-1]) + "\n")  # the append that never happened
    r = subprocess.run(_finetune_cmd(s, text, run, method, 5, ["--resume"]), capture_output=True, text=True)
    assert r.returncode == 0 and "step 3's metrics row was lost" in r.stderr, r.stderr[-1500:]
    after = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in after] == [1, 2, 3, 4, 5]
    assert after[2]["recovered"] and after[2]["loss"] == lost["loss"] and after[2]["lr"] == lost["lr"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_after_kill_is_exact(prepared, tmp_path, method):
    store, text = prepared
    (tmp_path / f"{method}.toml").write_text(
        "dropout = 0.1\nlora_dropout = 0.1\nwarmup_steps = 2\neval_every = 0\nsample_every = 0\n"
        "plot = false\nval_ratio = 0.0\n")
    straight = tmp_path / "straight" / "run"
    straight.parent.mkdir()
    s1 = _copy_store(store, tmp_path / "s1")
    subprocess.run(_finetune_cmd(s1, text, straight, method, 6), check=True, capture_output=True)

    broken = tmp_path / "broken" / "run"
    broken.parent.mkdir()
    s2 = _copy_store(store, tmp_path / "s2")
    proc = subprocess.Popen(_finetune_cmd(s2, text, broken, method, 6), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = broken / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    print(f"killed after {done} logged steps")
    assert done < 6, "the run finished before it could be killed; make it longer"
    subprocess.run(_finetune_cmd(s2, text, broken, method, 6, ["--resume"]), check=True, capture_output=True)

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    print("straight", losses(straight))
    print("resumed ", losses(broken))
    assert losses(straight) == losses(broken)
    if method == "lora":
        from safetensors.torch import load_file

        a = load_file(str(straight / "adapter.safetensors"))
        b = load_file(str(broken / "adapter.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:
        x, y = BlockStore.open(s1), BlockStore.open(s2)
        assert x.step == y.step == 6
        for u in x.units:
            assert x.record(u).crc32 == y.record(u).crc32, u


def test_jsonl_masks_the_prompt(prepared, tmp_path):
    store_path, _ = prepared
    from blocktune import BlockStore

    store = BlockStore.open(store_path)
    tok = Tokenizer(store.tokenizer_path)
    rows = [{"prompt": "Who kept the logbook?", "response": " The keeper did."},
            {"prompt": "What was lit?", "response": " The lamp."}]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    train, _ = load_dataset(path, tok, 24, store.args.max_seq_len, val_ratio=0.0)
    ex = train.examples[0]
    n_prompt = len(tok.encode(rows[0]["prompt"], bos=True))
    n_resp = len(tok.encode(rows[0]["response"], bos=False, eos=True))
    assert (ex.targets[: n_prompt - 1] == -100).all()
    assert (ex.targets[n_prompt - 1: n_prompt - 1 + n_resp] != -100).all()
    assert (ex.targets[n_prompt - 1 + n_resp:] == -100).all()
    engine = Engine(store, EngineConfig(method="full", device="cpu", loss_chunk=5))
    loss, count = engine.eval_loss(ex.tokens[None], ex.targets[None])
    logits = engine.logits(ex.tokens[None])[0]
    keep = ex.targets != -100
    by_hand = F.cross_entropy(logits[keep].float(), ex.targets[keep]).item()
    print(f"masked loss {loss:.6f} by hand {by_hand:.6f} over {count} response tokens")
    assert count == n_resp and math.isclose(loss, by_hand, rel_tol=1e-5)


def test_data_errors(prepared, tmp_path):
    from blocktune import BlockStore

    store = BlockStore.open(prepared[0])
    tok = Tokenizer(store.tokenizer_path)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        load_dataset(tmp_path / "empty.txt", tok, 16, 256)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8.*0xe9.*line 1"):
        load_dataset(tmp_path / "latin1.txt", tok, 16, 256)
    with pytest.raises(DataError, match="exceeds the model's context of 256"):
        load_dataset(prepared[1], tok, 1000, 256)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        load_dataset(tmp_path / "bad.jsonl", tok, 16, 256)


def test_generation_cache_equals_no_cache_and_reference(prepared):
    from blocktune import BlockStore

    store = BlockStore.open(prepared[0])
    tok = Tokenizer(store.tokenizer_path)
    prompt = tok.encode("The keeper", bos=True)
    budget = max(store.unit_bytes(u) for u in store.units)
    engine = Engine(store, EngineConfig(method="full", device="cpu", device_budget=budget))
    cfg = SamplingConfig(max_new_tokens=20, temperature=0.0, stop_at_eos=False)
    cached = list(generate_tokens(engine, prompt, cfg, use_cache=True))
    uncached = list(generate_tokens(engine, prompt, cfg, use_cache=False))
    ref = ReferenceTrainer(store, "full")
    seq = list(prompt)
    for _ in range(20):
        seq.append(int(ref.logits(torch.tensor([seq]))[0, -1].argmax()))
    print("cached", cached)
    assert cached == uncached == seq[len(prompt):]
    sampled = list(generate_tokens(engine, prompt, SamplingConfig(20, 0.8, 50, 0.9, seed=3)))
    again = list(generate_tokens(engine, prompt, SamplingConfig(20, 0.8, 50, 0.9, seed=3)))
    assert sampled == again and len(sampled) <= 20


def test_eval_command_definition(prepared, tmp_path):
    store, text = prepared
    out = subprocess.run([PY, "-m", "blocktune", "eval", "--store", str(store), "--data", str(text),
                          "--seq-len", "32", "--json", "--device", "cpu"],
                         check=True, capture_output=True, text=True)
    got = json.loads(out.stdout)
    from blocktune import BlockStore

    st = BlockStore.open(store)
    tok = Tokenizer(st.tokenizer_path)
    ids = tok.encode(text.read_text(), bos=True, eos=False)
    n_windows = len(ids) // 33
    assert got["tokens"] == n_windows * 32
    assert len(eval_windows(tok, text.read_text(), 32)) == n_windows
    # the loss itself, computed here from the definition with the in-memory model: BOS + text,
    # consecutive 33-token windows, mean next-token cross-entropy over every predicted position
    from blocktune_bench.reference import model_from_store

    model = model_from_store(st).eval()
    windows = torch.tensor([ids[i * 33:(i + 1) * 33] for i in range(n_windows)])
    with torch.no_grad():
        logits = model(windows[:, :-1])
    want = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert math.isclose(got["loss"], want, rel_tol=1e-6), (got["loss"], want)
    assert math.isclose(got["ppl"], math.exp(want), rel_tol=1e-6)


def test_lr_schedule():
    cfg = RunConfig(lr=1.0, warmup_steps=4, steps=14, min_lr_ratio=0.1)
    assert [lr_at(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(lr_at(cfg, 13), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert lr_at(cfg, 100) == pytest.approx(0.1)


def test_config_round_trip(tmp_path):
    cfg = RunConfig(store="s", data="d.txt", lr=3e-4, lora_targets=["wq", "w2"], device_budget="2GiB")
    (tmp_path / "c.toml").write_text(cfg.to_toml())
    assert RunConfig.load(tmp_path / "c.toml") == cfg
    assert RunConfig.load(tmp_path / "c.toml", lr=1e-3).lr == 1e-3
    (tmp_path / "bad.toml").write_text("learning_rate = 3\n")
    with pytest.raises(Exception, match="unknown setting.*learning_rate"):
        RunConfig.load(tmp_path / "bad.toml")


@pytest.mark.parametrize("cmd", ["prepare", "finetune", "generate", "eval", "export", "verify", "info", "demo"])
def test_every_subcommand_has_help(cmd):
    out = subprocess.run([PY, "-m", "blocktune", cmd, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: blocktune " + cmd in out.stdout


def test_cli_errors_are_clear(prepared, tmp_path):
    def run(*args):
        return subprocess.run([PY, "-m", "blocktune", *args], capture_output=True, text=True)

    r = run("info", str(tmp_path / "nowhere"))
    assert r.returncode == 1 and "not a blocktune store" in r.stderr and "Traceback" not in r.stderr
    r = run("finetune", "--store", str(prepared[0]), "--data", str(prepared[1]), "--seq-len", "5000",
            "--device", "cpu", "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and "exceeds the model's context" in r.stderr
    r = run("finetune", "--store", str(prepared[0]), "--data", str(prepared[1]), "--device", "tpu")
    assert r.returncode == 2 and "unknown device 'tpu'" in r.stderr
    r = run("generate", "--store", str(prepared[0]))
    assert r.returncode == 2 and "--prompt" in r.stderr
    r = run("info", str(prepared[0]))
    assert r.returncode == 0 and json.loads(r.stdout)["units"] == 6
    r = run("verify", str(prepared[0]))
    assert r.returncode == 0 and "0 problem(s)" in r.stdout


def test_generate_reads_frozen_units_either_way(prepared):
    """`--frozen-reads mapped` and `direct` (with a budget of one unit, so every token pages
    every unit) give the same greedy text; an unknown choice is refused by the parser."""
    store = BlockStore.open(prepared[0])
    one_unit = str(max(store.unit_bytes(u) for u in store.units))

    def run(*args):
        return subprocess.run([PY, "-m", "blocktune", "generate", "--store", str(prepared[0]), "--prompt",
                               "The lighthouse", "--max-new-tokens", "6", "--device", "cpu",
                               "--device-budget", one_unit, *args], capture_output=True, text=True)

    texts = {mode: run("--frozen-reads", mode) for mode in ("mapped", "direct")}
    assert all(r.returncode == 0 for r in texts.values()), [r.stderr[-300:] for r in texts.values()]
    assert texts["mapped"].stdout == texts["direct"].stdout and texts["mapped"].stdout.startswith("The lighthouse")
    bad = run("--frozen-reads", "fast")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_a_finished_run_is_not_overwritten(prepared, tmp_path):
    """`finetune` into the folder of an earlier run stops before it changes it (the record would
    be lost); --overwrite starts afresh, --resume continues."""
    store, text = prepared
    out = tmp_path / "run"
    cmd = [PY, "-m", "blocktune", "finetune", "--store", str(store), "--data", str(text), "--steps", "2",
           "--batch-size", "1", "--grad-accum", "1", "--seq-len", "16", "--out", str(out), "--no-progress"]
    subprocess.run(cmd, check=True, capture_output=True)
    before = (out / "metrics.jsonl").read_bytes()
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr and "--overwrite" in again.stderr
    assert (out / "metrics.jsonl").read_bytes() == before
    subprocess.run(cmd + ["--overwrite"], check=True, capture_output=True)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_full_finetune_keeps_the_base_model(prepared, tmp_path):
    """By default a full fine-tune leaves the base model's files as they were (readable with
    --base); --in-place lets the run replace them."""
    import shutil

    store = tmp_path / "store"
    shutil.copytree(prepared[0], store, ignore=shutil.ignore_patterns(".lock"))
    data = prepared[1]
    before = BlockStore.open(store)
    want = {u: before.read_unit(u) for u in before.units}
    before.close()

    def bt(*args):
        return run_bt(*args, check=True)

    def loss(*extra):
        return json.loads(bt("eval", "--store", store, "--data", data, "--seq-len", "32", "--json", *extra).stdout)["loss"]

    base_loss = loss()
    bt("finetune", "--store", store, "--data", data, "--method", "full", "--steps", "3", "--seq-len", "32",
       "--out", tmp_path / "run", "--lr", "1e-3")
    assert loss() < base_loss and loss("--base") == base_loss
    kept = BlockStore.open_base(store)
    assert kept.step == 0 and all(torch.equal(kept.read_unit(u)[k], want[u][k]) for u in want for k in want[u])
    kept.close()
    assert BlockStore.open(store).verify() == []
    bt("export", store, tmp_path / "base-out", "--base", "--dtype", "fp32")
    # a second run continues from the tuned weights (on purpose: tests/test_runs.py); the base stays the first run's
    bt("finetune", "--store", store, "--data", data, "--method", "full", "--steps", "1", "--seq-len", "32",
       "--out", tmp_path / "run2", "--start-from", "tuned")
    assert loss("--base") == base_loss
    # --in-place: the base goes, its files with it
    bt("finetune", "--store", store, "--data", data, "--method", "full", "--steps", "1", "--seq-len", "32",
       "--out", tmp_path / "run3", "--in-place", "--start-from", "tuned")
    r = subprocess.run([sys.executable, "-m", "blocktune", "eval", "--store", str(store), "--data", str(data),
                        "--seq-len", "32", "--base"], capture_output=True, text=True)
    assert r.returncode == 1 and "no base model is kept" in r.stderr
    m = BlockStore.open(store).manifest
    files = {p.name for p in store.glob("*.safetensors")} - set(m.get("extra_files", []))
    assert "base" not in m and files == {r["file"] for r in m["units"].values()} | {
        r["file"] for r in m["state"].values()}


def test_full_finetune_refuses_a_disk_without_room(prepared, tmp_path):
    """On a real small file system (a tmpfs the size of the store and a bit): refused before
    anything is written, with the numbers and the way out."""
    import shutil

    mnt = tmp_path / "small"
    mnt.mkdir()
    size = sum(p.stat().st_size for p in Path(prepared[0]).iterdir() if p.is_file())
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size + (256 << 10)}", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode:
        pytest.skip("no right to mount a tmpfs here")
    try:
        shutil.copytree(prepared[0], mnt / "store", ignore=shutil.ignore_patterns(".lock"))
        data = prepared[1]
        listing = sorted(p.name for p in (mnt / "store").iterdir())
        r = subprocess.run([sys.executable, "-m", "blocktune", "finetune", "--store", str(mnt / "store"), "--data",
                            str(data), "--method", "full", "--steps", "1", "--seq-len", "32", "--out",
                            str(tmp_path / "run")], capture_output=True, text=True)
        assert r.returncode == 2 and "MiB free on its disk" in r.stderr and "--in-place" in r.stderr, r.stderr[-1500:]
        assert sorted(p.name for p in (mnt / "store").iterdir() if p.name != ".lock") == [
            n for n in listing if n != ".lock"]
    finally:
        subprocess.run(["umount", str(mnt)])
