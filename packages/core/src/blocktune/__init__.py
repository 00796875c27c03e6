"""blocktune: fine-tune Llama-family models (Llama 2 and 3.x, Mistral, Qwen2.5/3) larger than memory,
paging them through the compute device one unit at a time."""

from blocktune.engine.engine import Engine, EngineConfig, StepResult
from blocktune.engine.optim import OptimizerConfig
from blocktune.errors import (
    BlocktuneError,
    BudgetError,
    ChecksumError,
    ConfigError,
    DataError,
    StoreError,
    TrainingError,
)
from blocktune.machine.devices import Device, resolve_device
from blocktune.model.args import PRESETS, LoraConfig, ModelArgs
from blocktune.store.build import build_store
from blocktune.store.store import BlockStore

__version__ = "0.1.0"

__all__ = [
    "BlockStore", "BlocktuneError", "BudgetError", "ChecksumError", "ConfigError", "DataError",
    "Device", "Engine", "EngineConfig", "LoraConfig", "ModelArgs", "OptimizerConfig", "PRESETS",
    "StepResult", "StoreError", "TrainingError", "build_store", "resolve_device",
]
