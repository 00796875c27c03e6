"""The names and habits users bring from peft, TRL and torchtune (#28): LoRA targets by Hugging
Face's names and "all-linear", --epochs, a run folder per run, an adapter per checkpoint, and
the messages and exits of a Unix tool. Each test runs the command as a user does."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from blocktune_bench.corpus import demo_text
from conftest import bt, prepared_root
from safetensors.torch import load_file

SEVEN = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny Meta checkpoint with its tokenizer prepared into an fp32 store, a text, a config."""
    return prepared_root(tmp_path_factory.mktemp("habits"))


def lora(prepared, *extra, steps: int | None = 2, cwd=None, env=None) -> subprocess.CompletedProcess:
    """A tiny LoRA `blocktune finetune` on the prepared store (run in `cwd`, with `env` added to
    the environment)."""
    cmd = [sys.executable, "-m", "blocktune", "finetune", "--store", str(prepared / "store"), "--data",
           str(prepared / "text.txt"), "--config", str(prepared / "run.toml"), "--seq-len", "16",
           "--batch-size", "2", "--grad-accum", "1", "--lr", "3e-3", "--device", "cpu", *map(str, extra)]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env and {**os.environ, **env})


def test_lora_targets_by_hugging_face_names_and_all_linear(prepared, tmp_path):
    """q_proj/v_proj train the very tensors wq/wv do (the same adapter, bit for bit, and the
    same config.toml); all-linear is all seven; an unknown name is exit 2 with the valid ones."""
    meta = lora(prepared, "--out", tmp_path / "meta", "--set", 'lora_targets=["wq","wv"]')
    hf = lora(prepared, "--out", tmp_path / "hf", "--set", 'lora_targets=["q_proj","v_proj"]')
    assert meta.returncode == 0 and hf.returncode == 0, hf.stderr[-2000:]
    a, b = load_file(tmp_path / "meta" / "adapter.safetensors"), load_file(tmp_path / "hf" / "adapter.safetensors")
    assert sorted(a) == sorted(b) and {k.split(".")[3] for k in a} == {"wq", "wv"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert tomllib.loads((tmp_path / "hf" / "config.toml").read_text())["lora_targets"] == ["wq", "wv"]

    r = bt("finetune", "--store", "s", "--data", "d", "--set", "lora_targets=all-linear", "--print-config")
    assert r.returncode == 0 and tomllib.loads(r.stdout)["lora_targets"] == SEVEN, r.stderr
    r = bt("finetune", "--store", "s", "--data", "d", "--set", 'lora_targets=["gate_proj","wq","q_proj"]',
           "--print-config")
    assert tomllib.loads(r.stdout)["lora_targets"] == ["w1", "wq"]
    r = bt("finetune", "--store", "s", "--data", "d", "--set", 'lora_targets=["qproj"]', "--print-config")
    assert r.returncode == 2 and "['qproj']" in r.stderr and "q_proj" in r.stderr and "'wq'" in r.stderr
    assert "all-linear" in r.stderr and "Traceback" not in r.stderr


def test_epochs_instead_of_steps(prepared, tmp_path):
    """--epochs N: the steps follow from the training examples over batch_size x grad_accum x
    ranks, the log says how many, config.toml records them; steps beside epochs is refused."""
    data = tmp_path / "short.txt"
    data.write_text(demo_text()[:1500])
    r = lora(prepared, "--out", tmp_path / "run", "--data", data, "--set", "epochs=2", steps=None)
    assert r.returncode == 0, r.stderr[-2000:]
    examples = int(r.stderr.split(" training sequences")[0].rsplit("; ", 1)[1])
    steps = -(-2 * examples // 2)  # batch 2, grad_accum 1, one rank
    assert f"epochs 2: {steps} steps ({examples} training examples, 2 per step" in r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["step"] == steps
    recorded = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert (recorded["steps"], recorded["epochs"]) == (steps, 2)  # what was asked too (before #28: epochs = 0.0)
    r = bt("finetune", "--out", tmp_path / "run", "--resume")  # config.toml's settings: the same run
    assert r.returncode == 0 and f"resuming at step {steps} of {steps}" in r.stderr, r.stderr[-2000:]
    assert "note: resuming" not in r.stderr
    r = bt("finetune", "--store", "s", "--data", "d", "--steps", "0", "--print-config")
    assert r.returncode == 2 and "--steps: steps=0 must be positive" in r.stderr, r.stderr  # the flag named

    r = bt("finetune", "--store", "s", "--data", "d", "--set", "epochs=1", "--steps", "5", "--print-config")
    assert r.returncode == 2 and "both steps=5 and epochs=1" in r.stderr
    (tmp_path / "e.toml").write_text("epochs = 3\n")  # the command line's steps win over a file's epochs
    r = bt("finetune", "--store", "s", "--data", "d", "--config", tmp_path / "e.toml", "--steps", "5", "--print-config")
    assert r.returncode == 0 and (tomllib.loads(r.stdout)["steps"], tomllib.loads(r.stdout)["epochs"]) == (5, 0)
    (tmp_path / "e.toml").write_text("epochs = 3\nsteps = 7\n")
    r = bt("finetune", "--store", "s", "--data", "d", "--config", tmp_path / "e.toml", "--print-config")
    assert r.returncode == 2 and "e.toml gives both steps=7 and epochs=3" in r.stderr


def test_a_new_run_folder_per_run_and_resume_finds_the_newest(prepared, tmp_path):
    """Without --out every run gets its own runs/<date-time> (printed): a second run starts
    instead of refusing; --resume without --out continues the newest and says which, or, with
    no run there, refuses and creates nothing. An explicit --out is as before."""
    first = lora(prepared, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    second = lora(prepared, "--checkpoint-every", "1", steps=1, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all(f"run folder: {Path('runs', f)}" in r.stderr for f, r in zip(folders, (first, second)))
    assert json.loads(second.stdout.splitlines()[-1])["out"] == str(Path("runs", folders[1]))
    resumed = lora(prepared, "--resume", steps=3, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming the newest run under runs/: {Path('runs', folders[1])}" in resumed.stderr
    assert "resuming at step 1 of 3" in resumed.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    r = lora(prepared, "--resume", cwd=empty)
    assert r.returncode == 2 and "--resume without --out: no run folder under" in r.stderr
    r = lora(prepared, "--resume", "--out", "new", cwd=empty)  # a LoRA resume where no run is: nothing left
    assert r.returncode == 2 and "new holds no LoRA checkpoint" in r.stderr and "without --resume" in r.stderr
    assert list(empty.iterdir()) == []
    (empty / "afile").write_text("x")
    r = lora(prepared, "--out", "afile", cwd=empty)
    assert r.returncode == 2 and "--out afile: a file, not a folder" in r.stderr and "Traceback" not in r.stderr


def test_every_checkpoint_keeps_its_adapter_and_the_best_is_marked(prepared, tmp_path):
    """A LoRA run keeps adapter-step-N.safetensors at each checkpoint (and at each validation),
    the newest keep_adapters of them and the best validated one, named adapter-best.safetensors
    too; adapters.json and `report` say which."""
    out = tmp_path / "run"
    r = lora(prepared, "--out", out, "--checkpoint-every", "3", "--set", "val_ratio=0.3", "--set", "eval_every=2",
             "--set", "keep_adapters=1", steps=6)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validated = {row["step"]: row["val_loss"] for row in rows if row.get("val_loss") is not None}
    assert sorted(validated) == [2, 4, 6]
    best = min(validated, key=validated.get)
    kept = sorted(int(p.name[len("adapter-step-"):-len(".safetensors")]) for p in out.glob("adapter-step-*"))
    assert kept == sorted({6, best}), kept  # step 3's (a checkpoint, not validated) went with the bound
    final, last = load_file(out / "adapter.safetensors"), load_file(out / "adapter-step-6.safetensors")
    assert all(torch.equal(final[k], last[k]) for k in final)
    marked = load_file(out / "adapter-best.safetensors")
    assert all(torch.equal(marked[k], load_file(out / f"adapter-step-{best}.safetensors")[k]) for k in marked)
    index = json.loads((out / "adapters.json").read_text())
    assert index["best"]["step"] == best and index["best"]["val_loss"] == validated[best]

    report = bt("report", out, "--json", "--no-plot", check=True)
    assert json.loads(report.stdout)["adapters"] == {"steps": sorted({6, best}), "best_step": best,
                                                     "best": str(out / "adapter-best.safetensors")}
    assert f"best validation: {out / 'adapter-best.safetensors'} (step {best})" in bt("report", out, "--no-plot").stdout


def test_wrong_paths_and_files_are_exit_2_with_the_fix(prepared, tmp_path):
    """prepare into a file; a folder with neither layout's config (both named); an adapter of
    another model (its shape in words, not the field multiple_of); a chat row with no assistant
    turn (said so)."""
    from blocktune.formats.adapters import save_adapter
    from blocktune.model.args import LoraConfig
    from blocktune_bench.synthetic import SHAPES

    (tmp_path / "afile").write_text("x")
    r = bt("prepare", prepared / "meta", tmp_path / "afile")
    assert r.returncode == 2 and f"{tmp_path / 'afile'} is a file; a store is a folder" in r.stderr, r.stderr
    assert (tmp_path / "afile").read_text() == "x" and "Traceback" not in r.stderr
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"")
    r = bt("prepare", hf, tmp_path / "store")
    assert r.returncode == 2 and "neither config.json (a Hugging Face folder" in r.stderr and "params.json (Meta" in r.stderr
    assert "beside model.safetensors" in r.stderr and not (tmp_path / "store").exists()

    other = tmp_path / "other.safetensors"
    save_adapter(other, {"layers.0.attention.wq.lora_a": torch.zeros(2, 128)}, LoraConfig(rank=2), SHAPES["tiny-70b"])
    r = bt("generate", "--store", prepared / "store", "--adapter", other, "--prompt", "Hi", "--device", "cpu")
    assert r.returncode == 2 and "trained for a different model" in r.stderr
    assert "hidden size: the adapter's 128, the store's 64" in r.stderr and "multiple_of" not in r.stderr

    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    r = lora(prepared, "--out", tmp_path / "run", "--data", chats)
    assert r.returncode == 2 and "has no assistant turn" in r.stderr and "fills" not in r.stderr


def _closed_reader(*args) -> subprocess.CompletedProcess:
    """`blocktune ARGS | head` where head has gone before the command writes: its stdout is a
    pipe whose reading end is closed."""
    proc = subprocess.Popen([sys.executable, "-m", "blocktune", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    return subprocess.CompletedProcess(args, proc.wait(), "", err)


def test_a_closed_pipe_ends_quietly_and_help_version_and_info_need_no_torch(prepared, tmp_path):
    """`info | head` and `report --json | head` end as Unix tools do (no traceback, 128 + SIGPIPE);
    --version; --help builds every command's parser, and `info` reads a store, without importing
    torch (its seconds of import)."""
    for args in (("info", prepared / "store"), ("report", prepared / "nothing")):
        r = _closed_reader(*args)
        if args[0] == "report":  # no run there: the error goes to stderr, which is open
            assert r.returncode == 2 and "no metrics.jsonl" in r.stderr
            continue
        assert r.returncode == 141 and r.stderr == "", r.stderr
    run = tmp_path / "run"
    assert lora(prepared, "--out", run, steps=1).returncode == 0
    r = _closed_reader("report", run, "--json", "--no-plot")
    assert r.returncode == 141 and r.stderr == "", r.stderr

    r = bt("--version", check=True)
    assert r.stdout.strip() == "blocktune 0.1.0"
    probe = ("import sys; from blocktune.cli import build_parser, main; build_parser(); parsers = 'torch' in sys.modules\n"
             "code = main(['info', sys.argv[1]]); print(code, parsers, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", probe, prepared / "store"], capture_output=True, text=True)
    assert r.stdout.splitlines()[-1] == "0 False False", r.stdout[-500:] + r.stderr[-2000:]  # parsers, info


def test_nproc_names_one_run_folder_and_prints_one_result(prepared, tmp_path):
    """--nproc 2 without --out: both ranks write the one new run folder, and the result line is
    printed once (rank 0's), not once per rank. Nothing is left in the temp folder (torchrun's own
    log folder, a torchelastic_* there, was left by every run)."""
    temp = tmp_path / "temp"
    temp.mkdir()
    r = lora(prepared, "--nproc", "2", "--batch-size", "1", cwd=tmp_path, env={"TMPDIR": str(temp)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert not list(temp.iterdir())
    assert len(list((tmp_path / "runs").iterdir())) == 1
    results = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1 and json.loads(results[0])["step"] == 2, r.stdout


def test_export_gguf_without_gguf_names_the_extra(prepared, tmp_path):
    """Without the gguf package (as after a plain install), `export --format gguf` and `gguf-lora`
    say which extra brings it, exit 2, and write nothing."""
    assert lora(prepared, "--out", tmp_path / "run", steps=1).returncode == 0
    code = ("import sys; sys.modules['gguf'] = None  # import gguf fails as where it is not installed\n"
            "from blocktune.cli import main; sys.exit(main(sys.argv[1:]))")
    for fmt in ("gguf", "gguf-lora"):
        extra = ["--adapter", tmp_path / "run" / "adapter.safetensors"] if fmt == "gguf-lora" else []
        r = subprocess.run([sys.executable, "-c", code, "export", str(prepared / "store"), str(tmp_path / fmt),
                            "--format", fmt, *map(str, extra)], capture_output=True, text=True)
        assert r.returncode == 2 and "pip install 'blocktune-export[gguf]'" in r.stderr, r.stderr[-2000:]
        assert f"export --format {fmt} needs the gguf package" in r.stderr and not (tmp_path / fmt).exists()


def test_files_where_folders_or_gguf_go_are_exit_2(prepared, tmp_path):
    """export into a file, for every format (before the fix: NotADirectoryError's traceback, exit
    1), refused as prepare refuses it; prepare of an empty or non-GGUF .gguf says so (before: "no
    such folder") and leaves nothing."""
    from blocktune_export.exports import EXPORTS

    afile = tmp_path / "afile"
    afile.write_text("x")
    for fmt in EXPORTS:
        r = bt("export", prepared / "store", afile, "--format", fmt)
        assert r.returncode == 2 and f"{afile} is a file; an export ({fmt}) is a folder" in r.stderr, (fmt, r.stderr)
        assert afile.read_text() == "x" and "Traceback" not in r.stderr
    (tmp_path / "empty.gguf").touch()
    (tmp_path / "text.gguf").write_text("not a model")
    for name, said in (("empty.gguf", "it is empty"), ("text.gguf", "it starts with b'not ', not GGUF's magic b'GGUF'")):
        r = bt("prepare", tmp_path / name, tmp_path / "st")
        assert r.returncode == 2 and f"{tmp_path / name} is not a GGUF file ({said})" in r.stderr, r.stderr
        assert "no such folder" not in r.stderr and not (tmp_path / "st").exists()
