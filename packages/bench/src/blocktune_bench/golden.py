"""Golden outputs: small numbers that pin the model's math across versions of the code.

For a few synthetic presets (deterministic weights): the first-forward logits (a digest plus
a slice and summary statistics), the losses of 3 training steps (LoRA and full, dropout on),
greedy tokens, and the norms and hashes of the updated tensors. The engine and the reference
share the model code, so they could drift together; these numbers cannot.

Regenerate with one command: ``nox -s golden`` (``python -m blocktune_bench.golden --write``).
Compared with stated tolerances: logits and losses to 1e-5 relative, the norms of trained
tensors to 1e-4 (three AdamW steps at lr 1e-2 carry a last-bit difference in a gradient to
2e-5 of a norm: an Intel Xeon against the AMD EPYC that wrote them), greedy tokens exactly,
digests exactly only on the torch version, CPU vendor and kernel family that wrote them (BLAS
kernels differ in the last bit between CPU families, and MKL picks its kernels by vendor).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import tempfile
from pathlib import Path

import torch
from blocktune import Engine, EngineConfig, LoraConfig, OptimizerConfig

from .reference import trained_tensors
from .synthetic import SHAPES, make_store, random_batch

__all__ = ["compute_golden", "compare_golden", "GOLDEN_PATH", "REL_TOL"]

GOLDEN_PATH = Path(__file__).resolve().parents[4] / "golden" / "golden.json"
REL_TOL = 1e-5
TRAINED_TOL = 1e-4  # norms of tensors after three AdamW steps
CASES = ("tiny-7b", "tiny-70b")
SEED = 1234
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().float().numpy().tobytes()).hexdigest()[:16]




def _case(name: str, root: Path) -> dict:
    args = SHAPES[name].with_dropout(0.1)
    out: dict = {}
    store = make_store(root / f"{name}-fwd", args, seed=SEED)
    engine = Engine(store, EngineConfig(method="full", device="cpu", compute_dtype="fp32"))  # whatever the CPU
    tok, _ = random_batch(args, 2, 24, seed=0)
    logits = engine.logits(tok)
    out["logits"] = {"sha256": _digest(logits), "slice": logits[0, :3, :6].flatten().tolist(),
                     "sum": float(logits.double().sum()), "abs_mean": float(logits.double().abs().mean())}
    from blocktune.run.generate import SamplingConfig, generate_tokens

    prompt = tok[0, :5].tolist()
    out["greedy"] = list(generate_tokens(engine, prompt, SamplingConfig(16, stop_at_eos=False)))
    engine.close()
    for method in ("lora", "full"):
        store = make_store(root / f"{name}-{method}", args, seed=SEED)
        engine = Engine(store, EngineConfig(method=method, lora=LORA, device="cpu", seed=SEED, compute_dtype="fp32",
                                            optimizer=OptimizerConfig("adamw", lr=1e-2)))
        losses = [engine.train_step([random_batch(args, 2, 24, seed=10 + s)]).loss for s in range(3)]
        tensors = trained_tensors(engine)
        out[method] = {"losses": losses,
                       "norms": {k: float(v.double().norm()) for k, v in sorted(tensors.items())},
                       "sha256": {k: _digest(v) for k, v in sorted(tensors.items())}}
    return out


def _cpu_vendor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    return {"torch": torch.__version__, "machine": platform.machine(), "cpu_vendor": _cpu_vendor(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "seed": SEED}


def compute_golden() -> dict:
    torch.set_num_threads(2)  # digests depend on the thread split of reductions
    with tempfile.TemporaryDirectory() as tmp:
        return {"environment": environment(), "cases": {n: _case(n, Path(tmp)) for n in CASES}}


def _close(a: float, b: float, tol: float = REL_TOL) -> bool:
    return abs(a - b) <= tol * max(abs(a), abs(b), 1e-12)


def compare_golden(expected: dict, actual: dict) -> list[str]:
    """Every difference beyond the stated tolerances, one line each (empty: all match)."""
    diffs: list[str] = []
    # files written before the vendor was recorded were written on an AMD EPYC
    exact = {"cpu_vendor": "AuthenticAMD", **expected["environment"]} == actual["environment"]
    for name, exp in expected["cases"].items():
        act = actual["cases"][name]
        for key in ("sum", "abs_mean"):
            if not _close(exp["logits"][key], act["logits"][key]):
                diffs.append(f"{name} logits {key}: {act['logits'][key]} vs golden {exp['logits'][key]}")
        for i, (a, b) in enumerate(zip(exp["logits"]["slice"], act["logits"]["slice"])):
            if abs(a - b) > REL_TOL * max(abs(a), 1.0):
                diffs.append(f"{name} logits slice[{i}]: {b} vs golden {a}")
        if exact and exp["logits"]["sha256"] != act["logits"]["sha256"]:
            diffs.append(f"{name} logits digest {act['logits']['sha256']} vs golden {exp['logits']['sha256']}")
        if exp["greedy"] != act["greedy"]:
            diffs.append(f"{name} greedy tokens {act['greedy']} vs golden {exp['greedy']}")
        for method in ("lora", "full"):
            e, a = exp[method], act[method]
            for i, (x, y) in enumerate(zip(e["losses"], a["losses"])):
                if not _close(x, y):
                    diffs.append(f"{name} {method} loss of step {i + 1}: {y} vs golden {x}")
            for k, x in e["norms"].items():
                if k not in a["norms"] or not _close(x, a["norms"][k], TRAINED_TOL):
                    diffs.append(f"{name} {method} norm of {k}: {a['norms'].get(k)} vs golden {x}")
            if exact:
                bad = [k for k in e["sha256"] if e["sha256"][k] != a["sha256"].get(k)]
                if bad:
                    diffs.append(f"{name} {method}: digests differ for {bad[:3]}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write or check golden outputs")
    p.add_argument("--write", action="store_true", help=f"regenerate {GOLDEN_PATH}")
    p.add_argument("--path", type=Path, default=GOLDEN_PATH)
    a = p.parse_args(argv)
    actual = compute_golden()
    if a.write:
        a.path.parent.mkdir(parents=True, exist_ok=True)
        a.path.write_text(json.dumps(actual, indent=1) + "\n")
        print(f"wrote {a.path}")
        return 0
    diffs = compare_golden(json.loads(a.path.read_text()), actual)
    print("\n".join(diffs) or "golden outputs match")
    return 1 if diffs else 0


if __name__ == "__main__":
    raise SystemExit(main())
