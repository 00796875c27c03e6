"""The real group's step and profile tables alone, in both dtypes (the whole group, with its 30-step
tracking and held-out runs, takes about an hour; those tables are in 2026-12-06-cpu-real*.md):
python 2026-12-07-cpu-real-steps.py WORKDIR REPS -> benchmarks/results/<date>-cpu-real-steps.{json,md}
(run from the repository root)."""
import statistics
import sys
from pathlib import Path

import blocktune_bench.run_real as rr
from blocktune.machine.cpubf16 import cpu_bf16
from blocktune_bench.common import machine, save

work, reps = Path(sys.argv[1]), int(sys.argv[2])
sh = rr.Shape()
gguf, store, train, _ = rr.real_inputs(work)
ratio = rr.matmul_ratio()
runs = rr._steps(work, gguf, store, train, reps, sh)
profiles = rr._profiles(work, store, sh)
m = machine()
m["command"] = f"python benchmarks/results/2026-12-07-cpu-real-steps.py {work} {reps}"
rows = [f"SmolLM2-135M-Instruct (Q4_1 GGUF; stored fp32), batch {sh.batch} x {sh.seq}, AdamW, LoRA rank 8 q/k/v/o "
        f"in both; median s/step over steps 2-{sh.steps}, {reps} run(s) of each, alternated; peak anonymous memory "
        "(RssAnon). blocktune from the CLI with no budget flags, `--compute-dtype` as the row says. bf16: blocktune "
        "computes in bf16 with fp32 adapters, masters and moments; transformers LoRA on bf16 weights with peft's fp32 "
        "adapters, full under torch.autocast(bf16) with fp32 weights and moments.", "",
        f"A {'x'.join(map(str, ratio['shape']))} matmul here: fp32 {ratio['gflops']['fp32']:.0f} GFLOP/s, bf16 "
        f"{ratio['gflops']['bf16']:.0f} GFLOP/s ({ratio['bf16_over_fp32']:.2f}x), side by side in one process. "
        f"`--compute-dtype auto` here: {'bf16' if cpu_bf16()[0] else 'fp32'} ({cpu_bf16()[1]}).", "",
        "| dtype | method | run | s/step | ratio to transformers (same dtype) | bf16 against blocktune fp32 | peak anonymous | ratio |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
med = {}
for r in runs:
    med.setdefault((r["dtype"], r["method"], r["who"]), []).append(r)
for (dtype, method, who), rs in med.items():
    s = statistics.median(x["step_median"] for x in rs)
    a = max(x["anon_peak"] for x in rs)
    hf = med[(dtype, method, "transformers")]
    hs, ha = statistics.median(x["step_median"] for x in hf), max(x["anon_peak"] for x in hf)
    fp = med.get(("fp32", method, who))
    speed = f"{statistics.median(x['step_median'] for x in fp) / s:.2f}x faster" if dtype == "bf16" and fp else ""
    rows.append(f"| {dtype} | {method} | {who} | {s:.2f} | {s / hs:.2f} | {speed} | {a / 1e9:.2f} GB | {a / ha:.2f} |")
rows += ["", "One profiled no-flag step (`blocktune_bench.measure --profile`, random tokens, after two timed steps; "
         "operators' own seconds on the computing thread, a full fine-tune's optimizer step runs on the write-back "
         "thread):", "", "| dtype | method | wall | matmul | attention | widen/copy | other ops | write thread | "
         "minor faults | user s | system s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
for p in profiles:
    k = p["op_self_s_by_kind"]
    rows.append(f"| {p['dtype']} | {p['method']} | {p['wall_s']:.2f} | {k.get('matmul', 0):.2f} | "
                f"{k.get('attention', 0):.2f} | {k.get('widen/copy', 0):.2f} | {k.get('other', 0):.2f} | "
                f"{p.get('write_thread_s', 0):.2f} | {p['rusage']['minor_faults']:,} | {p['rusage']['user_s']:.2f} | "
                f"{p['rusage']['system_s']:.2f} |")
rows += ["", "What blocktune chose (its log): " + "; ".join(sorted({c for r in runs for c in r.get("chose", [])}))[:1500]]
save("real-steps", {"machine": m, "shape": sh.__dict__, "matmul": ratio, "runs": runs, "profiles": profiles}, rows)
