"""The attacks of #29 beside the reliability campaign: each is what a careless user, a killed
process or a hostile file does to a real store, run folder or checkpoint through the `blocktune`
command (a fresh process each time), with the outcome it must have. A full disk is a real tmpfs
of a few hundred KiB mounted in a user namespace (`unshare -rm`: no root), where the machine
allows one; elsewhere those attacks say "skipped".

Each attack returns (held, what was seen): held is True when the outcome is the one expected
(a clear message with the README's exit code, nothing lost or half-written).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

PY = sys.executable
RUN_TOML = ("eval_every = 0\nsample_every = 0\nplot = false\nval_ratio = 0.0\nseq_len = 16\nbatch_size = 2\n"
            "grad_accum = 1\nlr = 3e-3\ndevice = \"cpu\"\nprogress = false\ntensorboard = false\ncheckpoint_every = 1\n")
# a process inside `staging_dir(argv[1])` (what prepare and export write through), then waiting
STAGER = ("import sys, time\nfrom pathlib import Path\nfrom blocktune.store.fileio import staging_dir\n"
          "with staging_dir(Path(sys.argv[1])) as tmp:\n    (tmp / 'unit.safetensors').write_bytes(bytes(1 << 16))\n"
          "    print('in', flush=True)\n    time.sleep(600)\n")
HOLD = "import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDONLY)\nfcntl.flock(fd, fcntl.LOCK_SH)\nprint('in', flush=True)\ntime.sleep(600)"
READER = "import sys, time\nfrom blocktune import BlockStore\nheld = BlockStore.open(sys.argv[1])\nprint('in', flush=True)\ntime.sleep(600)"


def bt(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "blocktune", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def last_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    return f"exit {r.returncode}: {lines[-1][:300] if lines else ''}"


def clear(r: subprocess.CompletedProcess, code: int, *needles: str) -> bool:
    return r.returncode == code and "Traceback" not in r.stderr and all(n in r.stderr for n in needles)


def started(code: str, *args) -> subprocess.Popen:
    p = subprocess.Popen([PY, "-c", code, *map(str, args)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "in\n"
    return p


def kill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait()


class Lab:
    """The campaign's material: a tiny-7b store (Meta layout, sentencepiece), its Meta folder,
    a Hugging Face folder with a tokenizer.json, text.txt and run.toml, under `root`."""

    def __init__(self, root: Path):
        from blocktune_export.meta import import_meta

        from blocktune_bench.corpus import demo_text
        from blocktune_bench.synthetic import write_meta_checkpoint

        self.root = root
        self.meta = write_meta_checkpoint(root / "meta", "tiny-7b", seed=0)
        self.store = import_meta(self.meta, root / "store").path
        (root / "text.txt").write_text(demo_text() * 2)
        (root / "run.toml").write_text(RUN_TOML)
        self.n = 0

    def hf(self) -> Path:
        if not (self.root / "hf").exists():
            from blocktune_bench.families import make_checkpoint

            make_checkpoint(self.root / "hf", "qwen3")
        return self.fresh(self.root / "hf")

    def fresh(self, src: Path | None = None) -> Path:
        """A new folder (a copy of `src`, by default the store) for one attack."""
        self.n += 1
        dst = self.root / f"a{self.n}"
        shutil.copytree(src or self.store, dst, ignore=shutil.ignore_patterns(".lock"))
        return dst

    def finetune(self, store: Path, out: Path, method: str, steps: int, *extra: str) -> list:
        return ["finetune", "--config", self.root / "run.toml", "--store", store, "--data", self.root / "text.txt",
                "--out", out, "--method", method, "--steps", steps, *extra]


def killed_partials(lab: Lab) -> tuple[bool, str]:
    dst = lab.root / f"st{lab.n}"
    lab.n += 1
    live = started(STAGER, dst)
    kill(started(STAGER, dst))
    (dst.parent / f".{dst.name}.partial-oldstyle").mkdir()
    r = bt("prepare", lab.meta, dst)
    left = list(dst.parent.glob(f".{dst.name}.partial-*"))
    kill(live)
    v = bt("verify", dst)
    ok = r.returncode == 0 and len(left) == 1 and str(live.pid) in left[0].name and "left by a killed" in v.stderr
    return ok, f"next prepare removed 2 dead partial folders, kept the live one; verify then named it: {v.returncode}"


def orphaned_version(lab: Lab) -> tuple[bool, str]:
    store = lab.fresh()
    out = store.with_name(store.name + "-run")
    bt(*lab.finetune(store, out, "full", 1))
    reader = started(READER, store)
    bt(*lab.finetune(store, out, "full", 2, "--resume"))
    kill(reader)
    v = bt("verify", store)
    bt(*lab.finetune(store, out, "full", 3, "--resume"))
    gone = not list(store.glob("*-000001*.safetensors"))
    note = next((line for line in v.stderr.splitlines() if "no step needs" in line), "")
    return v.returncode == 0 and bool(note) and gone, f"verify: {note[note.find(': ') + 2:][:120]}…; the next commit removed them"


def odd_readers(lab: Lab) -> tuple[bool, str]:
    store = lab.fresh()
    readers = store / ".lock" / "readers"
    readers.mkdir(parents=True)
    (readers / "1.pin").mkdir()
    os.mkfifo(readers / "2.pin")
    os.symlink("/etc/passwd", readers / "3.pin")
    try:
        r = bt(*lab.finetune(store, store.with_name(store.name + "-run"), "full", 2), timeout=120)
    except subprocess.TimeoutExpired:
        return False, "the writer hung"
    return clear(r, 0), f"a folder, a FIFO and a link in .lock/readers: {last_line(r)[:60]}"


def garbage_pin(lab: Lab) -> tuple[bool, str]:
    store = lab.fresh()
    readers = store / ".lock" / "readers"
    readers.mkdir(parents=True)
    (readers / "9.pin").write_bytes(b"\x00garbage")
    holder = started(HOLD, readers / "9.pin")
    try:
        r = bt(*lab.finetune(store, store.with_name(store.name + "-run"), "full", 2))
        v = bt("verify", store)
    finally:
        kill(holder)
    return clear(r, 0) and "not a pin blocktune wrote" in v.stderr, "the run went on; verify: collection held off, the pin named"


def on_small_disk(lab: Lab, size: str, *args) -> tuple[int, str, list[str]] | None:
    """`blocktune ARGS` where DISK (in the args) is a tmpfs of `size`: (exit code, stderr,
    what is left on it); None where no tmpfs can be mounted here."""
    disk = lab.root / f"disk{lab.n}"
    lab.n += 1
    disk.mkdir()
    cmd = " ".join(f"'{str(a).replace('DISK', str(disk))}'" for a in [PY, "-m", "blocktune", *args])
    script = (f"mount -t tmpfs -o size={size} tmpfs '{disk}' || exit 99\n{cmd} 2>'{disk}.err'\n"
              f"echo rc=$?; cd '{disk}' && find . -mindepth 1 -not -path './*/.lock*' | sort")
    if shutil.which("unshare") is None:
        return None
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    if not r.stdout.startswith("rc="):
        return None
    lines = r.stdout.split()
    return int(lines[0][3:]), Path(f"{disk}.err").read_text(), lines[1:]


def full_disk(what: str) -> Callable[[Lab], tuple[bool, str]]:
    def attack(lab: Lab) -> tuple[bool, str]:
        if what == "prepare":
            args = ["prepare", lab.meta, "DISK/st"]
        elif what == "lora":
            args = lab.finetune(lab.store, "DISK/run", "lora", 3)
        else:
            args = ["export", lab.store, "DISK/out", "--format", what]
        got = on_small_disk(lab, "420k" if what == "lora" else "300k", *args)
        if got is None:
            return True, "skipped: no tmpfs in a user namespace here"
        code, err, left = got
        line = err.strip().splitlines()[-1] if err.strip() else ""
        ok = code == 1 and "Traceback" not in err and "write failed" in err
        ok = ok and (not left if what != "lora" else "step 1, intact" in err and not [n for n in left if ".tmp-" in n])
        return ok, line[line.find("write failed"):][:160]
    return attack


def bad_header(kind: str) -> Callable[[Lab], tuple[bool, str]]:
    def attack(lab: Lab) -> tuple[bool, str]:
        src = lab.hf()
        path = src / "model.safetensors"
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        key = next(k for k in header if k != "__metadata__")
        if kind == "length":
            path.write_bytes(struct.pack("<Q", 1 << 62) + raw[8:])
        else:
            lo, hi = header[key]["data_offsets"]
            header[key]["data_offsets"] = [lo, 10**15] if kind == "offsets" else [lo, hi - 4]
            blob = json.dumps(header).encode()
            path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
        r = bt("prepare", src, src.with_name(src.name + "-st"))
        return clear(r, 1, str(path)), last_line(r)[len(str(path)) + 30:][:150]
    return attack


def garbage_tokenizer(lab: Lab) -> tuple[bool, str]:
    src = lab.hf()
    (src / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nonsense"}}')
    r = bt("prepare", src, src.with_name(src.name + "-st"))
    return clear(r, 2, "tokenizer.json: not a tokenizers file"), "refused at prepare, exit 2, the file named"


def huge_row(lab: Lab) -> tuple[bool, str]:
    data = lab.root / "big.jsonl"
    data.write_text(json.dumps({"prompt": "Say it.", "response": "word " * 40_000_000}) + "\n")
    store = lab.fresh()
    t0 = time.perf_counter()
    r = bt("finetune", "--config", lab.root / "run.toml", "--store", store, "--data", data, "--out",
           store.with_name(store.name + "-run"), "--method", "lora", "--steps", "1")
    took = time.perf_counter() - t0
    return clear(r, 0, "were cut") and took < 60, f"a 200 MB one-line row: a LoRA step from the CLI in {took:.1f} s in all"


def line_separators(lab: Lab) -> tuple[bool, str]:
    from blocktune.run.rows import read_rows

    path = lab.root / "sep.jsonl"
    rows = [{"prompt": "a\u2028b", "response": "c\u0085d"}]
    path.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n", encoding="utf-8")
    got = read_rows(path)
    return [(r.prompt, r.response) for r in got] == [("a\u2028b", "c\u0085d")], "U+2028 and U+0085 in a string read as written"


def non_utf8_path(lab: Lab) -> tuple[bool, str]:
    store = lab.fresh()
    weird = Path(os.fsdecode(os.fsencode(store) + b"\xff"))
    store.rename(weird)
    r = bt(*lab.finetune(weird, Path(os.fsdecode(os.fsencode(store) + b"-run\xff")), "lora", 1))
    return clear(r, 0), "store and run folder named with byte 0xff: a LoRA step ran"


def hf_export_mode(lab: Lab) -> tuple[bool, str]:
    out = lab.root / f"hfout{lab.n}"
    lab.n += 1
    r = bt("export", lab.store, out, "--format", "hf")
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()} if out.exists() else {}
    want = oct(0o666 & ~_umask())
    return r.returncode == 0 and set(modes.values()) == {want}, f"modes {sorted(set(modes.values()))} (umask gives {want})"


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


def metrics_link(lab: Lab) -> tuple[bool, str]:
    store = lab.fresh()
    out = store.with_name(store.name + "-run")
    p = subprocess.Popen([PY, "-m", "blocktune", *map(str, lab.finetune(store, out, "lora", 400))],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    os.symlink(lab.root / "text.txt", out / "link")
    os.replace(out / "link", metrics)
    err = p.communicate(timeout=120)[1]
    return p.returncode == 1 and "Traceback" not in err and "a symbolic link" in err, "link swapped in mid-run: exit 1, named"


def damaged_metrics_row(lab: Lab) -> tuple[bool, str]:
    store = lab.fresh()
    out = store.with_name(store.name + "-run")
    bt(*lab.finetune(store, out, "lora", 3))
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = "{" + lines[1][2:]
    metrics.write_text("\n".join(lines) + "\n")
    r = bt("report", out)
    return "skipped damaged line(s) 2" in r.stderr, "report names line 2 and goes on"


ATTACKS: dict[str, Callable[[Lab], tuple[bool, str]]] = {
    "killed prepare/export: .NAME.partial folders": killed_partials,
    "reader open across commits: orphaned version": orphaned_version,
    "a folder, FIFO and link in .lock/readers": odd_readers,
    "a live pin of garbage in .lock/readers": garbage_pin,
    "full disk during prepare": full_disk("prepare"),
    "full disk during export (Meta, torch.save)": full_disk("meta"),
    "full disk during export (HF, safetensors)": full_disk("hf"),
    "full disk during export (GGUF)": full_disk("gguf"),
    "full disk at a LoRA checkpoint": full_disk("lora"),
    "safetensors header length 2**62": bad_header("length"),
    "safetensors offsets past the end": bad_header("offsets"),
    "safetensors offsets shorter than the shape": bad_header("shape"),
    "garbage tokenizer.json in an HF folder": garbage_tokenizer,
    "a valid 200 MB one-line JSONL row": huge_row,
    "U+2028 / U+0085 inside a JSONL string": line_separators,
    "a path with a non-UTF-8 byte": non_utf8_path,
    "HF export file modes": hf_export_mode,
    "a link planted at metrics.jsonl mid-run": metrics_link,
    "a damaged metrics.jsonl row": damaged_metrics_row,
}


def run_attacks(root: Path) -> list[dict]:
    """Every attack, in order: name, held, what was seen, seconds."""
    lab = Lab(root)
    out = []
    for name, attack in ATTACKS.items():
        t0 = time.perf_counter()
        try:
            held, seen = attack(lab)
        except Exception as exc:  # an attack that could not be carried out is a failure, recorded
            held, seen = False, f"{type(exc).__name__}: {exc}"[:200]
        out.append({"attack": name, "held": held, "seen": seen, "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(out[-1]), flush=True)
    return out
