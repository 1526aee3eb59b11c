"""
Shared pytest fixtures (any test file may use them).

Fixtures
--------
repo_root        (session) absolute path of the repository (the folder of train_gpt2.py).
tiny_data        (session) path of a small synthetic data shard: 4,096 GPT-2 token ids
                 (uniform in [0, 50257), numpy seed 0), in llm.c's shard format.
tiny_export      (session) runs train_gpt2_torch.py ONCE on TINY_SHAPE (L2 NH2 C32 maxT32,
                 V 50257) with B=2, T=16, 10 steps, on `tiny_data`, in a tmp dir; returns a
                 TinyExport with .dir, .model (gpt2_L2H2C32T32.bin), .model_bf16, .state,
                 .tokenizer, .log (main.log), .stdout, .B, .T, .steps, .size.
export_model     (session) a factory: export_model(n_layer=.., n_head=.., n_embd=..,
                 block_size=.., vocab_size=.., B=.., T=.., steps=.., extra=[...]) -> TinyExport,
                 cached per argument set, for other shapes (e.g. an odd V to exercise the padding).

Markers
-------
@pytest.mark.slow   skipped unless pytest runs with --runslow (or LLMC_SLOW=1): keeps CI fast.
@pytest.mark.no_racecheck   in the kernel test files of RACECHECK_FILES, which run every emulator launch
                    through the race checker (LLMC_EMULATOR_RACECHECK=1, unless the environment sets it):
                    a test that measures the emulator's speed runs without it (=0), in any file.

Helpers
-------
run_script(script, *args, cwd, env=None, timeout=...) -> subprocess.CompletedProcess
    runs `python <repo>/<script> *args` with TIKTOKEN_CACHE_DIR set (offline tokenizer:
    $TIKTOKEN_CACHE_DIR, else ../shared/data/tiktoken_cache when present) and cwd as given;
    never raises on a non-zero exit (check .returncode/.stderr).
SHARED           absolute path of ../shared (offline data; may not exist, e.g. in CI).
required_size(reader, path) -> int
    the size in bytes that `reader` (a llmc.formats reader taking a path) demands of the file at
    `path`, which must be of the wrong size: read off the reader's own size check, so a test states
    no size formula of its own.
file_size_as_read(reader, path, tmp_dir) -> int
    the same for a file of the right size: asked of a copy with one byte more.
"""

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from llmc import formats        # the repository is on the path through pytest.ini's pythonpath
from llmc.model import num_parameters

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHARED = os.path.normpath(os.path.join(REPO, "..", "shared"))
# the offline tokenizer: an explicit TIKTOKEN_CACHE_DIR wins, else the shared cache when there is one
TIKTOKEN_CACHE = os.environ.get("TIKTOKEN_CACHE_DIR", "")
if not TIKTOKEN_CACHE and os.path.isdir(os.path.join(SHARED, "data", "tiktoken_cache")):
    TIKTOKEN_CACHE = os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(SHARED, "data", "tiktoken_cache")

TINY_SHAPE = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50257)


def run_script(script, *args, cwd, env=None, timeout=600):
    full_env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    if TIKTOKEN_CACHE:
        full_env["TIKTOKEN_CACHE_DIR"] = TIKTOKEN_CACHE
    full_env.update(env or {})
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


SIZE_CHECK = re.compile(r": (\d+) bytes \(expected (\d+) bytes as its header says\)")


def required_size(reader, path):
    """The size `reader` demands of `path` (a file of the wrong size), from its size check's message."""
    with pytest.raises(formats.FormatError) as e:
        reader(str(path))
    m = SIZE_CHECK.search(str(e.value))
    assert m, f"not the size check's message: {e.value}"
    assert int(m[1]) == os.path.getsize(path)
    return int(m[2])


def file_size_as_read(reader, path, tmp_dir):
    """The size `reader` demands of `path` (a file it reads), asked of a copy one byte longer."""
    longer = os.path.join(str(tmp_dir), "one_byte_longer_" + os.path.basename(str(path)))
    shutil.copyfile(str(path), longer)
    with open(longer, "ab") as f:
        f.write(b"\0")
    size = required_size(reader, longer)
    os.remove(longer)
    return size


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run @pytest.mark.slow tests")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a slow test, skipped unless --runslow or LLMC_SLOW=1")
    config.addinivalue_line("markers", "no_racecheck: runs without the emulator's race checker (see RACECHECK_FILES)")


# the kernel tests run every emulator launch through the race checker (emulator/README.md, "Race
# checker"): a race between the threads of a shipped kernel fails them, whatever the thread order;
# LLMC_EMULATOR_RACECHECK=0 in the environment turns it off
RACECHECK_FILES = {"test_kernels.py", "test_kernels_bf16.py", "test_kernels_fused.py", "test_classifier_x128.py",
                   "test_layernorm_sum.py", "test_matmul_bias.py", "test_layernorm_x128.py"}


