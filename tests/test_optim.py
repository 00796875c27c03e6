"""The paged optimizer step (a piece at a time) against the whole-unit step it stands for."""

import pytest
import torch
from blocktune import OptimizerConfig
from blocktune.engine import optim
from blocktune.engine.optim import streamed_step, unit_step, whole_state


def _unit(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(17, 11, generator=g).to(dtype).float(),
            "b.weight": torch.randn(29, generator=g).to(dtype).float()}


def _run_streamed(cfg, params, grads, old, lr, dtype):
    spec, data = streamed_step(cfg, params, grads, old, lr, dtype)
    pieces = list(data)
    assert [tuple(p.shape) for p in pieces] == [shape for _, _, shape in spec]
    return {key: p.clone() for (key, _, _), p in zip(spec, pieces)}


@pytest.mark.parametrize("cfg,dtype", [
    (OptimizerConfig("adamw", lr=1e-2, weight_decay=0.1), torch.bfloat16),  # with fp32 masters
    (OptimizerConfig("adamw", lr=1e-2), torch.float32),
    (OptimizerConfig("sgd", lr=1e-1, momentum=0.9), torch.bfloat16),
    (OptimizerConfig("sgd", lr=1e-1), torch.float32),  # no state but the step count
])
def test_streamed_step_is_the_whole_step(monkeypatch, cfg, dtype):
    # pieces that cut the tensors: 64 elements, a multiple of any vector width, as the real
    # size is (the fused kernel's scalar tail rounds differently from its vector body, so
    # pieces at other boundaries agree to an ulp, not bit for bit; that case is the
    # equivalence test's, which cuts at 37)
    monkeypatch.setattr(optim, "STATE_PIECE", 64)
    whole_p, paged_p = _unit(0, dtype), _unit(0, dtype)
    shapes = {k: tuple(v.shape) for k, v in whole_p.items()}
    state, stored = None, None
    for step in range(3):
        grads = {k: torch.randn_like(v, generator=torch.Generator().manual_seed(step)) for k, v in whole_p.items()}
        state = unit_step(cfg, whole_p, grads, state, cfg.lr, dtype)
        stored = _run_streamed(cfg, paged_p, grads, stored, cfg.lr, dtype)
        for k in whole_p:
            assert torch.equal(whole_p[k], paged_p[k]), k
        joined = whole_state(stored, shapes)
        assert joined.keys() == state.keys()
        for k in state:
            assert torch.equal(joined[k], state[k]), k
    assert len(stored) > len(state) or len(state) == 1  # it was in pieces (plain SGD keeps only the count)


def test_a_whole_state_file_steps_on(monkeypatch):
    """State written whole (before pieces) is read on: the next step is the same."""
    monkeypatch.setattr(optim, "STATE_PIECE", 64)
    cfg = OptimizerConfig("adamw", lr=1e-2)
    a, b = _unit(1, torch.bfloat16), _unit(1, torch.bfloat16)
    grads = {k: torch.ones_like(v) for k, v in a.items()}
    state = unit_step(cfg, a, grads, None, cfg.lr, torch.bfloat16)
    _ = unit_step(cfg, b, grads, None, cfg.lr, torch.bfloat16)
    state2 = unit_step(cfg, a, grads, {k: v.clone() for k, v in state.items()}, cfg.lr, torch.bfloat16)
    stored = _run_streamed(cfg, b, grads, state, cfg.lr, torch.bfloat16)
    for k in a:
        assert torch.equal(a[k], b[k])
    joined = whole_state(stored, {k: tuple(v.shape) for k, v in a.items()})
    assert all(torch.equal(joined[k], state2[k]) for k in state2)
