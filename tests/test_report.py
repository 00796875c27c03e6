"""Run reports: the figure, TensorBoard scalars, `blocktune report`, progress off a terminal."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from blocktune.run.config import RunConfig
from blocktune.run.report import Progress, draw_run, read_metrics
from blocktune.run.trainer import Trainer
from blocktune_bench.corpus import demo_text
from blocktune_bench.synthetic import write_meta_checkpoint
from blocktune_export.meta import import_meta

PY = sys.executable


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short LoRA run with validation, checkpoints every 3 steps."""
    root = tmp_path_factory.mktemp("report")
    store = import_meta(write_meta_checkpoint(root / "meta", "tiny-7b", seed=0), root / "store",
                        dtype=torch.float32)
    store.close()
    text = root / "text.txt"
    text.write_text(demo_text())
    cfg = RunConfig(store=str(store.path), data=str(text), out=str(root / "run"), steps=8, lr=3e-3,
                    warmup_steps=2, batch_size=2, grad_accum=1, seq_len=32, val_ratio=0.2,
                    eval_every=2, eval_batches=2, sample_every=0, checkpoint_every=3, progress=False)
    trainer = Trainer(cfg, log=lambda s: None)
    history = trainer.run()
    trainer.close()
    return root / "run", history


def test_the_figure_is_a_real_plot_of_the_losses(run):
    import matplotlib.image

    folder, history = run
    img = matplotlib.image.imread(folder / "loss.png")
    print("loss.png", img.shape)
    assert img.shape[:2] == (850, 900)
    rgb = img[..., :3]
    assert rgb.std() > 0.05  # not blank
    colours = np.unique((rgb * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50  # lines, text and antialiasing, not a flat fill
    # the loss axis covers every loss, and starts near the lowest, not at zero
    fig = draw_run(read_metrics(folder / "metrics.jsonl"))
    lo, hi = fig.axes[0].get_ylim()
    losses = [r["loss"] for r in history] + [r["val_loss"] for r in history if "val_loss" in r]
    print(f"loss axis {lo:.3f}..{hi:.3f}, losses {min(losses):.3f}..{max(losses):.3f}")
    assert lo <= min(losses) and hi >= max(losses) and lo > 0.8 * min(losses)
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["training loss", "validation loss"]
    assert fig.axes[0].get_xlabel() == "step" and "loss" in fig.axes[0].get_ylabel()


def test_tensorboard_holds_the_metrics(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, history = run
    acc = EventAccumulator(str(folder))
    acc.Reload()
    rows = read_metrics(folder / "metrics.jsonl")
    train = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    val = [(e.step, e.value) for e in acc.Scalars("val/loss")]
    assert [s for s, _ in train] == [r["step"] for r in rows] == list(range(1, 9))
    np.testing.assert_allclose([v for _, v in train], [r["loss"] for r in rows], rtol=1e-6)  # float32 in the file
    assert [s for s, _ in val] == [r["step"] for r in rows if "val_loss" in r] == [2, 4, 6, 8]
    np.testing.assert_allclose([v for _, v in val], [r["val_loss"] for r in rows if "val_loss" in r], rtol=1e-6)
    assert {"train/lr", "perf/tokens_per_s", "io/gb_read", "memory/peak_rss_gb"} <= set(acc.Tags()["scalars"])


def test_report_of_a_killed_run(run, tmp_path):
    """A run cut short (a kill mid-append): `report` says where it stopped and redraws."""
    folder, history = run
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "config.toml").write_text((folder / "config.toml").read_text())
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:17])
    out = subprocess.run([PY, "-m", "blocktune", "report", str(killed), "--json"],
                         capture_output=True, text=True, check=True)
    s = json.loads(out.stdout)
    print(s)
    assert s["steps_done"] == 5 and s["steps_planned"] == 8 and not s["finished"]
    assert s["best_val_loss"] == min(history[1]["val_loss"], history[3]["val_loss"])
    assert s["gb_read"] == pytest.approx(sum(r["gb_read"] for r in history[:5]))
    assert (killed / "loss.png").is_file() and s["figure"] == str(killed / "loss.png")
    text = subprocess.run([PY, "-m", "blocktune", "report", str(killed)], capture_output=True, text=True, check=True)
    assert "5 of 8: stopped early" in text.stdout
    bad = subprocess.run([PY, "-m", "blocktune", "report", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "no metrics.jsonl" in bad.stderr


def test_without_matplotlib_a_note_not_a_crash(run, tmp_path):
    folder, _ = run
    script = ("import sys; sys.modules['matplotlib'] = None; sys.modules['matplotlib.figure'] = None\n"
              "from blocktune.run.report import plot_run\n"
              f"print(plot_run({str(folder)!r}, log=print))")
    out = subprocess.run([PY, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "matplotlib is not installed" in out and out.strip().endswith("None")


def test_progress_off_a_terminal_is_plain_lines():
    stream = io.StringIO()
    bar = Progress(5, desc="finetune", every=0.0, stream=stream, tty=False)
    for i in range(5):
        bar.update(1, loss=f"{5 - i:.1f}")
    bar.close()
    lines = stream.getvalue().splitlines()
    print(lines)
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    assert len(lines) == 5 and lines[-1].startswith("finetune 5/5 steps (100%) loss=1.0")
    quiet = io.StringIO()
    bar = Progress(100, every=3600, stream=quiet, tty=False)
    for _ in range(100):
        bar.update(1)
    bar.close()
    assert len(quiet.getvalue().splitlines()) == 1  # only the closing line


def test_demo_log_off_a_terminal(tmp_path):
    """The README's first command, its output going to a file: short, with no redraws."""
    r = subprocess.run([PY, "-m", "blocktune", "demo", "--out", str(tmp_path / "demo")],
                       capture_output=True, text=True, check=True)
    log = r.stdout + r.stderr
    print(log)
    assert "\r" not in log
    # the questions and answers before and after, the steps' commands, and a progress line every
    # 30 s (how many depends on the machine's speed: not counted)
    assert len([line for line in log.splitlines() if not line.startswith("finetune ")]) < 50
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["last_loss"] < summary["first_loss"]
    assert (tmp_path / "demo" / "run" / "loss.png").is_file()
