"""LoRA adapters both ways with peft: what blocktune trains, peft loads (and merges) onto the HF
model with the same logits; what peft trains and saves, blocktune uses (generate, eval, export)
and continues training. The base checkpoints are written by transformers (families fixture)."""

import json

import pytest
import torch
from blocktune.engine.engine import Engine, EngineConfig
from blocktune.engine.optim import OptimizerConfig
from blocktune.errors import StoreError
from blocktune.formats.adapters import load_adapter, save_adapter
from blocktune.formats.peft import save_peft
from blocktune.model.args import LoraConfig
from blocktune_bench.families import make_checkpoint
from blocktune_export.hf import export_hf, import_hf
from conftest import bt as run_bt

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def base(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    make_checkpoint(root / "hf", request.param)
    return root / "hf", import_hf(root / "hf", root / "store")


def _trained(store, targets=("wq", "wk", "wv", "wo", "w2")):
    """A few LoRA steps, so that B is far from zero."""
    lora = LoraConfig(rank=4, alpha=8, dropout=0.0, targets=targets)
    eng = Engine(store, EngineConfig(device="cpu", compute_dtype="fp32", method="lora", lora=lora,
                                     optimizer=OptimizerConfig(lr=5e-2)))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        tok = torch.randint(0, store.args.vocab_size, (2, 17), generator=g)
        eng.train_step([(tok[:, :-1], tok[:, 1:])])
    state = eng.adapter_state()
    eng.close()
    return state, lora


def _logits(store, adapter, tok):
    eng = Engine(store, EngineConfig(device="cpu", compute_dtype="fp32", method="lora", lora=adapter.lora,
                                     read_only=True), adapters=adapter.tensors)
    out = eng.logits(tok)
    eng.close()
    return out


def test_blocktune_adapter_loads_in_peft(base, tmp_path):
    src, store = base
    state, lora = _trained(store)
    save_adapter(tmp_path / "a.safetensors", state, lora, store.args)
    ours = load_adapter(tmp_path / "a.safetensors", store.args)
    out = save_peft(tmp_path / "peft", ours, store.args)
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(src), out).eval()
    tok = torch.randint(0, store.args.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(tok).logits
    got = _logits(store, ours, tok)
    assert (got - want).abs().max().item() < 1e-5
    # the adapter changes the model (so equality above is not the base model's twice)
    with model.disable_adapter(), torch.no_grad():
        assert (model(tok).logits - want).abs().max().item() > 1e-3
    # merged: our HF export with the adapter folded in equals peft's merge_and_unload
    merged = export_hf(store, tmp_path / "merged", adapter=ours, dtype=torch.float32)
    theirs = model.merge_and_unload()
    mine = transformers.AutoModelForCausalLM.from_pretrained(merged)
    for k, w in theirs.state_dict().items():
        assert (mine.state_dict()[k] - w).abs().max().item() < 1e-6, k


def test_peft_adapter_is_used_and_continued_by_blocktune(base, tmp_path):
    src, store = base
    hf = transformers.AutoModelForCausalLM.from_pretrained(src)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "up_proj"],
                                                 lora_dropout=0.0))
    with torch.no_grad():
        for k, p in pm.named_parameters():
            if "lora_B" in k:
                p.copy_(torch.randn_like(p) * 0.05)
    pm.save_pretrained(tmp_path / "peft")
    ad = load_adapter(tmp_path / "peft", store.args)
    assert ad.lora.rank == 8 and ad.lora.scale == 4.0 and ad.lora.targets == ("wq", "wk", "w3")
    tok = torch.randint(0, store.args.vocab_size, (1, 25), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = pm.eval()(tok).logits
    assert (_logits(store, ad, tok) - want).abs().max().item() < 1e-5
    # from the CLI: eval with the folder, then continue training from it and export back to PEFT
    text = tmp_path / "t.txt"
    text.write_text("The crust tells you when the bread is done. " * 40)
    if store.manifest.get("tokenizer_kind") is None:
        pytest.skip("no tokenizer")

    def bt(*args):
        return run_bt(*args, check=True)

    r = bt("eval", "--store", store.path, "--data", text, "--seq-len", "32", "--adapter", tmp_path / "peft", "--json")
    assert json.loads(r.stdout)["loss"] > 0
    bt("finetune", "--store", store.path, "--data", text, "--adapter", tmp_path / "peft", "--steps", "2",
       "--seq-len", "32", "--out", tmp_path / "run")
    cont = load_adapter(tmp_path / "run" / "adapter.safetensors", store.args)
    assert cont.lora.targets == ("wq", "wk", "w3") and cont.lora.rank == 8
    moved = max((cont.tensors[k] - ad.tensors[k]).abs().max().item() for k in ad.tensors)
    assert moved > 0
    bt("export", store.path, tmp_path / "back", "--format", "peft", "--adapter", tmp_path / "run" / "adapter.safetensors")
    again = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(src), tmp_path / "back")
    with torch.no_grad():
        assert (again.eval()(tok).logits - _logits(store, cont, tok)).abs().max().item() < 1e-5


def test_peft_settings_blocktune_cannot_compute_are_refused(base, tmp_path):
    src, store = base
    hf = transformers.AutoModelForCausalLM.from_pretrained(src)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pm.save_pretrained(tmp_path / "ok")
    cfg = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    for key, value in (("use_dora", True), ("use_rslora", True), ("modules_to_save", ["lm_head"]),
                       ("layers_to_transform", [0])):
        bad = tmp_path / key
        bad.mkdir()
        (bad / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
        (bad / "adapter_model.safetensors").write_bytes((tmp_path / "ok" / "adapter_model.safetensors").read_bytes())
        with pytest.raises(StoreError, match=key):
            load_adapter(bad, store.args)
    # an adapter of another module (the head) is named
    pm2 = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(src),
                              peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    pm2.save_pretrained(tmp_path / "head")
    with pytest.raises(StoreError, match="lm_head"):
        load_adapter(tmp_path / "head", store.args)
