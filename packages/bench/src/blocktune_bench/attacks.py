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
STAGER = ("import sys, time\nfrom pathlib import Path\nfrom blocktune.store.safefiles import staging_dir\n"
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


def _store_crcs(path: Path, base: bool = False) -> dict[str, int]:
    """The units' checksums of a store (or of the base it keeps: each file read and checked)."""
    from blocktune import BlockStore

    with (BlockStore.open_base(path) if base else BlockStore.open(path)) as s:
        if base:
            for u in s.units:
                s.read_unit(u)
        return {u: s.record(u).crc32 for u in s.units}


def _wait_for(ready: Callable[[], bool], proc: subprocess.Popen, limit: float = 300) -> None:
    deadline = time.time() + limit
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)


def _rows(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _has_rows(out: Path, n: int) -> Callable[[], bool]:
    metrics = out / "metrics.jsonl"
    return lambda: metrics.is_file() and metrics.read_text().count("\n") >= n


def first_commit_kills(lab: Lab) -> tuple[bool, str]:
    """#29 A: a full fine-tune SIGKILLed while it starts, as its run folder appears and just after,
    then requeued with --resume (itself killed at its second row) until it ends; and a --resume on
    a fresh store. The base is kept and the run ends at its own last step, never restarted."""
    steps, seen, killed, ok = 4, [], [], True
    for delay, ready in ((1.0, None), (0.0, Path.exists), (0.03, Path.exists)):
        store = lab.fresh()
        out = store.with_name(store.name + "-run")
        base = _store_crcs(store)
        first = subprocess.Popen([PY, "-m", "blocktune", *map(str, lab.finetune(store, out, "full", steps))],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(lambda o=out, r=ready: r is None or r(o), first, 120)
        time.sleep(delay)
        kill(first)
        killed.append(json.loads((store / "manifest.json").read_text()).get("step"))
        again = subprocess.Popen([PY, "-m", "blocktune", *map(str, lab.finetune(store, out, "full", steps, "--resume"))],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(_has_rows(out, 2), again)
        kill(again)
        r = bt(*lab.finetune(store, out, "full", steps, "--resume"))
        ok = ok and clear(r, 0) and "resuming at step 0 " not in r.stderr and _store_crcs(store, base=True) == base
        ok = ok and _rows(out) == list(range(1, steps + 1)) and _store_crcs(store) != base
        seen.append(str(json.loads((store / "manifest.json").read_text())["step"]))
    store = lab.fresh()
    base = _store_crcs(store)
    r = bt(*lab.finetune(store, store.with_name(store.name + "-run"), "full", steps, "--resume"))
    ok = ok and clear(r, 0, "no full fine-tune had started") and _store_crcs(store, base=True) == base
    return ok, (f"killed at store steps {killed}, requeued (killed again at row 2, requeued): stores ended at steps "
                f"{'/'.join(seen)} of {steps}, rows 1-{steps} once each, the base kept; --resume on a fresh store: "
                f"exit {r.returncode}, the base kept")


def _blocktune_after(prelude: str, *args) -> subprocess.CompletedProcess:
    """`blocktune ARGS` in a fresh interpreter that runs `prelude` first (it may use os.getpid())."""
    code = f"import os, sys\n{prelude}\nfrom blocktune.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([PY, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)


def version_links(lab: Lab) -> tuple[bool, str]:
    """#29 B: links planted at the names of step 2's unit and state files, then at the manifest's
    temp file, pointing outside the store: nothing written through them, the store still at step 1."""
    from blocktune import BlockStore

    store = lab.fresh()
    out = store.with_name(store.name + "-run")
    bt(*lab.finetune(store, out, "full", 1))
    victim = lab.root / f"victim{lab.n}.txt"
    victim.write_text("precious\n")
    links = [store / f"{u}-000002{kind}.safetensors" for u in BlockStore.open(store).units for kind in ("", ".state")]
    for link in links:
        os.symlink(victim, link)
    r1 = bt(*lab.finetune(store, out, "full", 2, "--resume"))
    ok = clear(r1, 1, "symbolic link", "-000002") and victim.read_text() == "precious\n"
    ok = ok and BlockStore.open(store).step == 1 and BlockStore.open(store).verify() == []
    for link in links:
        link.unlink(missing_ok=True)
    plant = f"os.symlink({str(victim)!r}, os.path.join({str(store)!r}, f'.manifest.json.tmp-{{os.getpid()}}'))"
    r2 = _blocktune_after(plant, *lab.finetune(store, out, "full", 2, "--resume"))
    ok = ok and clear(r2, 1, ".manifest.json.tmp-", "symbolic link") and victim.read_text() == "precious\n"
    for p in store.glob(".manifest.json.tmp-*"):
        p.unlink()
    r3 = bt(*lab.finetune(store, out, "full", 2, "--resume"))
    ok = ok and clear(r3, 0) and BlockStore.open(store).step == 2 and victim.read_text() == "precious\n"
    return ok, (f"exit {r1.returncode}: {_from(r1, 'head-')[:90]}; the manifest's temp file: exit {r2.returncode}; "
                "the target unchanged, the store at step 1, then step 2 without the links")


def _from(r: subprocess.CompletedProcess, marker: str) -> str:
    """stderr from the first `marker` on, on one line."""
    return " ".join(r.stderr[r.stderr.find(marker):].split())


def flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def flip_text(path: Path, text: str, at: int) -> None:
    """Flip the lowest bit of character `at` of `text` in the file (a digit becomes its neighbour)."""
    flip(path, path.read_bytes().index(text.encode()) + at)


def lora_checkpoint_bits(lab: Lab) -> tuple[bool, str]:
    """#29 C: a bit flipped in checkpoint.safetensors (a tensor's data, then the step in its
    header): --resume refuses, naming the file; restored, it resumes at step 2."""
    store = lab.fresh()
    out = store.with_name(store.name + "-run")
    bt(*lab.finetune(store, out, "lora", 2))
    ckpt = out / "checkpoint.safetensors"
    good = ckpt.read_bytes()
    head = int.from_bytes(good[:8], "little")
    ok, r = True, None
    for offset, bit in ((8 + head + (len(good) - 8 - head) // 2, 3), (good.index(b'"step":"2"') + 8, 0)):
        ckpt.write_bytes(good)
        flip(ckpt, offset, bit)
        r = bt(*lab.finetune(store, out, "lora", 4, "--resume"))
        ok = ok and clear(r, 1, f"{ckpt}: checksum mismatch")
    ckpt.write_bytes(good)
    again = bt(*lab.finetune(store, out, "lora", 4, "--resume"))
    ok = ok and clear(again, 0, "resuming at step 2 of 4")
    return ok, f"a data bit, then the header's step: exit 1, {_from(r, ckpt.name)[:110]}; restored: resumed at step 2"


def manifest_digits(lab: Lab) -> tuple[bool, str]:
    """#29 D: one digit flipped in manifest.json (rope_theta, norm_eps, step, run.first_step):
    verify and --resume name its checksum; in a manifest without one (as older stores have),
    vocab_size or multiple_of flipped: verify names the tensors it no longer fits, finetune stops."""
    store = lab.fresh()
    out = store.with_name(store.name + "-run")
    bt(*lab.finetune(store, out, "full", 1))
    mpath = store / "manifest.json"
    good = mpath.read_bytes()
    ok, named = True, 0
    for text, at in (('"rope_theta": 10000.0', 17), ('"norm_eps": 1e-05', 16), ('"step": 1', 8), ('"first_step": 0', 14)):
        mpath.write_bytes(good)
        flip_text(mpath, text, at)
        for cmd in (["verify", store], lab.finetune(store, out, "full", 2, "--resume")):
            r = bt(*cmd)
            named += clear(r, 1, f"{mpath}: checksum mismatch")
    ok = named == 8
    old = json.loads(good)
    del old["manifest_crc32"]
    for text, at in (('"vocab_size": 1024', 17), ('"multiple_of": 32', 16)):
        mpath.write_text(json.dumps(old, indent=1))
        flip_text(mpath, text, at)
        v = bt("verify", store)
        r = bt(*lab.finetune(store, out, "full", 2, "--resume"))
        ok = ok and clear(v, 1, "the model fields give") and clear(r, 1, "the model fields give")
    mpath.write_bytes(good)
    return ok and clear(bt("verify", store), 0), (f"rope_theta, norm_eps, step, first_step: verify and --resume exit 1 "
                                                  f"naming its checksum {named}/8; without one, multiple_of 32->33: "
                                                  f"{_from(v, 'feed_forward')[:90]}")


def sigterm(lab: Lab) -> tuple[bool, str]:
    """#29 E: SIGTERM to a running LoRA finetune stops it as Ctrl-C does (exit 130, its message,
    whole rows), and --resume goes on from its last checkpoint."""
    store = lab.fresh()
    out = store.with_name(store.name + "-run")
    p = subprocess.Popen([PY, "-m", "blocktune", *map(str, lab.finetune(store, out, "lora", 1000, "--checkpoint-every", "2"))],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(_has_rows(out, 3), p)
    t0 = time.perf_counter()
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    took = time.perf_counter() - t0
    rows = _rows(out)
    ok = p.returncode == 130 and err.strip().splitlines()[-1] == "blocktune finetune: interrupted"
    ok = ok and "Traceback" not in err and rows == list(range(1, len(rows) + 1))
    r = bt(*lab.finetune(store, out, "lora", len(rows) + 2, "--resume"))
    at = next((line for line in r.stderr.splitlines() if "resuming at step" in line), "")
    ok = ok and clear(r, 0) and "resuming at step 0 " not in at and bool(at)
    return ok, f"exit {p.returncode} {took:.1f} s after SIGTERM at row {len(rows)}: '{err.strip().splitlines()[-1]}'; {at.strip()[:60]}"


def lora_folder_lock(lab: Lab) -> tuple[bool, str]:
    """#29 F: two LoRA --resume of one run folder started together: one runs, the other stops at
    once naming the first's pid; the rows stay one per step."""
    store = lab.fresh()
    out = store.with_name(store.name + "-run")
    bt(*lab.finetune(store, out, "lora", 2))
    cmd = [PY, "-m", "blocktune", *map(str, lab.finetune(store, out, "lora", 1000, "--resume"))]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        _wait_for(lambda: any(p.poll() is not None for p in procs), procs[0], 180)
        loser = next((p for p in procs if p.poll() is not None), None)
        winner = procs[1] if loser is procs[0] else procs[0]
        _wait_for(_has_rows(out, 4), winner)
        winner.send_signal(signal.SIGTERM)
        winner.communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                kill(p)
    if loser is None:
        return False, "neither resume stopped: both wrote the run folder"
    r = subprocess.CompletedProcess(cmd, loser.returncode, "", loser.stderr.read())
    rows = _rows(out)
    ok = clear(r, 1, "another run is writing this run folder", f"pid {winner.pid}")
    ok = ok and rows == list(range(1, len(rows) + 1)) and len(rows) >= 4
    return ok, f"exit {r.returncode}: …{r.stderr[r.stderr.find('another run'):][:110].strip()}"


def config_digit(lab: Lab) -> tuple[bool, str]:
    """#29 G: one digit of lr changed in a run folder's config.toml: --resume refuses (exit 2),
    naming the file and the fix."""
    store = lab.fresh()
    out = store.with_name(store.name + "-run")
    bt(*lab.finetune(store, out, "lora", 2))
    config = out / "config.toml"
    line = next(x for x in config.read_text().splitlines() if x.startswith("lr = "))
    flip_text(config, line, len(line) - 1)
    r = bt("finetune", "--out", out, "--resume")  # its settings from the run folder's config.toml
    return (clear(r, 2, str(config), "remove the checksum line"),
            f"{line}, last digit flipped: exit {r.returncode}, {_from(r, 'config.toml')[:110]}")


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
    "A. full fine-tune killed around its first commit, requeued; --resume on a fresh store": first_commit_kills,
    "B. links at the next version's file names (units, state, manifest temp)": version_links,
    "C. flipped bits in a LoRA checkpoint.safetensors": lora_checkpoint_bits,
    "D. digit flips in manifest.json": manifest_digits,
    "E. SIGTERM to a running finetune": sigterm,
    "F. a LoRA --resume while the run is alive": lora_folder_lock,
    "G. one digit of lr changed in a run folder's config.toml": config_digit,
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
