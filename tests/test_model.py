"""The model is Meta's Llama 2: FFN widths, rotary embeddings, GQA, config checks."""

import pytest
import torch
from blocktune import PRESETS, ConfigError, LoraConfig, ModelArgs
from blocktune.machine.devices import resolve_device
from blocktune.model.llama import Block, Transformer, apply_rope, rope_tables


@pytest.mark.parametrize("name,hidden", [("llama-2-7b", 11008), ("llama-2-13b", 13824),
                                         ("llama-2-70b", 28672), ("codellama-7b", 11008)])
def test_ffn_width_matches_meta(name, hidden):
    assert PRESETS[name].hidden_dim == hidden


def test_param_count_of_7b():
    assert PRESETS["llama-2-7b"].n_params() == 6_738_415_616  # Meta's model card: 6.7B


def test_rope_equals_meta_complex_form():
    """Meta multiplies (x[2i], x[2i+1]) as complex numbers by e^{i·pos·θ_i}; written out here."""
    B, T, H, D = 2, 7, 3, 8
    x = torch.randn(B, T, H, D)
    freqs = 1.0 / (500000.0 ** (torch.arange(0, D, 2)[: D // 2].float() / D))
    angles = torch.outer(torch.arange(T).float(), freqs)
    cis = torch.polar(torch.ones_like(angles), angles)
    xc = torch.view_as_complex(x.reshape(B, T, H, D // 2, 2))
    want = torch.view_as_real(xc * cis[None, :, None, :]).flatten(3)
    cos, sin = rope_tables(D, torch.arange(T), 500000.0)
    torch.testing.assert_close(apply_rope(x, cos, sin), want, rtol=1e-6, atol=1e-6)


def test_gqa_equals_mha_with_repeated_heads():
    torch.manual_seed(0)
    gqa = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=16, multiple_of=8)
    mha = gqa.replace(n_kv_heads=None)
    a, b = Block(gqa), Block(mha)
    sd = a.state_dict()
    hd = gqa.head_dim
    for w in ("wk", "wv"):  # each kv head serves two query heads
        kv = sd[f"attention.{w}.weight"].view(2, hd, 32)
        sd[f"attention.{w}.weight"] = kv.repeat_interleave(2, dim=0).reshape(4 * hd, 32)
    b.load_state_dict(sd)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-6)


def test_causal_mask_and_lora_start_at_base():
    args = ModelArgs(dim=16, n_layers=2, n_heads=2, vocab_size=32, multiple_of=8)
    base = Transformer(args).eval()
    tok = torch.randint(0, 32, (1, 9))
    full = base(tok)
    assert torch.allclose(base(tok[:, :5]), full[:, :5], atol=1e-6)  # no peeking ahead
    from blocktune.model.lora import add_lora, init_lora_

    lora = add_lora(Transformer(args), LoraConfig(rank=2, targets=("wq", "w3"))).eval()
    sd = {**base.state_dict()}
    init_lora_(lora)
    assert sum(".lora_" in k for k in lora.state_dict()) == 2 * 2 * args.n_layers  # A and B on wq, w3
    sd.update({k: v for k, v in lora.state_dict().items() if "lora_" in k})
    lora.load_state_dict(sd)
    assert torch.equal(lora(tok), full)  # B = 0: the adapters start as the identity


def test_params_json_round_trip_and_errors(tmp_path):
    # the params.json files Meta ships (vocab_size -1: read from the tokenizer), written out here,
    # and the FFN widths of the checkpoints they describe (w1's rows in consolidated.*.pth)
    meta = {"llama-2-7b": ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                            "vocab_size": -1}, 11008),
            "llama-2-13b": ({"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05,
                             "vocab_size": -1}, 13824),
            "llama-2-70b": ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64,
                             "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}, 28672)}
    for name, (params, ffn) in meta.items():
        args = ModelArgs.from_params({**params, "vocab_size": 32000})
        assert args.hidden_dim == ffn and args == PRESETS[name], name
        assert args.to_params() == {**params, "vocab_size": 32000}
    with pytest.raises(ConfigError, match="n_kv_heads=3 must divide n_heads=8"):
        ModelArgs(dim=64, n_heads=8, n_kv_heads=3)
    with pytest.raises(ConfigError, match="unknown key.*'dimension'"):
        ModelArgs.from_params({"dimension": 4096, "dim": 1, "n_layers": 1, "n_heads": 1})
    with pytest.raises(ConfigError, match="vocab_size is -1"):
        ModelArgs.from_params({"dim": 64, "n_layers": 1, "n_heads": 1, "vocab_size": -1})
    (tmp_path / "params.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ModelArgs.from_file(tmp_path / "params.json")
    assert LoraConfig(targets=("wq", "gate_proj")).targets == ("wq", "w1")  # Hugging Face's names too
    with pytest.raises(ConfigError, match="unknown LoRA target"):
        LoraConfig(targets=("wq", "gate"))


def test_devices_resolve_and_probe():
    cpu = resolve_device("cpu")
    assert torch.float32 in cpu.compute_dtypes and cpu.default_dtype() == torch.float32
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu")
    state = cpu.get_rng_state()
    a = torch.rand(3)
    cpu.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


@pytest.mark.parametrize("lora", [None, LoraConfig(rank=4, dropout=0.1, targets=("wq", "w2"))])
def test_recompute_for_backward_gives_the_same_gradients(lora, tiny_args):
    """The recompute skips w2's product; every gradient must still be F.linear's, bit for bit."""
    import dataclasses

    args = dataclasses.replace(tiny_args, resid_dropout=0.1, attn_dropout=0.1)
    torch.manual_seed(0)
    from blocktune.engine.recompute import skip_unread_product
    from blocktune.model.lora import add_lora

    block = Block(args) if lora is None else add_lora(Block(args), lora)
    block.train()
    for p in block.parameters():  # LoRA B starts at zero: give the adapters a real gradient path
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 9, args.dim)
    g = torch.randn(2, 9, args.dim)

    from torch.utils.flop_counter import FlopCounterMode

    flops = {}

    def grads(tail: bool):
        block.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(1)
        with FlopCounterMode(display=False) as count:
            if tail:
                with skip_unread_product(block):
                    out = block(xi)
            else:
                out = block(xi)
        flops[tail] = count.get_total_flops()
        out.backward(g)
        return [xi.grad] + [p.grad for p in block.parameters() if p.grad is not None]

    plain, tail = grads(False), grads(True)
    assert flops[False] - flops[True] == 2 * 2 * 9 * args.hidden_dim * args.dim  # w2's product, skipped
    assert len(plain) == len(tail) > 1
    assert all(torch.equal(a, b) for a, b in zip(plain, tail))
    assert type(block.feed_forward.w2).__name__ in ("Linear", "LoraLinear")  # swapped back


def test_top_k_and_top_p_sampling():
    """Sampling draws only from the top k / the smallest set reaching top_p, with the renormalised
    probabilities (5,000 draws per case, compared with the exact distribution)."""
    from blocktune.run.generate import SamplingConfig, sample_next

    logits = torch.log(torch.tensor([[0.05, 0.30, 0.10, 0.40, 0.15]]))
    probs = torch.softmax(logits, -1)[0]
    gen = torch.Generator().manual_seed(0)

    def draws(cfg, n=5000):
        return torch.bincount(torch.cat([sample_next(logits, cfg, gen) for _ in range(n)]), minlength=5).float() / n

    assert int(sample_next(logits, SamplingConfig(temperature=0.0), gen)) == 3  # greedy
    for cfg, allowed in ((SamplingConfig(temperature=1.0, top_k=2), [3, 1]),
                         (SamplingConfig(temperature=1.0, top_p=0.8), [3, 1, 4]),  # 0.40 + 0.30 < 0.8 <= +0.15
                         (SamplingConfig(temperature=1.0, top_p=0.35), [3]),
                         (SamplingConfig(temperature=1.0, top_k=4, top_p=0.75), [3, 1, 4])):
        got = draws(cfg)
        want = torch.zeros(5)
        want[allowed] = probs[allowed] / probs[allowed].sum()
        assert got[[i for i in range(5) if i not in allowed]].sum() == 0, cfg
        assert (got - want).abs().max() < 0.03, (cfg, got, want)
    # temperature: 0.5 sharpens towards the top token
    hot = draws(SamplingConfig(temperature=0.5))
    assert abs(hot[3] - torch.softmax(logits / 0.5, -1)[0, 3]) < 0.03


def _plain_swiglu(self, x):  # autograd's own graph of the SwiGLU, as the spec once wrote it
    import torch.nn.functional as F

    return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _plain_norm(self, x):  # autograd's own graph of the RMSNorm, as Meta writes it
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def _plain_lora(self, x, y):  # autograd's own graph of the LoRA term, as peft writes it
    import torch.nn.functional as F

    if self.lora_a.dtype != x.dtype:  # fp32 adapters beside bf16 compute, as the engine runs them
        return y + (F.linear(F.linear(self.lora_dropout(x).float(), self.lora_a), self.lora_b)
                    * self.scale).to(y.dtype)
    return y + F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b) * self.scale


@pytest.mark.parametrize("lora,dtype", [(None, torch.float32), (None, torch.bfloat16),
                                        (LoraConfig(rank=4, dropout=0.1), torch.float32),
                                        (LoraConfig(rank=4, dropout=0.1), torch.bfloat16),
                                        (LoraConfig(rank=4, dropout=0.0), torch.bfloat16)])
def test_a_kept_block_saves_less_with_the_same_gradients(lora, dtype, tiny_args, monkeypatch):
    """The SwiGLU, the RMSNorms and the LoRA term keep less for the backward than autograd's graph
    of the same arithmetic (silu's output; the norms' input widened to fp32; dropout's noise and
    the dropped inputs, widened to fp32 for fp32 adapters beside bf16 compute), and give its
    output and every gradient bit for bit, summed in the same order."""
    import dataclasses

    from blocktune.model.llama import FeedForward, RMSNorm
    from blocktune.model.lora import LoraLinear, add_lora

    args = dataclasses.replace(tiny_args, resid_dropout=0.1, attn_dropout=0.1)
    torch.manual_seed(0)
    block = Block(args) if lora is None else add_lora(Block(args), lora)
    block.train()
    for name, p in block.named_parameters():
        torch.nn.init.normal_(p, std=0.05)  # LoRA B starts at zero: give the adapters a real gradient path
        p.requires_grad_(lora is None or ".lora_" in name)
        if ".lora_" not in name:
            p.data = p.data.to(dtype)
    x, g = torch.randn(2, 9, args.dim, dtype=dtype), torch.randn(2, 9, args.dim, dtype=dtype)

    def run():
        block.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        saved = []
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = block(xi)
        out.backward(g)
        weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
        acts = {t.untyped_storage().data_ptr(): t for t in saved if t.untyped_storage().data_ptr() not in weights}
        return ([out.detach(), xi.grad] + [p.grad for p in block.parameters() if p.grad is not None],
                sum(t.untyped_storage().nbytes() for t in acts.values()))

    mine, kept = run()
    monkeypatch.setattr(FeedForward, "forward", _plain_swiglu)
    monkeypatch.setattr(LoraLinear, "add_delta", _plain_lora)
    monkeypatch.setattr(RMSNorm, "forward", _plain_norm)
    plain, plain_kept = run()
    assert len(mine) == len(plain) > 2
    assert all(torch.equal(a, b) for a, b in zip(mine, plain))
    silu_out = x.shape[0] * x.shape[1] * args.hidden_dim * x.element_size()
    assert plain_kept - kept >= silu_out, (kept, plain_kept)
    if lora is not None and lora.dropout:  # the noise and dropped inputs of 4 adapters, less a bool mask each
        assert kept < 0.75 * plain_kept, (kept, plain_kept)
    if dtype != torch.float32:  # the norms' inputs widened to fp32, and the dropped inputs (wq, wk, wv)
        widened = 2 * x.numel() * 2 + (0 if lora is None else 2 * x.numel() * 4)
        assert plain_kept - kept >= silu_out + widened, (kept, plain_kept)


def test_the_lora_backward_draws_no_dropout_noise(tiny_args):
    """The backward makes each adapter's dropout noise from the forward's mask: the CPU's generator
    is slow (about 170 M elements a second), and drawing every mask again in the backward had
    cost a real model's LoRA step (SmolLM2, 4 x 256) a tenth of its time."""
    from blocktune.model.lora import add_lora
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    block = add_lora(Block(tiny_args), LoraConfig(rank=4, dropout=0.1))
    block.train()
    for name, p in block.named_parameters():
        p.requires_grad_(".lora_" in name)
    out = block(torch.randn(2, 9, tiny_args.dim, requires_grad=True))
    g = torch.randn_like(out)
    with Ops() as ops:
        out.backward(g)
    assert ops.names and not [n for n in ops.names if "bernoulli" in n or "rand" in n], ops.names


def test_the_first_rope_tables_of_a_process_are_its_later_ones():
    """torch 2.13's first CPU cos in a process gave half its result up to 1.5e-4 off in about 2 of 5
    fresh processes (`llama._warm_trig`): a paged run's first block computed another forward. In 10
    fresh processes, the first tables are bit for bit the second (all 10 by chance on a build
    without the warm-up: about 1 in 170)."""
    import subprocess
    import sys

    script = ("import torch; from blocktune.model.llama import rope_tables; p = torch.arange(128); "
              "a = rope_tables(128, p, 10000.0); b = rope_tables(128, p, 10000.0); "
              "print(all(torch.equal(x, y) for x, y in zip(a, b)))")
    # one after another: side by side, the processes' threads were never idle at the first call,
    # and the fault did not show
    answers = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True).stdout.strip()
               for _ in range(10)]
    assert answers == ["True"] * 10, answers
