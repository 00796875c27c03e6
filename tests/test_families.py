"""Every family blocktune reads, against transformers (and peft, tokenizers, jinja2) as the oracle.

Each checkpoint is built by transformers' own classes and written by `save_pretrained`
(`blocktune_bench.families`), its tokenizer trained by `tokenizers` on the shipped text. The
paged engine must compute what transformers computes: logits, a full fine-tune step, a LoRA step
(peft), greedy generation; the store must export back to a folder transformers loads with no
missing or unexpected keys.
"""

import json
import shutil

import pytest
import torch
from blocktune.engine.engine import Engine, EngineConfig
from blocktune.engine.optim import OptimizerConfig
from blocktune.errors import ConfigError
from blocktune.formats.hfnames import from_hf
from blocktune.formats.tokenizer import load_tokenizer
from blocktune.run.generate import SamplingConfig, generate_tokens
from blocktune_bench.corpus import corpus_text
from blocktune_bench.families import FAMILIES, make_checkpoint
from blocktune_export.hf import export_hf, import_hf
from conftest import bt as run_bt

transformers = pytest.importorskip("transformers")

FAMILY_NAMES = sorted(FAMILIES)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (HF folder, the transformers model that wrote it, the store prepared from it)."""
    out = {}
    root = tmp_path_factory.mktemp("families")
    for fam in FAMILY_NAMES:
        model = make_checkpoint(root / fam, fam)
        store = import_hf(root / fam, root / f"{fam}-store")
        out[fam] = (root / fam, model, store)
    return out


def _engine(store, **kw):
    return Engine(store, EngineConfig(device="cpu", compute_dtype="fp32", **kw))


def _tokens(vocab: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_logits_equal_transformers(checkpoints, family):
    """fp32 logits to 1e-5, over 120 positions: past original_max_position_embeddings (64) for
    the llama3 and yarn scalings, whose settings put frequencies in every band."""
    _, model, store = checkpoints[family]
    assert store.args.family == {"llama3": "llama"}.get(family, family)
    tok = _tokens(store.args.vocab_size, 2, 120)
    with torch.no_grad():
        want = model(tok).logits
    eng = _engine(store, read_only=True)
    got = eng.logits(tok)
    eng.close()
    assert (got - want).abs().max().item() < 1e-5


def test_each_family_setting_reaches_the_store(checkpoints):
    args = {f: checkpoints[f][2].args for f in FAMILY_NAMES}
    assert args["llama3"].rope_scaling["rope_type"] == "llama3" and args["llama3"].rope_theta == 500000.0
    assert args["llama3"].tie_embeddings and len(args["llama3"].eos_token_ids) == 2
    assert args["qwen2"].qkv_bias and not args["qwen2"].o_bias and args["qwen2"].rope_scaling["rope_type"] == "yarn"
    assert args["qwen3"].qk_norm and args["qwen3"].head_dim == 32 != args["qwen3"].dim // args["qwen3"].n_heads
    assert args["mistral"].sliding_window == 128
    # tied: one tensor in the store (the head file holds the norm only)
    store = checkpoints["llama3"][2]
    assert set(store.record("head").tensors) == {"norm.weight"}
    assert torch.equal(store.read_unit("head")["output.weight"], store.read_unit("embed")["tok_embeddings.weight"])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_export_loads_in_transformers(checkpoints, family, tmp_path):
    src, model, store = checkpoints[family]
    out = export_hf(store, tmp_path / "hf", dtype=torch.float32)
    back, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tok = _tokens(store.args.vocab_size, 1, 40)
    with torch.no_grad():
        assert torch.equal(back.eval()(tok).logits, model(tok).logits)
    # config and tokenizer files come back as they went in (dtype aside)
    cfg_in, cfg_out = (json.loads((d / "config.json").read_text()) for d in (src, out))
    assert {k: v for k, v in cfg_out.items() if k != "dtype"} == {k: v for k, v in cfg_in.items() if k != "dtype"}
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        if (src / name).exists():
            assert (out / name).read_bytes() == (src / name).read_bytes()
    if store.args.tie_embeddings:
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_greedy_generation_equals_transformers(checkpoints, family):
    _, model, store = checkpoints[family]
    prompt = _tokens(store.args.vocab_size, 1, 12, seed=3)[0].tolist()
    eng = _engine(store, read_only=True)
    ours = list(generate_tokens(eng, prompt, SamplingConfig(20, stop_at_eos=False)))
    eng.close()
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_full_sgd_step_equals_transformers(checkpoints, family, tmp_path):
    """One plain-SGD full fine-tune step: every updated weight equals transformers' step, tied
    embeddings included (the head's and the embedding's gradients summed into one tensor)."""
    src, model, _ = checkpoints[family]
    store = import_hf(src, tmp_path / "store")
    tok = _tokens(store.args.vocab_size, 2, 33, seed=5)
    x, y = tok[:, :-1], tok[:, 1:]
    lr = 0.5
    ref = transformers.AutoModelForCausalLM.from_pretrained(src).train()
    logits = ref(x).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= lr * p.grad
    eng = _engine(store, method="full", optimizer=OptimizerConfig(name="sgd", lr=lr), loss_chunk=16)
    eng.train_step([(x, y)])
    eng.close()
    out = export_hf(store, tmp_path / "after", dtype=torch.float32)
    got = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    want = ref.state_dict()
    changed = 0
    for k, w in want.items():
        assert (got[k] - w).abs().max().item() < 2e-6, k
        changed += not torch.equal(w, model.state_dict()[k])
    assert changed == len(want)  # every tensor moved, so each comparison above means something


def _peft_to_ours(peft_model, args) -> dict[str, torch.Tensor]:
    """peft's lora_A/lora_B as blocktune adapter keys (q/k rows into Meta's rotary layout)."""
    out = {}
    names = {"q_proj": ("attention.wq", args.n_heads), "v_proj": ("attention.wv", None)}
    for k, p in peft_model.named_parameters():
        if "lora_" not in k:
            continue
        layer = int(k.split(".layers.")[1].split(".")[0])
        mod = k.split(".self_attn.")[1].split(".")[0]
        ours, heads = names[mod]
        t = p.detach().clone()
        if "lora_A" in k:
            out[f"layers.{layer}.{ours}.lora_a"] = t
        else:
            out[f"layers.{layer}.{ours}.lora_b"] = from_hf(t, heads) if heads else t
    return out


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_step_equals_peft(checkpoints, family):
    peft = pytest.importorskip("peft")
    from blocktune.model.args import LoraConfig

    src, _, store = checkpoints[family]
    base = transformers.AutoModelForCausalLM.from_pretrained(src)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   lora_dropout=0.0))
    with torch.no_grad():  # B = 0 at init would make A's first gradient zero: start from B != 0
        for k, p in pm.named_parameters():
            if "lora_B" in k:
                p.copy_(torch.randn_like(p) * 0.05)
    start = _peft_to_ours(pm, store.args)
    tok = _tokens(store.args.vocab_size, 2, 25, seed=7)
    x, y = tok[:, :-1], tok[:, 1:]
    lr = 0.3
    pm.train()
    logits = pm(input_ids=x).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=lr)
    opt.step()
    eng = _engine(store, method="lora", lora=LoraConfig(rank=4, alpha=8, dropout=0.0, targets=("wq", "wv")),
                  optimizer=OptimizerConfig(name="sgd", lr=lr))
    eng.load_adapters(start)
    eng.train_step([(x, y)])
    got, want = eng.adapter_state(), _peft_to_ours(pm, store.args)
    eng.close()
    assert set(got) == set(want)
    for k in want:
        assert not torch.equal(want[k], start[k]), k
        assert (got[k] - want[k]).abs().max().item() < 1e-6, k


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3"])
def test_tokenizer_equals_autotokenizer(checkpoints, family):
    src, _, store = checkpoints[family]
    ours = load_tokenizer(store)
    theirs = transformers.AutoTokenizer.from_pretrained(src)
    for line in corpus_text(60_000).splitlines()[:300]:
        assert ours.encode(line) == theirs(line)["input_ids"], line
    text = corpus_text(20_000)
    ids = ours.encode(text)
    assert ids == theirs(text)["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert (ours.bos_id is None) == (family != "llama3")


def test_unknown_config_fields_and_rope_types_are_refused(checkpoints, tmp_path):
    src = checkpoints["llama3"][0]
    for change, needle in (({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 5e5, "factor": 2.0}},
                            "dynamic"),
                           ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
                           ({"hidden_act": "gelu"}, "gelu"),
                           ({"architectures": ["GemmaForCausalLM"], "model_type": "gemma"}, "Gemma"),
                           ({"sliding_window": 64}, "sliding_window")):
        bad = tmp_path / f"bad-{needle}"
        shutil.copytree(src, bad)
        cfg = json.loads((bad / "config.json").read_text())
        cfg.update(change)
        (bad / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ConfigError, match=needle):
            import_hf(bad, tmp_path / f"store-{needle}")
        assert not (tmp_path / f"store-{needle}").exists()


def test_llama2_rope_theta_inside_rope_parameters(tmp_path):
    """transformers 5 writes rope_theta inside rope_parameters: a Llama-2 folder with theta 1e6
    must be prepared as 1e6 (it was read as 10000), and compute transformers' logits."""
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=128,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    assert "rope_theta" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    store = import_hf(tmp_path / "hf", tmp_path / "store")
    assert store.args.rope_theta == 1e6
    tok = _tokens(256, 1, 64)
    with torch.no_grad():
        want = model(tok).logits
    assert (_engine(store, read_only=True).logits(tok) - want).abs().max().item() < 1e-5


