"""The oracle: plain in-memory PyTorch autograd training of the same model.

No paging, no recompute, no unit-wise optimizer: the whole `Transformer` in memory,
`loss.backward()`, and `torch.optim`. The paged engine is tested against this.
Dropout streams are seeded per micro-batch exactly as the engine seeds them (`blocktune.engine.rng`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from blocktune.engine.engine import Engine
from blocktune.engine.loss import IGNORE_INDEX
from blocktune.engine.optim import OptimizerConfig
from blocktune.engine.rng import seed_micro_batch
from blocktune.machine.devices import Device, resolve_device
from blocktune.model.args import LoraConfig, ModelArgs
from blocktune.model.llama import Transformer
from blocktune.model.lora import add_lora, init_lora_
from blocktune.model.units import unit_prefix
from blocktune.store.store import BlockStore
from torch.utils.checkpoint import checkpoint

__all__ = ["ReferenceTrainer", "model_from_store"]


def model_from_store(store: BlockStore, lora: LoraConfig | None = None,
                     dtype: torch.dtype = torch.float32, device: str = "cpu") -> Transformer:
    with torch.device("meta"):
        model = Transformer(store.args)
        if lora is not None:
            add_lora(model.layers, lora)
    state = {}
    for unit, _ in model.units():
        prefix = unit_prefix(unit) or f"{unit}."
        for k, v in store.read_unit(unit).items():
            state[prefix + k] = v.to(device=device, dtype=dtype)
    if lora is not None:  # placeholders; ReferenceTrainer initialises them as the engine does
        for name, p in model.named_parameters():
            if ".lora_" in name:  # fp32 at any compute dtype, as the engine (and peft) keep them
                state[name] = torch.empty(p.shape, dtype=torch.float32, device=device)
    model.load_state_dict(state, assign=True, strict=True)
    if store.args.tie_embeddings:  # assign=True gave each use its own tensor: one parameter again
        model.head.output.weight = model.embed.tok_embeddings.weight
    return model


def trained_tensors(engine: Engine) -> dict[str, torch.Tensor]:
    """What training changed: the adapters (LoRA), or every unit as committed to the store
    (full fine-tune; closes the engine so that its last writes are in), keyed unit.tensor."""
    if engine.cfg.method == "lora":
        return engine.adapter_state()
    engine.close()
    store = BlockStore.open(engine.store.path)
    return {f"{u}.{k}": v for u in store.units for k, v in store.read_unit(u).items()}


class ReferenceTrainer:
    def __init__(self, store: BlockStore, method: str = "lora", lora: LoraConfig | None = None,
                 optimizer: OptimizerConfig | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: str = "cpu",
                 checkpoint_blocks: bool = False):
        self.args: ModelArgs = store.args
        self.device: Device = resolve_device(device)
        self.method, self.seed = method, seed
        self.checkpoint_blocks = checkpoint_blocks
        lora = lora if method == "lora" else None
        self.model = model_from_store(store, lora, dtype, str(self.device.torch))
        if lora is not None:
            # the same initial adapters as the engine: one generator, blocks in order
            gen = torch.Generator().manual_seed(seed)
            for layer in self.model.layers:
                init_lora_(layer, gen)
            for name, p in self.model.named_parameters():
                p.requires_grad_(".lora_" in name)
        self.opt_cfg = optimizer or OptimizerConfig()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self.opt_cfg.torch_optimizer(self.params)
        self.step_count = 0

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        if not self.checkpoint_blocks:
            return m(tokens)
        h = m.embed(tokens)
        for layer in m.layers:
            h = checkpoint(layer, h, use_reentrant=False, preserve_rng_state=True)
        return m.head(h)

    def train_step(self, micro_batches, lr: float | None = None) -> float:
        lr = self.opt_cfg.lr if lr is None else lr
        self.model.train()
        n_tok = sum(int((t != IGNORE_INDEX).sum()) for _, t in micro_batches)
        total = 0.0
        for m, (tok, tgt) in enumerate(micro_batches):
            seed_micro_batch(self.device, self.seed, self.step_count, m)
            logits = self._forward(tok.to(self.device.torch))
            loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.to(self.device.torch).flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum") / n_tok
            loss.backward()
            total += float(loss.detach())
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return total

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self.model(tokens.to(self.device.torch))

    def unit_state(self, unit: str) -> dict[str, torch.Tensor]:
        """Current weights of one unit, keyed as in the store."""
        mod = dict(self.model.units())[unit]
        return {k: v.detach() for k, v in mod.state_dict().items() if ".lora_" not in k}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items() if ".lora_" in k}

    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {names[id(p)]: s for p, s in self.optimizer.state.items()}
