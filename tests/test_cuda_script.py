"""The GPU script, run through on the emulated accelerator with a tiny model: every section
runs and writes its results, so a GPU's few minutes are not spent finding a broken script; and
its checks can fail: a wrong step or unit slots past the budget make it exit 1."""

import json

from blocktune.paging.budgets import working_set
from blocktune.paging.hosttier import HostTier
from blocktune.paging.slots import DeviceSlots
from blocktune_bench.cuda import main

DRY = ["--device", "emu", "--preset", "tiny-7b", "--layers", "2", "--seq", "32"]


def test_the_gpu_script_runs_through_on_the_emulated_device(tmp_path):
    out = tmp_path / "results"
    assert main([*DRY, "--out", str(out), "--workdir", str(tmp_path)]) == 0
    data = json.loads((out / "cuda.json").read_text())["sections"]
    c = data["correctness"]
    assert c["pass"] and c["budget_held"]
    print({k: (v["slot_bytes_peak"], v["budget"]) for k, v in c["cases"].items()})
    assert all(0 < v["slot_bytes_peak"] <= v["budget"] for v in c["cases"].values())  # alive, within
    p = data["paged_lora_7b"]
    assert p["slot_overflows"] == 0 and p["within_allowance"] and p["slots_within_budget"]
    assert "Device slots" in (out / "cuda.md").read_text()


def _paged_step_only(tmp_path) -> tuple[int, dict]:
    out = tmp_path / "results"
    code = main([*DRY, "--sections", "7b", "--out", str(out), "--workdir", str(tmp_path)])
    p = json.loads((out / "cuda.json").read_text())["sections"]["paged_lora_7b"]
    print(f"beside the slots {p['beside_slots_GB'] * 1e9:,.0f} B of {p['allowance_bytes']}")
    return code, p


def test_the_step_holds_no_more_than_its_allowance_beside_the_slots(tmp_path, monkeypatch):
    """The device memory a paged step holds beside its units' slots (on emu: the storages its
    ops make, alive at once, and the adapters' state) is within what the budgets reckon with
    and the adapters, with no slack; a working set that forgets the loss chunk fails the run."""
    code, p = _paged_step_only(tmp_path)
    allowed = sum(p["allowance_bytes"].values())
    assert code == 0 and p["within_allowance"] and 0.5 * allowed < p["beside_slots_GB"] * 1e9 <= allowed

    def no_loss_chunk(*args, **kw):
        return {**working_set(*args, **kw), "loss": 0}

    monkeypatch.setattr("blocktune_bench.cuda.working_set", no_loss_chunk)
    code, p = _paged_step_only(tmp_path)
    assert code == 1 and not p["within_allowance"] and "within: **False**" in (tmp_path / "results" / "cuda.md").read_text()


def _correctness_only(tmp_path) -> tuple[int, dict]:
    out = tmp_path / "results"
    code = main([*DRY, "--sections", "correctness", "--out", str(out), "--workdir", str(tmp_path)])
    md = (out / "cuda.md").read_text()
    assert "Correctness" in md  # written as it went, the Markdown too
    return code, json.loads((out / "cuda.json").read_text())["sections"]["correctness"]


def test_a_stale_host_tier_fails_the_fp32_check(tmp_path, monkeypatch):
    """The bug the check was written for: the host tier hands out a unit's version from before
    its write-back (looked up by unit, not by file version). One stale step is caught in fp32."""
    def stale_get(self, file):
        unit = file.split(".")[0].split("-")[0]
        for entry in self._entries.values():
            if entry.unit == unit:
                return entry.tensors
        return None

    monkeypatch.setattr(HostTier, "get", stale_get)
    code, c = _correctness_only(tmp_path)
    print(f"fp32 worst loss error {c['fp32_max_loss_rel']:.2e}, tensors {c['fp32_max_tensor_rel']:.2e}")
    assert code == 1 and not c["pass"] and c["budget_held"]
    assert c["fp32_max_tensor_rel"] > 1e-5


def test_slots_past_the_budget_fail_the_check(tmp_path, monkeypatch):
    """Slots let go by the count but kept alive (a reference left behind): the counter stays
    within its cap, the buffers alive at once do not, and the script says so."""
    leaked = []
    let_go = DeviceSlots._let_go

    def leak(self, slot):
        leaked.append(slot)
        let_go(self, slot)

    monkeypatch.setattr(DeviceSlots, "_let_go", leak)
    code, c = _correctness_only(tmp_path)
    over = {k: (v["slot_bytes_peak"], v["slot_bytes_counted"], v["budget"]) for k, v in c["cases"].items()}
    print(over)
    assert leaked
    assert all(counted <= budget for _, counted, budget in over.values())  # the counter cannot tell
    assert code == 1 and not c["budget_held"]


def test_out_of_time_skips_the_benchmark(tmp_path):
    """Past --seconds a section is skipped and says so, and the run still writes its files."""
    out = tmp_path / "results"
    assert main([*DRY, "--sections", "7b", "--seconds", "0", "--out", str(out)]) == 0
    assert json.loads((out / "cuda.json").read_text())["sections"]["store_7b"] == {"skipped": "out of time"}
