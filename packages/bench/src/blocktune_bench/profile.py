"""Where one paged step's time goes (`python -m blocktune_bench.measure ... --profile`): the wall
time between the computing thread's asks for successive units (each unit's compute, and its wait
for a load, in the forward and the backward), the pager's own counters (waits for loads, the read
thread's seconds, the write-back thread's, where a full fine-tune's optimizer step runs),
torch's operators by kind (matmuls, attention, widening and copies, allocations, the LoRA
optimizer) from torch.profiler on the computing thread, with the 20 operators that took longest by
name, and the process's page faults, context switches and user/system seconds from getrusage.

The profiled step is an extra step after the timed ones: the profiler's own cost (a few µs per
operator) is in its wall time, not in the figures the benchmark quotes.
"""

from __future__ import annotations

import resource
import time
from collections import defaultdict

import torch

__all__ = ["profile_step", "op_kind"]

TOP_OPS = 20  # the operators listed by name, by self time

# operator name fragments, first match wins (self times: an operator's children are their own)
_KINDS = (("attention", ("attention", "flash")), ("matmul", ("mm", "linear", "matmul", "mkldnn")),
          ("widen/copy", ("aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "contiguous")),
          ("allocation", ("aten::empty", "aten::zeros", "aten::ones", "aten::full", "[memory]")),
          ("optimizer", ("adam", "_foreach", "sgd")),
          ("loss", ("cross_entropy", "log_softmax", "nll_loss")))


def op_kind(name: str) -> str:
    """The kind of a torch operator by its name ("aten::mm" -> "matmul"); "other" otherwise."""
    low = name.lower()
    return next((kind for kind, parts in _KINDS if any(p in low for p in parts)), "other")


def _rusage() -> dict[str, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"minor_faults": r.ru_minflt, "major_faults": r.ru_majflt, "voluntary_switches": r.ru_nvcsw,
            "involuntary_switches": r.ru_nivcsw, "user_s": r.ru_utime, "system_s": r.ru_stime}


def profile_step(engine, step) -> dict:
    """Run `step()` (one engine.train_step) under the profile; returns its figures (seconds)."""
    pager, marks = engine.pager, []
    ask = pager.get

    def timed_get(unit, *args, **kwargs):  # the unit the computing thread turns to next
        marks.append((time.perf_counter(), unit))
        return ask(unit, *args, **kwargs)

    pager.get = timed_get  # an instance attribute over the method, for this step only
    before, stats = _rusage(), pager.stats.snapshot()
    start = time.perf_counter()
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    finally:
        del pager.get
    end = time.perf_counter()
    after, now = _rusage(), pager.stats.snapshot()
    by_unit: dict[str, float] = defaultdict(float)
    for (t, unit), (t_next, _) in zip(marks, marks[1:] + [(end, None)]):
        by_unit[unit] += t_next - t
    by_kind: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    ops = prof.key_averages()
    for ev in ops:
        kind = op_kind(ev.key)
        by_kind[kind] += ev.self_cpu_time_total / 1e6
        calls[kind] += ev.count
    top = sorted(ops, key=lambda ev: -ev.self_cpu_time_total)[:TOP_OPS]
    return {"wall_s": end - start,
            "before_first_unit_s": (marks[0][0] - start) if marks else end - start,
            "unit_seconds": dict(by_unit), "pager_gets": len(marks),
            "load_wait_s": now["wait_seconds"] - stats["wait_seconds"],
            "read_thread_s": now["read_seconds"] - stats["read_seconds"],
            "write_thread_s": now["write_seconds"] - stats["write_seconds"],
            "demand_reads": now["demand_reads"] - stats["demand_reads"],
            "op_self_s_by_kind": dict(by_kind), "op_calls_by_kind": dict(calls),
            "top_ops": [{"op": ev.key, "kind": op_kind(ev.key), "self_s": ev.self_cpu_time_total / 1e6,
                         "calls": ev.count} for ev in top],
            "rusage": {k: after[k] - before[k] for k in after}}