def test_sequence_past_the_sliding_window_is_refused(checkpoints):
    store = checkpoints["mistral"][2]
    eng = _engine(store, method="lora")
    tok = _tokens(store.args.vocab_size, 1, 130)
    with pytest.raises(ConfigError, match="sliding_window 128"):
        eng.train_step([(tok, tok)])
    eng.close()


CHAT = [{"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "How do I keep basil alive?"},
        {"role": "assistant", "content": "Water at the roots, not the leaves."},
        {"role": "user", "content": "And tomatoes?"},
        {"role": "assistant", "content": "Sun, steady water and a stake to climb."}]


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_chat_rendering_equals_apply_chat_template(checkpoints, family):
    from blocktune.formats.chat import chat_tokens, prompt_tokens, render_chat

    src, _, store = checkpoints[family]
    ours = load_tokenizer(store)
    theirs = transformers.AutoTokenizer.from_pretrained(src)
    for msgs in (CHAT, CHAT[1:], CHAT[1:3]):
        assert render_chat(ours, msgs) == theirs.apply_chat_template(msgs, tokenize=False)
        ids, trained = chat_tokens(ours, msgs)
        want = theirs.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
        assert ids == list(want)
        # trained on: exactly the assistant turns, each with its end-of-turn token
        spoken = ours.tk.decode([i for i, t in zip(ids, trained) if t], skip_special_tokens=False)
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        assert all(a in spoken for a in answers) and "user" not in spoken and "basil" not in spoken
        assert spoken.count(ours.token_text("eos_token")) == len(answers)
    ask = prompt_tokens(ours, CHAT[:2])
    assert ask == list(theirs.apply_chat_template(CHAT[:2], add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])


def test_llama2_inst_format_masks_the_prompts():
    from blocktune.formats.chat import chat_tokens
    from blocktune.formats.tokenizer import Tokenizer
    from blocktune_bench.corpus import tokenizer_path

    tok = Tokenizer(tokenizer_path())
    ids, trained = chat_tokens(tok, CHAT)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 2 and ids.count(tok.eos_id) == 2
    spoken = tok.sp.decode([i for i, t in zip(ids, trained) if t])
    assert "roots" in spoken and "stake" in spoken and "basil" not in spoken
    assert "<<SYS>>" in tok.sp.decode(ids) and "[/INST]" in tok.sp.decode(ids)


def test_an_id_past_the_tokenizers_pieces_decodes_to_nothing():
    """A model whose vocabulary is padded beyond its sentencepiece tokenizer's can sample an id
    the tokenizer has no piece for: it has no text (as in Hugging Face's tokenizers), where
    sentencepiece raised IndexError out of `blocktune generate`."""
    from blocktune.formats.tokenizer import Tokenizer
    from blocktune_bench.corpus import tokenizer_path

    tok = Tokenizer(tokenizer_path())
    ids = tok.encode("The lighthouse keeper", bos=False)
    assert tok.decode(ids + [tok.vocab_size, tok.vocab_size + 7] + ids) == tok.decode(ids + ids)


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_three_adamw_steps_equal_transformers(checkpoints, family, tmp_path):
    """Paged full fine-tune, three AdamW steps with every unit left resident between steps: a
    tied head must see the embeddings' update (it holds its own copy of the matrix)."""
    src, model, _ = checkpoints[family]
    store = import_hf(src, tmp_path / "store")
    ref = transformers.AutoModelForCausalLM.from_pretrained(src).train()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0, foreach=False)
    eng = _engine(store, method="full", optimizer=OptimizerConfig(name="adamw", lr=1e-2), loss_chunk=16)
    for step in range(3):
        tok = _tokens(store.args.vocab_size, 2, 17, seed=10 + step)
        x, y = tok[:, :-1], tok[:, 1:]
        logits = ref(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        ours = eng.train_step([(x, y)])
        assert abs(ours.loss - loss.item()) < 1e-5 * loss.item(), step
    eng.close()
    got = transformers.AutoModelForCausalLM.from_pretrained(export_hf(store, tmp_path / "hf", dtype=torch.float32))
    start = model.state_dict()
    for k, w in ref.state_dict().items():
        # Adam divides by the gradient's own scale, so where that is near zero (an embedding row
        # of a token seen once, q_proj behind Qwen3's q_norm) fp32 rounding of the gradient moves
        # single elements: compare the whole change of each tensor instead. Most agree to 1e-5
        # of their change; Qwen3's first q_proj to 1.1e-3 here (under 1e-3 where it was written): 1e-2
        # still fails any wrong step, which is off by the size of the change itself
        change = (w - start[k]).norm()
        assert change > 0 and (got.state_dict()[k] - w).norm() < 1e-2 * change, k


def test_cli_chat_finetune_generate_export(checkpoints, tmp_path):
    """A new user's path with an HF folder: prepare, LoRA on chat rows, generate --chat, export
    (back to HF by default), load the export in transformers."""
    import subprocess
    import sys

    src = checkpoints["qwen2"][0]
    rows = [{"messages": CHAT}] * 12
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

    def bt(*args):
        return run_bt(*args, check=True)

    bt("prepare", src, tmp_path / "store")
    bt("finetune", "--store", tmp_path / "store", "--data", tmp_path / "chat.jsonl", "--method", "lora",
       "--steps", "2", "--seq-len", "96", "--out", tmp_path / "run")
    r = bt("generate", "--store", tmp_path / "store", "--adapter", tmp_path / "run" / "adapter.safetensors",
           "--chat", "--prompt", "How do I keep basil alive?", "--max-new-tokens", "5")
    assert "tokens in" in r.stderr
    bt("export", tmp_path / "store", tmp_path / "hf", "--adapter", tmp_path / "run" / "adapter.safetensors")
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    r = subprocess.run([sys.executable, "-m", "blocktune", "export", str(tmp_path / "store"), str(tmp_path / "meta"),
                        "--format", "meta"], capture_output=True, text=True)
    assert r.returncode != 0 and "--format hf" in r.stderr and not (tmp_path / "meta").exists()


def test_bf16_store_keeps_frozen_embeddings_and_head_narrow(tmp_path):
    """A bf16 store under fp32 compute: the frozen embeddings and head stay bf16 in memory (the
    head widened a slice at a time, in the forward and the backward) and compute what
    transformers computes with the same weights widened. A LoRA step through them equals peft's."""
    from blocktune.model.args import LoraConfig
    from blocktune.model.llama import _SlicedCastLinear

    peft = pytest.importorskip("peft")
    make_checkpoint(tmp_path / "hf", "qwen3", dtype=torch.bfloat16)
    store = import_hf(tmp_path / "hf", tmp_path / "store")
    assert store.dtype == torch.bfloat16
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tok = _tokens(store.args.vocab_size, 2, 40)
    rows = _SlicedCastLinear.ROWS
    _SlicedCastLinear.ROWS = 100  # several slices of the 496-row head
    try:
        eng = _engine(store, read_only=True)
        got = eng.logits(tok)
        assert eng.pager.get("head")["output.weight"].dtype == torch.bfloat16
        assert eng.pager.get("block_00")["attention.wq.weight"].dtype == torch.float32
        eng.close()
        with torch.no_grad():
            assert (got - model(tok).logits).abs().max().item() < 1e-5
        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for k, p in pm.named_parameters():
                if "lora_B" in k:
                    p.copy_(torch.randn_like(p) * 0.05)
        start = _peft_to_ours(pm, store.args)
        x, y = tok[:, :-1], tok[:, 1:]
        logits = pm.train()(input_ids=x).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
        torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.3).step()
        eng = _engine(store, method="lora", lora=LoraConfig(rank=4, alpha=8, dropout=0.0, targets=("wq", "wv")),
                      optimizer=OptimizerConfig(name="sgd", lr=0.3))
        eng.load_adapters(start)
        eng.train_step([(x, y)])
        want = _peft_to_ours(pm, store.args)
        for k, v in eng.adapter_state().items():
            assert (v - want[k]).abs().max().item() < 1e-6, k
        eng.close()
    finally:
        _SlicedCastLinear.ROWS = rows