@pytest.fixture(autouse=True)
def racecheck_kernel_tests(request, monkeypatch):
    if "no_racecheck" in request.keywords:
        monkeypatch.setenv("LLMC_EMULATOR_RACECHECK", "0")       # a speed measurement, whatever the environment
    elif (os.path.basename(str(request.node.fspath)) in RACECHECK_FILES
            and "LLMC_EMULATOR_RACECHECK" not in os.environ):
        monkeypatch.setenv("LLMC_EMULATOR_RACECHECK", "1")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("LLMC_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (or LLMC_SLOW=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@dataclass
class TinyExport:
    dir: str
    size: str
    model: str
    model_bf16: str
    state: str
    tokenizer: str   # only written when vocab_size == 50257
    log: str
    stdout: str
    B: int
    T: int
    steps: int


@pytest.fixture(scope="session")
def repo_root():
    return REPO


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_data") / "tiny.bin")
    tokens = np.random.default_rng(0).integers(0, 50257, size=4096)
    formats.write_data_shard(path, tokens)
    return path


@pytest.fixture(scope="session")
def export_model(tmp_path_factory, tiny_data):
    cache = {}

    def export(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50257, B=2, T=16, steps=10, extra=()):
        key = (n_layer, n_head, n_embd, block_size, vocab_size, B, T, steps, tuple(extra))
        if key in cache:
            return cache[key]
        out = str(tmp_path_factory.mktemp("export"))
        data = tiny_data
        if vocab_size < 50257:  # keep the synthetic tokens inside the vocabulary
            data = os.path.join(out, "tiny_v.bin")
            formats.write_data_shard(data, np.random.default_rng(0).integers(0, vocab_size, size=4096))
        args = ["--input_bin", data, "--n_layer", n_layer, "--n_head", n_head, "--n_embd", n_embd,
                "--block_size", block_size, "--vocab_size", vocab_size, "--batch_size", B,
                "--sequence_length", T, "--total_batch_size", B * T, "--num_iterations", steps,
                "--output_dir", os.path.join(out, "log"), "--device", "cpu", *extra]
        r = run_script("train_gpt2_torch.py", *args, cwd=out)
        assert r.returncode == 0, r.stderr[-3000:]
        size = f"L{n_layer}H{n_head}C{n_embd}T{block_size}" + ("" if vocab_size == 50257 else f"V{vocab_size}")
        j = lambda name: os.path.join(out, name)  # noqa: E731
        cache[key] = TinyExport(dir=out, size=size, model=j(f"gpt2_{size}.bin"), model_bf16=j(f"gpt2_{size}_bf16.bin"),
                                state=j(f"gpt2_{size}_debug_state.bin"), tokenizer=j("gpt2_tokenizer.bin"),
                                log=j(os.path.join("log", "main.log")), stdout=r.stdout, B=B, T=T, steps=steps)
        return cache[key]

    return export


@pytest.fixture(scope="session")
def tiny_export(export_model):
    return export_model(**TINY_SHAPE)


def run_main(argv, capsys, module=None):
    """module.main(argv) in this process (train_gpt2 by default): (exit code, stdout, stderr)."""
    import train_gpt2
    try:
        (module or train_gpt2).main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def write_tiny_model(path, config, rng, std):
    """A seeded model file of shape `config` for the trainer tests: weights N(0, std) drawn from rng,
    wte's pad rows 0, LayerNorm weights 1. Returns the flat parameters."""
    import train_gpt2
    params = (rng.standard_normal(num_parameters(config)) * std).astype(np.float32)
    model = train_gpt2.GPT2(config, params)
    model.params.wte[config.vocab_size:] = 0
    model.params.ln1w[...] = model.params.ln2w[...] = model.params.lnfw[...] = 1
    formats.write_model_file(str(path), config, params)
    return params


def emulated_cuda_trainer(name, register=False):
    """train_gpt2_cuda.py imported with LLMC_EMULATE=1 as a module object of its own called `name` (so the
    switch at its top sees the variable, whatever was imported before); register=True also puts it in
    sys.modules (its main() hands train_gpt2.run the module by name); the caller removes it."""
    from emulator import import_emulated
    module = import_emulated(os.path.join(REPO, "train_gpt2_cuda.py"), name, register)
    assert module.EMULATE and module.xp is np
    return module


def disk_full_after(monkeypatch, nbytes):
    """From now on llmc.utils' writes (write_atomic, under every writer of llm.c's files) fail as on a
    full disk, OSError ENOSPC, once `nbytes` bytes are written in all: the write that crosses the
    limit writes its first bytes, then raises. No disk needs to be filled."""
    import errno
    import llmc.utils
    left = [nbytes]
    real_open = open

    class FillingFile:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            data = memoryview(data).cast("B")
            if data.nbytes > left[0]:
                self.f.write(data[:left[0]])
                left[0] = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            left[0] -= data.nbytes
            return self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def filling_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FillingFile(f) if "w" in mode or "a" in mode else f

    monkeypatch.setattr(llmc.utils, "open", filling_open, raising=False)
