"""Export formats by name: each registers once its writer and the help `blocktune export --format`
shows for it; the command's choices, help and dispatch are made from this registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from blocktune.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from blocktune.formats.adapters import Adapter
    from blocktune.store.store import BlockStore

__all__ = ["ExportJob", "ExportFormat", "EXPORTS", "register"]


@dataclass(frozen=True)
class ExportJob:
    """One export as the command asked for it (the names as the user wrote them, for messages)."""

    store: BlockStore
    out: str | Path
    adapter: Adapter | None
    dtype: torch.dtype
    shards: int | None
    store_name: str
    adapter_name: str | None
    dtype_name: str

    @property
    def merged(self) -> str:
        return ", LoRA merged" if self.adapter else ""

    def the_adapter(self, fmt: str) -> Adapter:
        """The --adapter a format that writes an adapter alone needs."""
        if self.adapter is None:
            raise ConfigError(f"--format {fmt} writes an adapter: give --adapter")
        return self.adapter


@dataclass(frozen=True)
class ExportFormat:
    name: str
    write: Callable[[ExportJob], str]  # writes the export; returns the line the command prints
    help: str = ""  # shown in --format's help after the name (the layouts need none)


EXPORTS: dict[str, ExportFormat] = {}  # in registration order: the CLI's choices


def register(name: str, help: str = "") -> Callable[[Callable[[ExportJob], str]], Callable[[ExportJob], str]]:
    """Make `write` the export format `name`."""

    def add(write: Callable[[ExportJob], str]) -> Callable[[ExportJob], str]:
        EXPORTS[name] = ExportFormat(name, write, help)
        return write

    return add


@register("meta")
def _meta(job: ExportJob) -> str:
    from .meta import export_meta

    out = export_meta(job.store, job.out, job.shards, job.adapter, job.dtype)
    return f"exported {job.store_name} -> {out} (meta{job.merged})"


@register("hf")
def _hf(job: ExportJob) -> str:
    from .hf import export_hf

    if job.shards:
        raise ConfigError("--shards applies to the Meta layout; HF shards by size")
    out = export_hf(job.store, job.out, job.adapter, job.dtype)
    return f"exported {job.store_name} -> {out} (hf{job.merged})"


@register("peft", help="the --adapter alone, as a PEFT folder")
def _peft(job: ExportJob) -> str:
    """The adapter alone, for peft / vLLM on the HF model."""
    from blocktune.formats.peft import save_peft

    out = save_peft(job.out, job.the_adapter("peft"), job.store.args)
    return f"exported {job.adapter_name} -> {out} (PEFT adapter for {job.store.args.family})"


@register("gguf", help="OUT/model.gguf for llama.cpp and Ollama")
def _gguf(job: ExportJob) -> str:
    from .gguf_format import export_gguf

    out = export_gguf(job.store, job.out, job.adapter, job.dtype)
    return f"exported {job.store_name} -> {out}/model.gguf ({job.dtype_name}{job.merged})"


@register("gguf-lora", help="the --adapter alone as OUT/adapter.gguf, for llama.cpp's --lora and Ollama's ADAPTER")
def _gguf_lora(job: ExportJob) -> str:
    from .gguf_format import export_gguf_lora

    out = export_gguf_lora(job.store, job.out, job.the_adapter("gguf-lora"), job.dtype)
    return f"exported {job.adapter_name} -> {out}/adapter.gguf (LoRA for llama.cpp, {job.dtype_name})"