def test_lora_adapters_stay_fp32_under_bf16_compute(checkpoints):
    """As peft keeps them: under bf16 compute the adapters and their AdamW state are fp32, so an
    update far below a bf16 ulp of the adapter still lands (bf16 adapters rounded it away)."""
    from blocktune.model.args import LoraConfig

    _, _, store = checkpoints["qwen3"]
    eng = Engine(store, EngineConfig(device="cpu", compute_dtype="bf16", method="lora",
                                     lora=LoraConfig(rank=4, alpha=8, dropout=0.0, targets=("wq", "wv")),
                                     optimizer=OptimizerConfig(name="sgd", lr=1e-6)))
    start = eng.adapter_state()
    g = torch.Generator().manual_seed(0)
    eng.load_adapters({k: v if k.endswith("lora_a") else 0.05 * torch.randn(v.shape, generator=g)
                       for k, v in start.items()})  # B != 0, so A has a gradient
    before = {k: v.clone() for k, v in eng.adapter_state().items()}
    assert all(v.dtype == torch.float32 for v in before.values())
    tok = _tokens(store.args.vocab_size, 1, 17)
    eng.train_step([(tok[:, :-1], tok[:, 1:])])
    after = eng.adapter_state()
    eng.close()
    landed = 0
    for k in before:
        if k.endswith("lora_a"):
            change = (after[k] - before[k]).abs().max().item()
            ulp = before[k].abs().max().item() * 2 ** -8
            assert change < ulp / 10, k  # a tenth of a bf16 ulp at most...
            landed += change > 0  # ...and it landed
    assert landed == store.args.n_layers * 2


