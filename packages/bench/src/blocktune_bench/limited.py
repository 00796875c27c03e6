"""Run a command under a kernel-enforced memory limit (and disk read rate) and say how much it used.

    python -m blocktune_bench.limited 990MiB -- blocktune finetune --store S --data D ...
    python -m blocktune_bench.limited 2GiB --read-rate 400MB --disk S -- blocktune finetune ...

The command runs in a fresh memory cgroup (v1 or v2, no swap) with that limit, page cache
included, as `systemd-run -p MemoryMax=990M` would (`none`: no memory limit). `--read-rate`
also throttles its reads from the disk that holds `--disk` (default: the working directory)
to that many bytes a second (cgroup v1 blkio.throttle.read_bps_device, v2 io.max rbps), as
`systemd-run -p IOReadBandwidthMax=` would: a slower disk, made by the kernel. Afterwards one
JSON line goes to stderr: exit code, wall seconds, the cgroup's peak and whether the kernel
OOM-killed anything. Needs the right to make cgroups (root here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from blocktune.settings import parse_bytes

from .measure import cgroup_peak, enter_cgroup

__all__ = ["main"]


def _oom_kills(cg: str) -> int:
    for name in ("memory.events", "memory.oom_control"):
        p = Path(cg) / name
        if p.exists():
            for line in p.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    return 0


def disk_of(path: Path) -> str:
    """"MAJOR:MINOR" of the whole disk that holds `path` (a partition's parent: throttles
    apply to disks)."""
    dev = os.stat(path).st_dev
    node = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not node.exists():
        raise SystemExit(f"{path} is not on a block device ({os.major(dev)}:{os.minor(dev)}); "
                         "a read rate cannot be set for it")
    if (node / "partition").exists():
        node = node.resolve().parent
    return (node / "dev").read_text().strip()


def throttle_reads(rate: int, disk: str) -> str:
    """Limit this process's (and its children's) reads from `disk` to `rate` bytes/s; returns the cgroup."""
    name = f"blocktune-read-{os.getpid()}"
    v1 = Path("/sys/fs/cgroup/blkio")
    if v1.is_dir():
        cg = v1 / name
        cg.mkdir()
        (cg / "blkio.throttle.read_bps_device").write_text(f"{disk} {rate}")
        (cg / "cgroup.procs").write_text(str(os.getpid()))
    else:  # v2: the memory cgroup is this process's now; its limit goes on the same one
        cg = Path("/sys/fs/cgroup") / Path(Path("/proc/self/cgroup").read_text().split("::")[-1].strip()).relative_to("/")
        (cg / "io.max").write_text(f"{disk} rbps={rate}")
    return str(cg)


def _leave(cg: str) -> None:
    try:  # leave the cgroup and remove it
        hierarchy = next((h for h in ("memory", "blkio") if f"/{h}/" in cg), None)
        root = f"/sys/fs/cgroup/{hierarchy}/cgroup.procs" if hierarchy else "/sys/fs/cgroup/cgroup.procs"
        Path(root).write_text(str(os.getpid()))
        os.rmdir(cg)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv or argv.index("--") + 1 >= len(argv):
        print(__doc__, file=sys.stderr)
        return 2
    split = argv.index("--")
    opts, command = argv[:split], argv[split + 1:]
    rate = disk = None
    if "--read-rate" in opts:
        i = opts.index("--read-rate")
        rate = parse_bytes(opts.pop(i + 1))
        opts.pop(i)
    disk_path = Path(".")
    if "--disk" in opts:
        i = opts.index("--disk")
        disk_path = Path(opts.pop(i + 1))
        opts.pop(i)
    if len(opts) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    limit = None if opts[0] == "none" else parse_bytes(opts[0])
    cg = enter_cgroup(limit if limit is not None else 1 << 62)
    io_cg = None
    if rate is not None:
        disk = disk_of(disk_path)
        io_cg = throttle_reads(rate, disk)
    t0 = time.perf_counter()
    code = subprocess.call(command)
    out = {"limit_bytes": limit, "read_rate": rate, "disk": disk, "exit_code": code,
           "seconds": round(time.perf_counter() - t0, 2), "cgroup_peak_bytes": cgroup_peak(cg),
           "oom_kills": _oom_kills(cg), "command": command}
    print(json.dumps(out), file=sys.stderr)
    if io_cg is not None and io_cg != cg:
        _leave(io_cg)
    _leave(cg)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
