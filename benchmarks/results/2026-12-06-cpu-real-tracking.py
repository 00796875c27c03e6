"""The real group's bf16-against-fp32 tracking alone (losses, not timings: it may share the CPU):
python real_tracking.py WORKDIR [BLOCKTUNE.json] -> benchmarks/results/<date>-cpu-real-tracking.{json,md}

With BLOCKTUNE.json (an earlier output of this script), blocktune's pairs are taken from it as
recorded there (its commit is kept) and only transformers' pairs run now; without it, both."""
import json
import sys
from pathlib import Path

import blocktune_bench.run_real as rr
from blocktune_bench.common import machine, save

work = Path(sys.argv[1])
sh = rr.Shape()
gguf, store, train, _ = rr.real_inputs(work)
m = machine()
m["command"] = f"python real_tracking.py {' '.join(sys.argv[1:])}"
if len(sys.argv) > 2:
    recorded = json.loads(Path(sys.argv[2]).read_text())
    m["blocktune_commit"] = recorded["machine"]["commit"]
    tracking = []
    for t in recorded["tracking"]:
        hf = {dt: rr.hf_losses(gguf, train, t["method"], sh, dt) for dt in rr.DTYPES}
        tracking.append(rr.compared(t["method"], t["losses"], hf))
        print(json.dumps(tracking[-1]), flush=True)
else:
    tracking = rr._tracking(work, gguf, store, train, sh)
rows = [f"SmolLM2-135M-Instruct (Q4_1 GGUF; stored fp32), batch {sh.batch} x {sh.seq}, AdamW, blocktune from the CLI: "
        f"{sh.track} steps from the same start on the same batches with `--compute-dtype bf16` and with `fp32` "
        "(warm-up 0, no other flags); bf16: computed in bf16, LoRA adapters, full fine-tune masters and moments, "
        "norms' statistics and the loss in fp32. Beside it transformers' own pair on its own batches (same learning "
        "rate; LoRA with peft on bf16 weights, full under torch.autocast(bf16) with fp32 weights). Within: every "
        f"step inside {rr.TRACK_TOL:.0%} of fp32's loss and the last ten's mean inside {rr.TRACK_TOL_LAST:.0%}, or no "
        "further from fp32 than transformers' bf16 is from its own fp32."
        + (f" blocktune's losses as recorded at commit {m['blocktune_commit']}." if "blocktune_commit" in m else ""),
        "", *rr.tracking_rows(tracking)]
save("real-tracking", {"machine": m, "shape": sh.__dict__, "tracking": tracking}, rows)
