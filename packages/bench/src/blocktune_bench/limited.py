"""Run a command under a kernel-enforced memory limit and say how much it used.

    python -m blocktune_bench.limited 990MiB -- blocktune finetune --store S --data D ...

The command runs in a fresh memory cgroup (v1 or v2, no swap) with that limit, page cache
included, as `systemd-run -p MemoryMax=990M` would; afterwards one JSON line goes to stderr:
exit code, wall seconds, the cgroup's peak and whether the kernel OOM-killed anything. Needs
the right to make cgroups (root here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from blocktune.config import parse_bytes

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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    limit = parse_bytes(argv[0])
    cg = enter_cgroup(limit)
    t0 = time.perf_counter()
    code = subprocess.call(argv[2:])
    out = {"limit_bytes": limit, "exit_code": code, "seconds": round(time.perf_counter() - t0, 2),
           "cgroup_peak_bytes": cgroup_peak(cg), "oom_kills": _oom_kills(cg), "command": argv[2:]}
    print(json.dumps(out), file=sys.stderr)
    try:  # leave the cgroup and remove it
        root = "/sys/fs/cgroup/memory/cgroup.procs" if "/memory/" in cg else "/sys/fs/cgroup/cgroup.procs"
        Path(root).write_text(str(os.getpid()))
        os.rmdir(cg)
    except OSError:
        pass
    return code


if __name__ == "__main__":
    raise SystemExit(main())
