"""PEFT's LoRA adapter folder (adapter_config.json + adapter_model.safetensors), read and written
so that `peft` loads what blocktune trained and blocktune continues what peft trained.

PEFT names the modules as transformers does and, like the HF checkpoint, holds q_proj's and
k_proj's output rows in the rotate-half order: lora_B of those is permuted on the way in and out
(`blocktune.formats.hfnames`); lora_A (inputs) is not.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from blocktune.errors import StoreError
from blocktune.families import FAMILIES
from blocktune.formats.adapters import Adapter, fingerprint
from blocktune.formats.hfnames import HF_MODULES, from_hf, rotary_heads, to_hf
from blocktune.model.args import LORA_TARGETS, LoraConfig, ModelArgs
from blocktune.store.safefiles import staging_dir, usual_mode

__all__ = ["load_peft", "save_peft"]

_PEFT_MODULES = {h.split(".")[1]: m for m, h in HF_MODULES.items()}  # q_proj -> attention.wq
_PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")
# adapter_config.json settings that change what the adapter computes, and the value blocktune
# computes; any other value is refused by name (never dropped)
_PEFT_MUST = {"peft_type": "LORA", "use_dora": False, "use_rslora": False, "use_qalora": False,
              "lora_bias": False, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
              "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layer_replication": None,
              "target_parameters": None, "trainable_token_indices": None, "alora_invocation_tokens": None,
              "use_bdlora": None, "megatron_config": None}


def _module_of(target: str) -> str:
    """A LoRA target (wq, w1, ...) as the module's name in a block."""
    return f"{'attention' if target in ('wq', 'wk', 'wv', 'wo') else 'feed_forward'}.{target}"


def _module_shape(args: ModelArgs, module: str) -> tuple[int, int]:
    """(in, out) features of a LoRA-targetable module."""
    q, kv = args.n_heads * args.head_dim, args.kv_heads * args.head_dim
    return {"attention.wq": (args.dim, q), "attention.wk": (args.dim, kv), "attention.wv": (args.dim, kv),
            "attention.wo": (q, args.dim), "feed_forward.w1": (args.dim, args.hidden_dim),
            "feed_forward.w3": (args.dim, args.hidden_dim), "feed_forward.w2": (args.hidden_dim, args.dim)}[module]


def load_peft(folder: str | Path, args: ModelArgs) -> Adapter:
    """A PEFT LoRA adapter folder as blocktune's adapter for the model `args` describes."""
    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{cfg_path}: unreadable ({exc})") from None
    for key, want in _PEFT_MUST.items():
        got = cfg.get(key, want)
        if got != want and not (want in ({}, None) and got in ({}, None)):  # empty is empty
            raise StoreError(f"{cfg_path}: {key}={cfg[key]!r} is not supported (blocktune computes plain "
                             f"LoRA, {key}={want!r}); refusing rather than computing a different adapter")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        hint = " (adapter_model.bin is a pickle: blocktune reads safetensors only)" if (
            folder / "adapter_model.bin").exists() else ""
        raise StoreError(f"{weights}: not found{hint}")
    flat: dict[str, torch.Tensor] = {}
    per_layer: dict[int, set[str]] = {}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            m = _PEFT_KEY.match(key)
            if m is None or m.group(2) not in _PEFT_MODULES:
                raise StoreError(f"{weights}: key {key!r} is not a LoRA matrix of a module blocktune "
                                 f"adapts ({', '.join(_PEFT_MODULES)})")
            layer, module, ab = int(m.group(1)), _PEFT_MODULES[m.group(2)], m.group(3)
            if layer >= args.n_layers:
                raise StoreError(f"{weights}: {key!r} is for layer {layer}; the store has {args.n_layers}")
            t = f.get_tensor(key).to(torch.float32)
            fin, fout = _module_shape(args, module)
            r = int(cfg.get("r", t.shape[0] if ab == "A" else t.shape[1]))
            want = (r, fin) if ab == "A" else (fout, r)
            if tuple(t.shape) != want:
                raise StoreError(f"{weights}: {key!r} has shape {tuple(t.shape)}; this store's "
                                 f"{module} with rank {r} needs {want}")
            if ab == "B" and (heads := rotary_heads(args, module + ".weight")):
                t = from_hf(t, heads)
            flat[f"layers.{layer}.{module}.lora_{ab.lower()}"] = t
            per_layer.setdefault(layer, set()).add(module.split(".")[1])
    targets = {frozenset(v) for v in per_layer.values()}
    if len(per_layer) != args.n_layers or len(targets) != 1:
        raise StoreError(f"{weights}: adapts layers {sorted(per_layer)} with modules "
                         f"{sorted(sorted(t) for t in targets)}; blocktune adapts the same modules in every layer")
    mods = next(iter(targets))
    lora = LoraConfig(rank=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", cfg["r"])),
                      dropout=float(cfg.get("lora_dropout") or 0.0),
                      targets=tuple(t for t in LORA_TARGETS if t in mods))
    missing = [k for k in (f"layers.{i}.{_module_of(t)}.lora_{x}" for i in range(args.n_layers)
                           for t in lora.targets for x in "ab") if k not in flat]
    if missing:
        raise StoreError(f"{weights}: missing {missing[:3]}")
    return Adapter(flat, lora, fingerprint(args))


def save_peft(out: str | Path, adapter: Adapter, args: ModelArgs, base_model: str | None = None) -> Path:
    """`adapter` as a PEFT folder that `PeftModel.from_pretrained` loads onto the HF model."""
    to_peft = {m: h for m, h in HF_MODULES.items()}
    tensors = {}
    for key, t in adapter.tensors.items():
        m = re.match(r"^layers\.(\d+)\.(.+)\.lora_([ab])$", key)
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        t = t.detach().to("cpu", torch.float32)
        if ab == "b" and (heads := rotary_heads(args, module + ".weight")):
            t = to_hf(t, heads)
        tensors[f"base_model.model.model.layers.{layer}.{to_peft[module]}.lora_{ab.upper()}.weight"] = t.contiguous()
    lora = adapter.lora
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
           "r": lora.rank, "lora_alpha": int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha,
           "lora_dropout": lora.dropout,
           "target_modules": sorted(to_peft[_module_of(t)].split(".")[1] for t in lora.targets),
           "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
           "modules_to_save": None, "layers_to_transform": None, "init_lora_weights": True,
           "inference_mode": True, "auto_mapping": {"base_model_class": FAMILIES[args.family].hf_architecture}}
    with staging_dir(Path(out)) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        usual_mode(tmp / "adapter_model.safetensors")
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return Path(out)
