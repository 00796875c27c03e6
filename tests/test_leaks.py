"""What killed processes leave, and a disk that fills, with real processes (#29): partial folders
of a killed prepare or export are removed by the next one to that folder, `verify` reports
orphaned versions and partials, odd entries in .lock/readers neither crash nor hang a writer, and
a full disk (a real, small tmpfs mounted in a user namespace) ends `prepare`, `export` and a
LoRA checkpoint with one clear message, exit 1 and nothing half-written."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from blocktune.store.lock import LOCK_DIR
from conftest import multi_process_root

PY = sys.executable
RUN_TOML = ("eval_every = 0\nsample_every = 0\nplot = false\nval_ratio = 0.0\nseq_len = 16\n"
            "batch_size = 2\ngrad_accum = 1\nlr = 3e-3\ndevice = \"cpu\"\nprogress = false\n"
            "tensorboard = false\ncheckpoint_every = 1\n")
# a process inside `staging_dir(argv[1])` that has written a file there, says so, and waits
STAGER = ("import sys, time\nfrom pathlib import Path\nfrom blocktune.store.safefiles import staging_dir\n"
          "with staging_dir(Path(sys.argv[1])) as tmp:\n    (tmp / 'unit.safetensors').write_bytes(bytes(1 << 16))\n"
          "    print('in', flush=True)\n    time.sleep(600)\n")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("leaks")
    multi_process_root(root, RUN_TOML)
    from blocktune_bench.synthetic import write_meta_checkpoint

    write_meta_checkpoint(root / "meta", "tiny-7b", seed=0)
    return root


def _blocktune(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "blocktune", *args], capture_output=True, text=True, timeout=timeout)


def _stager(dst: Path) -> subprocess.Popen:
    p = subprocess.Popen([PY, "-c", STAGER, str(dst)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "in\n"
    return p


def _kill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait()


def _partials(dst: Path) -> list[str]:
    return sorted(p.name for p in dst.parent.glob(f".{dst.name}.partial-*"))


def test_a_killed_prepares_partial_folder_is_removed_by_the_next_prepare(root, tmp_path):
    """A prepare SIGKILLed while it writes (here: a process inside `staging_dir`, which prepare
    and export write through) leaves `.st.partial-PID-XXXX` (a full-size unit in
    it); one from before #29 (`.st.partial-XXXX`, no pid, no lock) lies beside it, and a live
    writer of the same folder holds a third. The next prepare to `st` removes the two dead ones
    and leaves the live one; once that one is killed too, `verify st` names it (exit 0: the
    store is fine). (Before: nothing removed them, and verify said nothing.)"""
    dst = tmp_path / "st"
    live = _stager(dst)
    _kill(_stager(dst))  # (each staging_dir removes the dead ones it finds: this one comes after)
    (tmp_path / ".st.partial-k3j2x9ab").mkdir()
    (tmp_path / ".st.partial-k3j2x9ab" / "block_00.safetensors").write_bytes(bytes(1 << 16))
    assert len(_partials(dst)) == 3
    r = _blocktune("prepare", str(root / "meta"), str(dst))
    assert r.returncode == 0, r.stderr[-2000:]
    left = _partials(dst)
    assert left == [n for n in left if n.startswith(f".st.partial-{live.pid}-")] and len(left) == 1
    _kill(live)
    r = _blocktune("verify", str(dst))
    print(r.stderr.strip())
    assert r.returncode == 0 and left[0] in r.stderr and "left by a killed `prepare`" in r.stderr
    r = _blocktune("export", str(dst), str(tmp_path / "out"), "--format", "meta")
    assert r.returncode == 0, r.stderr[-2000:]
    _kill(_stager(tmp_path / "out2"))
    assert len(_partials(tmp_path / "out2")) == 1
    r = _blocktune("export", str(dst), str(tmp_path / "out2"), "--format", "hf")
    assert r.returncode == 0 and _partials(tmp_path / "out2") == [], r.stderr[-2000:]


def _finetune(root: Path, store: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["finetune", "--config", str(root / "run.toml"), "--store", str(store), "--data",
            str(root / "text.txt"), "--out", str(out), "--method", "full", "--steps", str(steps), *extra]


def test_an_orphaned_version_is_reported_then_collected(root, tmp_path):
    """A reader opens the store at step 1 and stays open while a full fine-tune commits step 2:
    `verify` says the step-1 versions are kept for a live reader. The reader is SIGKILLed:
    `verify` now reports them as versions no step needs (exit 0), and the next writer's commit
    removes them. (Before: verify said nothing of them.)"""
    store = tmp_path / "s"
    shutil.copytree(root / "store", store, ignore=shutil.ignore_patterns(LOCK_DIR))
    r = _blocktune(*_finetune(root, store, tmp_path / "run", 1))
    assert r.returncode == 0, r.stderr[-2000:]
    reader = subprocess.Popen([PY, "-c", f"from blocktune import BlockStore\nheld = BlockStore.open({str(store)!r})\n"
                               "print('in', flush=True)\nimport time\ntime.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline() == "in\n"
    r = _blocktune(*_finetune(root, store, tmp_path / "run", 2, "--resume"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = _blocktune("verify", str(store))
    assert r.returncode == 0 and "kept for readers still open" in r.stderr, r.stderr
    _kill(reader)
    r = _blocktune("verify", str(store))
    print(r.stderr.strip())
    assert r.returncode == 0 and "no step needs" in r.stderr and "-000001.safetensors" in r.stderr, r.stderr
    r = _blocktune(*_finetune(root, store, tmp_path / "run", 3, "--resume"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = _blocktune("verify", str(store))
    assert r.returncode == 0 and "note:" not in r.stderr, r.stderr
    assert not list(store.glob("*-000001*.safetensors"))


def test_odd_entries_in_the_readers_folder_neither_crash_nor_hang_a_writer(root, tmp_path):
    """In STORE/.lock/readers: a folder, a FIFO and a link named like pins. A full fine-tune's
    commits end in time and exit 0 (before: IsADirectoryError at the first commit, or a writer
    blocked forever opening the FIFO). Then a pin of garbage held by a live process (flock): the
    run goes on, garbage collection holds off, and `verify` names each entry and says why;
    once the holder is gone, the next commit collects again."""
    store = tmp_path / "s"
    shutil.copytree(root / "store", store, ignore=shutil.ignore_patterns(LOCK_DIR))
    readers = store / LOCK_DIR / "readers"
    readers.mkdir(parents=True)
    (readers / "1-aa.pin").mkdir()
    os.mkfifo(readers / "2-bb.pin")
    os.symlink("/etc/passwd", readers / "3-cc.pin")
    r = _blocktune(*_finetune(root, store, tmp_path / "run", 2), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    (readers / "4-dd.pin").write_bytes(b"\x00garbage{")
    holder = subprocess.Popen([PY, "-c", f"import fcntl, os, time\nfd = os.open({str(readers / '4-dd.pin')!r}, os.O_RDONLY)\n"
                               "fcntl.flock(fd, fcntl.LOCK_SH)\nprint('in', flush=True)\ntime.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "in\n"
        r = _blocktune(*_finetune(root, store, tmp_path / "run", 3, "--resume"), timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert list(store.glob("*-000002*.safetensors"))  # not collected: the garbage pin may name them
        r = _blocktune("verify", str(store))
        print(r.stderr.strip())
        assert r.returncode == 0
        for name in ("1-aa.pin", "2-bb.pin", "3-cc.pin"):
            assert f"{name}: not a reader's pin" in r.stderr
        assert "4-dd.pin: held open by a live process but not a pin blocktune wrote" in r.stderr
        assert "garbage collection deletes nothing while it is held" in r.stderr
    finally:
        _kill(holder)
    r = _blocktune(*_finetune(root, store, tmp_path / "run", 4, "--resume"), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list(store.glob("*-00000[123]*.safetensors"))  # collection works again


def _on_small_disk(size: str, disk: Path, *args: str, first: str = "") -> tuple[int, str, list[str]]:
    """`blocktune ARGS` with a tmpfs of `size` mounted at `disk` (a user namespace: no root
    needed), after the shell command `first`: (exit code, stderr, what is left on that disk,
    hidden files included)."""
    disk.mkdir(exist_ok=True)
    cmd = " ".join(f"'{a}'" for a in [PY, "-m", "blocktune", *args])
    script = (f"mount -t tmpfs -o size={size} tmpfs '{disk}' || exit 99\n{first}\n{cmd} >'{disk.parent}/out' 2>'{disk.parent}/err'\n"
              f"echo rc=$?; cd '{disk}' && find . -mindepth 1 -not -path './*/.lock*' | sort")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    if r.returncode == 99 or not r.stdout.startswith("rc="):
        pytest.skip(f"no tmpfs in a user namespace here: {r.stderr.strip()[-300:]}")
    lines = r.stdout.split()
    return int(lines[0][3:]), (disk.parent / "err").read_text(), lines[1:]


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
@pytest.mark.parametrize("what", ["prepare", "export-meta", "export-hf", "export-gguf"])
def test_a_full_disk_during_prepare_or_export(root, tmp_path, what):
    """Prepare or export onto a 300 KiB disk (the model takes 1.7 MB): exit 1, one message naming
    the folder, the failed write and the space left, and nothing left on that disk. (Before:
    `OSError: [Errno 28]`, `RuntimeError: [enforce fail at inline_container.cc:672]`,
    `SafetensorError: ... No space left on device`, `OSError: 12288 requested and 5712 written`
    tracebacks.)"""
    disk = tmp_path / "disk"
    if what == "prepare":
        args = ["prepare", str(root / "meta"), str(disk / "st")]
    else:
        args = ["export", str(root / "store"), str(disk / "out"), "--format", what.split("-")[1]]
    code, err, left = _on_small_disk("300k", disk, *args)
    print(err.strip().splitlines()[-1])
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert "write failed" in err and "free there" in err and "nothing was written to" in err
    assert left == []


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_a_full_disk_at_a_lora_checkpoint(root, tmp_path):
    """A LoRA run checkpointing every step on a 420 KiB disk: step 1's checkpoint (208 KB, its
    adapter 69 KB) fits, step 2's temp file beside it does not. Exit 1, "the run folder still
    holds step 1, intact", no temp file left beside the checkpoint. (Before: a bare `OSError: [Errno 28]` traceback.)"""
    disk = tmp_path / "disk"
    t0 = time.time()
    code, err, left = _on_small_disk("420k", disk, "finetune", "--config", str(root / "run.toml"), "--store",
                                     str(root / "store"), "--data", str(root / "text.txt"), "--out",
                                     str(disk / "run"), "--method", "lora", "--steps", "3")
    print(err.strip().splitlines()[-1], f"({time.time() - t0:.1f} s)")
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert "write failed (No space left on device" in err and "the run folder still holds step 1, intact" in err
    assert "--resume" in err
    assert not [n for n in left if ".tmp-" in n] and "./run/checkpoint.safetensors" in left


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_the_disk_precheck_says_sizes_that_differ(root, tmp_path):
    """A full fine-tune of a 1.7 MB store on a 2.5 MiB disk: refused before anything is written
    (exit 2), with the sizes in MiB (before: "needs about 0.0 GB free ... and 0.0 GB are free")."""
    disk = tmp_path / "disk"
    code, err, _ = _on_small_disk("2560k", disk, *_finetune(root, disk / "s", tmp_path / "run", 1),
                                  first=f"cp -r '{root / 'store'}' '{disk / 's'}'")
    line = err.strip().splitlines()[-1]
    print(line)
    assert code == 2 and "a full fine-tune needs about" in line and " GB" not in line, err[-2000:]
    need = float(re.search(r"about ([0-9.]+) MiB free", line)[1])
    free = float(re.search(r"([0-9.]+) MiB are free", line)[1])
    assert need > free > 0


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
@pytest.mark.parametrize("size", ["2000k", "6m"])
def test_a_narrowed_copy_beside_a_store_on_a_small_disk(root, tmp_path, size):
    """LoRA in bf16 on the fp32 store (1.7 MB), units paged: with room beside the store the run
    reads a bf16 copy it makes there; on a disk with no room for it (2 MB in all) it reads the
    store as it is and says why. Either way the run ends well and leaves nothing on that disk
    but the store."""
    disk = tmp_path / "disk"
    code, err, left = _on_small_disk(size, disk, "finetune", "--config", str(root / "run.toml"), "--store",
                                     str(disk / "st"), "--data", str(root / "text.txt"), "--out",
                                     str(tmp_path / "run"), "--method", "lora", "--steps", "2",
                                     "--compute-dtype", "bf16", "--device-budget", "300KiB",
                                     first=f"cp -r '{root / 'store'}' '{disk / 'st'}'")
    assert code == 0, err[-3000:]
    if size == "6m":
        assert "frozen units read as bf16: the fp32 store was narrowed once" in err, err[-3000:]
    else:
        assert "units of" in err and "are converted to bf16 at every read: a bf16 copy would take" in err, err[-3000:]
    assert not [n for n in left if "narrowed" in n], left
    assert sorted(n for n in left if n.startswith("./st/")) == sorted(
        "./st/" + p.name for p in (root / "store").iterdir() if p.name != ".lock")


def test_a_partial_left_under_this_processs_own_pid_is_removed(tmp_path):
    """In a container a process often gets the pid the killed one had: a partial folder named
    with this process's pid that no one holds locked is a dead process's, and goes."""
    from blocktune.store.safefiles import ScratchDir, partial_dirs

    dst = tmp_path / "st"
    left = tmp_path / f".st.partial-{os.getpid()}-left"
    left.mkdir()
    assert partial_dirs(dst) == [(left, False)]
    scratch = ScratchDir(dst)
    try:
        assert not left.exists()
        assert partial_dirs(dst) == [(scratch.path, True)]  # its own, locked: alive
    finally:
        scratch.close()
    assert partial_dirs(dst) == []
