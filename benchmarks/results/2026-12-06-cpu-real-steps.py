"""The real group's step table alone, fp32 only (the session had no time for the whole group):
python real_steps.py WORKDIR REPS -> benchmarks/results/<date>-cpu-real-steps.{json,md}"""
import statistics
import sys
from pathlib import Path

import blocktune_bench.run_real as rr
from blocktune_bench.common import machine, save

rr.DTYPES = ("fp32",)
work, reps = Path(sys.argv[1]), int(sys.argv[2])
sh = rr.Shape()
gguf, store, train, _ = rr.real_inputs(work)
runs = rr._steps(work, gguf, store, train, reps, sh)
m = machine()
m["command"] = f"python real_steps.py (blocktune_bench.run_real._steps, fp32 only) {work} {reps}"
rows = ["SmolLM2-135M-Instruct (Q4_1 GGUF; stored fp32), fp32 compute, batch 4 x 256, AdamW, LoRA rank 8 q/k/v/o in "
        f"both; median s/step over steps 2-{sh.steps}, {reps} run(s) of each, alternated; peak anonymous memory "
        "(RssAnon). blocktune from the CLI with no budget flags (since this session: keep_activations auto).", "",
        "| method | run | s/step | ratio to transformers | peak anonymous | ratio |", "| --- | --- | ---: | ---: | ---: | ---: |"]
for method in ("lora", "full"):
    mine = [r for r in runs if r["method"] == method]
    hf = {r["who"]: r for r in mine}["transformers"]
    groups = {}
    for r in mine:
        groups.setdefault(r["who"], []).append(r)
    for who, rs in groups.items():
        s = statistics.median(x["step_median"] for x in rs)
        a = max(x["anon_peak"] for x in rs)
        hs = statistics.median(x["step_median"] for x in groups["transformers"])
        ha = max(x["anon_peak"] for x in groups["transformers"])
        rows.append(f"| {method} | {who} | {s:.2f} | {s / hs:.2f} | {a / 1e9:.2f} GB | {a / ha:.2f} |")
rows += ["", "What blocktune chose (its log): " + "; ".join(sorted({c for r in runs for c in r.get("chose", [])}))[:1500]]
save("real-steps", {"machine": m, "shape": sh.__dict__, "runs": runs}, rows)
