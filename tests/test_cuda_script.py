"""The GPU script, run through on the emulated accelerator with a tiny model: every section
runs and writes its results, so a GPU's few minutes are not spent finding a broken script."""

import json

from blocktune_bench.cuda import main


def test_the_gpu_script_runs_through_on_the_emulated_device(tmp_path):
    out = tmp_path / "results"
    assert main(["--device", "emu", "--preset", "tiny-7b", "--layers", "2", "--seq", "32",
                 "--out", str(out), "--workdir", str(tmp_path)]) == 0
    data = json.loads((out / "cuda.json").read_text())["sections"]
    c = data["correctness"]
    assert c["pass"] and c["budget_held"]
    assert all(v["slot_bytes_peak"] > 0 for v in c["cases"].values())  # the units went through slots
    p = data["paged_lora_7b"]
    assert p["slot_overflows"] == 0 and p["reserved_within_allowed"]
    assert "Device slots" in (out / "cuda.md").read_text()
