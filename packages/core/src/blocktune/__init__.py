"""blocktune: fine-tune Llama-2 models larger than memory, paging one unit at a time."""

from .build import build_store
from .config import PRESETS, LoraConfig, ModelArgs
from .devices import Device, resolve_device
from .engine import Engine, EngineConfig, StepResult
from .errors import (
                     BlocktuneError,
                     BudgetError,
                     ChecksumError,
                     ConfigError,
                     DataError,
                     StoreError,
                     TrainingError,
)
from .optim import OptimizerConfig
from .store import BlockStore

__version__ = "0.1.0"

__all__ = [
    "BlockStore", "BlocktuneError", "BudgetError", "ChecksumError", "ConfigError", "DataError",
    "Device", "Engine", "EngineConfig", "LoraConfig", "ModelArgs", "OptimizerConfig", "PRESETS",
    "StepResult", "StoreError", "TrainingError", "build_store", "resolve_device",
]
