"""blocktune: fine-tune Llama-family models (Llama 2 and 3.x, Mistral, Qwen2.5/3) larger than memory,
paging them through the compute device one unit at a time."""

import importlib

# the public names, imported when first used (PEP 562): `blocktune --help`, `--version` and `info`
# start without torch's seconds of import
_PUBLIC = {
    "Engine": "blocktune.engine.engine", "EngineConfig": "blocktune.engine.engine",
    "StepResult": "blocktune.engine.engine", "OptimizerConfig": "blocktune.engine.optim",
    "BlocktuneError": "blocktune.errors", "BudgetError": "blocktune.errors",
    "ChecksumError": "blocktune.errors", "ConfigError": "blocktune.errors", "DataError": "blocktune.errors",
    "StoreError": "blocktune.errors", "TrainingError": "blocktune.errors",
    "Device": "blocktune.machine.devices", "resolve_device": "blocktune.machine.devices",
    "PRESETS": "blocktune.model.args", "LoraConfig": "blocktune.model.args", "ModelArgs": "blocktune.model.args",
    "build_store": "blocktune.store.build", "BlockStore": "blocktune.store.store",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module 'blocktune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


__version__ = "0.1.0"

__all__ = [
    "BlockStore", "BlocktuneError", "BudgetError", "ChecksumError", "ConfigError", "DataError",
    "Device", "Engine", "EngineConfig", "LoraConfig", "ModelArgs", "OptimizerConfig", "PRESETS",
    "StepResult", "StoreError", "TrainingError", "build_store", "resolve_device",
]
