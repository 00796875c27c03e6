"""The project's own exception types: every message names the file or value and the fix."""

__all__ = [
    "BlocktuneError",
    "ConfigError",
    "StoreError",
    "ChecksumError",
    "StoreLockedError",
    "BudgetError",
    "DataError",
    "TrainingError",
]


class BlocktuneError(Exception):
    """Base class: the CLI prints these without a traceback."""


class ConfigError(BlocktuneError, ValueError):
    """A setting, params.json or command-line value is invalid."""


class StoreError(BlocktuneError):
    """A block store, checkpoint or adapter file is missing, foreign or inconsistent."""


class ChecksumError(StoreError):
    """A file's bytes do not match the checksum recorded when it was written."""


class StoreLockedError(StoreError):
    """Another process holds the store's writer lock."""


class BudgetError(BlocktuneError, ValueError):
    """A memory budget cannot hold what it must (at least the largest unit)."""


class DataError(BlocktuneError, ValueError):
    """A dataset file is empty, not UTF-8, malformed, or too long for the model."""


class TrainingError(BlocktuneError):
    """Training cannot go on (a non-finite loss, say); the last good checkpoint is kept."""