def test_hostile_hf_folders_are_refused_before_anything_is_read(checkpoints, tmp_path):
    """An index naming a file outside the folder is refused, not followed; a config claiming a
    billion layers is refused before a unit name is made for each (it took 22 s and 3.5 GB)."""
    src = checkpoints["qwen3"][0]
    bad = tmp_path / "outside"
    shutil.copytree(src, bad)
    keys = json.loads(json.dumps({"weight_map": {}}))
    from safetensors import safe_open

    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        keys["weight_map"] = {k: "model.safetensors" for k in f.keys()}
    keys["weight_map"][next(iter(keys["weight_map"]))] = "../../../../etc/passwd"
    (bad / "model.safetensors.index.json").write_text(json.dumps(keys))
    r = run_bt("prepare", str(bad), str(tmp_path / "s1"))
    assert r.returncode != 0 and "../../../../etc/passwd" in r.stderr and "not in" in r.stderr, r.stderr
    huge = tmp_path / "huge"
    shutil.copytree(src, huge)
    cfg = json.loads((huge / "config.json").read_text())
    cfg["num_hidden_layers"] = 10**9
    (huge / "config.json").write_text(json.dumps(cfg))
    r = run_bt("prepare", str(huge), str(tmp_path / "s2"))
    assert r.returncode != 0 and "num_hidden_layers 1000000000" in r.stderr, r.stderr
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()
