"""train_gpt2_cuda.py without a GPU: its one-line refusal, and its numbers on the CPU emulator.

CI has no GPU, so the CUDA trainer runs here with LLMC_EMULATE=1: NumPy arrays stand in for CuPy's,
NumPy's matmul for cuBLAS, and the emulator (emulator/) compiles the very kernels/*.cu sources with g++.
On a tiny model (L=2, NH=2, C=32, maxT=32, V=101 padded to Vp=128; B=2, T=8) we check the forward
logits and loss, all 16 gradients and a few clipped AdamW steps against train_gpt2.py, the NumPy
trainer, and run the CLI end to end. On a GPU the same comparison at full size is test_gpt2.py
--trainer cuda.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import train_gpt2 as numpy_trainer
from conftest import emulated_cuda_trainer
from llmc import formats
from llmc.model import GPT2Config, num_parameters, param_shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ATOL, RTOL = 1e-4, 1e-4
CONFIG = GPT2Config(max_seq_len=32, vocab_size=101, num_layers=2, num_heads=2, channels=32,
                    padded_vocab_size=128)
B, T = 2, 8


def run_python(code_or_script, *args, env=None, cwd=None, timeout=300):
    full_env = dict(os.environ)
    full_env.pop("LLMC_EMULATE", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, *code_or_script, *map(str, args)], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------
# no CuPy, no GPU: one line that says so and what to run instead

HIDE_CUPY = "import sys; sys.modules['cupy'] = None"          # `import cupy` now raises ImportError
FAKE_CUPY_NO_DEVICE = """
import sys, types
cupy = types.ModuleType('cupy')
def no_device():
    raise RuntimeError('cudaErrorNoDevice: no CUDA-capable device is detected')
cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_device))
sys.modules['cupy'] = cupy
"""
RUN_MAIN = "\nimport runpy; sys.argv = ['train_gpt2_cuda.py']; runpy.run_path({!r}, run_name='__main__')"


@pytest.mark.parametrize("fake, expected", [(HIDE_CUPY, "CuPy is not installed"),
                                            (FAKE_CUPY_NO_DEVICE, "no CUDA GPU found")], ids=["no-cupy", "no-device"])
def test_without_a_gpu_it_exits_with_one_line(fake, expected):
    script = os.path.join(REPO, "train_gpt2_cuda.py")
    r = run_python(["-c", fake + RUN_MAIN.format(script)])
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr                      # no traceback, one line
    assert expected in lines[0] and "python train_gpt2.py" in lines[0], lines[0]
    if "not installed" in expected:
        assert "pip install cupy-cuda12x" in lines[0]
    assert r.stdout == ""


def test_help_without_a_gpu_names_the_emulator():
    """-h needs no GPU, shows train_gpt2.cu's defaults, and tells a CPU user about LLMC_EMULATE."""
    r = run_python(["-c", HIDE_CUPY + "; import train_gpt2_cuda as t; t.main(['-h'])"])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "-t         sequence length T (at most the model's max_seq_len) (default: 1024)" in r.stdout
    assert "-f         TF32 tensor cores for the fp32 matmuls? 0/1 (default: 1)" in r.stdout
    assert "LLMC_EMULATE=1 python train_gpt2_cuda.py" in r.stdout and "--profile" not in r.stdout


def test_importing_without_a_gpu_is_harmless():
    """The module imports (test_gpt2.py, the benchmark and these tests import it); only using it stops."""
    r = run_python(["-c", HIDE_CUPY + "; import train_gpt2_cuda as t; print(t.NO_GPU is not None, t.EMULATE)"])
    assert r.returncode == 0 and r.stdout.split() == ["True", "False"], r.stderr


# ----------------------------------------------------------------------------------------------
# the emulator against the NumPy trainer

@pytest.fixture(scope="module")
def cuda_trainer():
    """train_gpt2_cuda imported with LLMC_EMULATE=1 (a separate module object, so the switch at its
    top sees the variable)."""
    module = emulated_cuda_trainer("train_gpt2_cuda_emulated")
    return module


def test_the_cuda_trainer_has_the_whole_trainer_interface(cuda_trainer):
    """Every name of llmc/run.py's Trainer, and device_setup returns the run's settings (the model is built
    with them) instead of setting module globals: two setups in a row leave no trace of each other."""
    from llmc import run
    from llmc.cli import parse_args
    cu = cuda_trainer
    assert [name for name in run.TRAINER_API if not hasattr(cu, name)] == []
    bf16 = cu.device_setup(parse_args(["-r", "2", "-ge", "1", "-w", "0"], cu.TRAIN_GPT2_CU_DEFAULTS))
    fp32 = cu.device_setup(parse_args(["-p", "fp32", "-fa", "0"], cu.TRAIN_GPT2_CU_DEFAULTS))
    assert (bf16.precision, bf16.recompute, bf16.gelu_fusion, bf16.master_weights, bf16.flash_attention) == \
        ("bf16", 2, 1, False, 1)
    assert (fp32.precision, fp32.recompute, fp32.gelu_fusion, fp32.master_weights, fp32.flash_attention) == \
        ("fp32", 1, 0, True, 0)
    assert (bf16.gemm_precision, fp32.gemm_precision) == ("bf16", "fp32")   # the emulator has no TF32
    assert not any(name.startswith("run_") for name in vars(cu)) and not hasattr(cu, "gemm_precision")


def random_params(config, seed=0):
    """GPT-2-like random weights (std 0.1 so every tensor matters; LayerNorm weights around 1),
    wte's pad rows zero as in a real checkpoint."""
    rng = np.random.default_rng(seed)
    chunks = []
    for name, shape in param_shapes(config):
        a = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        if name in ("ln1w", "ln2w", "lnfw"):
            a += np.float32(1.0)
        if name == "wte":
            a[config.vocab_size:] = 0.0
        chunks.append(a.ravel())
    return np.concatenate(chunks)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cuda_trainer") / "gpt2_tiny.bin")
    formats.write_model_file(path, CONFIG, random_params(CONFIG))
    return path


def batch(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG.vocab_size, size=B * T + 1).astype(np.int32)
    return tokens[:-1].reshape(B, T), tokens[1:].reshape(B, T)


def assert_close(name, ours, ref, atol=ATOL, rtol=RTOL):
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} vs {ref.shape}"
    err = np.abs(ours - ref)
    bad = ~(err <= atol + rtol * np.abs(ref))
    assert not bad.any(), f"{name}: {bad.sum()} of {bad.size} values off, max abs err {err.max():.3e}"
    return float(err.max())


def test_forward_backward_and_adamw_match_the_numpy_trainer(cuda_trainer, tiny_checkpoint):
    cu, npt = cuda_trainer, numpy_trainer
    ours, ref = cu.gpt2_build_from_checkpoint(tiny_checkpoint), npt.gpt2_build_from_checkpoint(tiny_checkpoint)
    assert ours.config == ref.config == CONFIG
    assert ours.params_memory.dtype == np.float32 and ours.params_memory.size == num_parameters(CONFIG)
    x, y = batch(1)
    V = CONFIG.vocab_size

    # forward: logits (the first V columns) and loss
    cu.gpt2_zero_grad(ours)
    npt.gpt2_zero_grad(ref)
    cu.gpt2_forward(ours, x, y, B, T)
    npt.gpt2_forward(ref, x, y, B, T)
    assert isinstance(ours.mean_loss, float)
    logits = cu.to_numpy(ours.acts.logits)
    assert logits.shape == (B, T, CONFIG.padded_vocab_size) and logits.dtype == np.float32
    errors = {"logits": assert_close("logits", logits[:, :, :V], npt.to_numpy(ref.acts.logits)[:, :, :V])}
    errors["loss"] = assert_close("loss", ours.mean_loss, ref.mean_loss)
    assert 3.0 < ours.mean_loss < 8.0                     # near ln(101) = 4.6 for random weights

    # backward: all 16 gradients by name
    cu.gpt2_backward(ours)
    npt.gpt2_backward(ref)
    for name, _ in param_shapes(CONFIG):
        ours_g, ref_g = cu.to_numpy(getattr(ours.grads, name)), np.asarray(getattr(ref.grads, name))
        assert np.abs(ref_g).max() > 1e-4, f"d{name} is all zeros in the NumPy trainer: the test would prove nothing"
        errors["d" + name] = assert_close("d" + name, ours_g, ref_g)
    assert np.all(cu.to_numpy(ours.grads.wte)[V:] == 0.0)  # pad rows of wte get no gradient

    # training: clipped AdamW with weight decay (only on the 2-D weights), loss after each step
    norms = []
    for t in range(1, 5):
        norm_ours, norm_ref = cu.gpt2_calculate_grad_norm(ours), npt.gpt2_calculate_grad_norm(ref)
        assert_close(f"grad norm {t}", norm_ours, norm_ref)
        norms.append(norm_ours)
        scale = cu.grad_clip_scale(norm_ours, 1.0)
        assert scale == pytest.approx(npt.grad_clip_scale(norm_ref, 1.0), rel=1e-5)
        cu.gpt2_update(ours, 1e-2, 0.9, 0.95, 1e-8, 0.1, t, grad_scale=scale)
        npt.gpt2_update(ref, 1e-2, 0.9, 0.95, 1e-8, 0.1, t, grad_scale=npt.grad_clip_scale(norm_ref, 1.0))
        for m, tr in ((ours, cu), (ref, npt)):
            tr.gpt2_zero_grad(m)
            tr.gpt2_forward(m, x, y, B, T)
            tr.gpt2_backward(m)
        errors[f"loss {t}"] = assert_close(f"loss after step {t}", ours.mean_loss, ref.mean_loss)
    assert norms[0] > 1.0                                 # so the clipping was exercised
    # The key bias (qkvb[:, C:2C]) has a gradient of exactly 0 in exact arithmetic (adding a constant to
    # every score of a softmax row changes nothing), so both trainers hold rounding noise of ~1e-9 there,
    # and AdamW turns noise of either sign into a full +-lr step. Compare every other parameter.
    C = CONFIG.channels
    assert np.abs(cu.to_numpy(ours.grads.qkvb)[:, C:2 * C]).max() < 1e-6
    keep = np.ones(num_parameters(CONFIG), dtype=bool)
    offset = 0
    for name, shape in param_shapes(CONFIG):
        if name == "qkvb":
            keep[offset:offset + int(np.prod(shape))].reshape(shape)[:, C:2 * C] = False
        offset += int(np.prod(shape))
    errors["params"] = assert_close("params after 4 steps (but the key bias)", cu.to_numpy(ours.params_memory)[keep],
                                    npt.to_numpy(ref.params_memory)[keep])
    print("max abs errors vs the NumPy trainer: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))


def test_forward_without_targets_and_a_second_batch(cuda_trainer, tiny_checkpoint):
    """No targets: mean_loss is -1 and backward refuses; the logits do not depend on the targets."""
    cu = cuda_trainer
    m = cu.gpt2_build_from_checkpoint(tiny_checkpoint)
    same = cu.gpt2_build_from_descriptor(tiny_checkpoint)          # a .bin "descriptor" loads the file
    np.testing.assert_array_equal(cu.to_numpy(same.params_memory), cu.to_numpy(m.params_memory))
    x, y = batch(2)
    cu.gpt2_forward(m, x, None, B, T)
    assert m.mean_loss == -1.0
    logits = cu.to_numpy(m.acts.logits).copy()
    with pytest.raises(RuntimeError, match="with targets first"):
        cu.gpt2_backward(m)
    cu.gpt2_forward(m, x, y, B, T)
    np.testing.assert_array_equal(cu.to_numpy(m.acts.logits), logits)  # the forward keeps the logits
    with pytest.raises(ValueError, match="set up for B=2 T=8"):
        cu.gpt2_forward(m, x[:, :4], y[:, :4], B, 4)
    with pytest.raises(ValueError, match="token ids must lie in"):
        cu.gpt2_forward(m, x + CONFIG.vocab_size, y, B, T)


def test_grad_norm_and_gemm_helpers(cuda_trainer):
    cu = cuda_trainer
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 5, 4)).astype(np.float32)
    b = rng.standard_normal((3, 6, 4)).astype(np.float32)
    out = np.ones((3, 5, 6), dtype=np.float32)
    cu.gemm(out, a, b, transpose_b=True, accumulate=True)
    np.testing.assert_allclose(out, 1.0 + a @ b.transpose(0, 2, 1), rtol=1e-5, atol=1e-5)
    assert cu.grad_clip_scale(4.0, 1.0) == pytest.approx(1.0 / (4.0 + 1e-6))
    assert cu.grad_clip_scale(0.5, 1.0) == 1.0 and cu.grad_clip_scale(4.0, 0.0) == 1.0


def three_steps(cu, checkpoint):
    """3 training steps of the CUDA trainer on a batch with a heavy token (one id at half the positions):
    the loss, grad norm and all gradients of each step, and the parameters after the last."""
    m = cu.gpt2_build_from_checkpoint(checkpoint)
    x, y = batch(6)
    x.flat[::2] = 17
    record = {}
    for step in range(3):
        cu.gpt2_zero_grad(m)
        cu.gpt2_forward(m, x, y, B, T)
        cu.gpt2_backward(m)
        norm = cu.gpt2_calculate_grad_norm(m)
        record[f"loss{step}"] = np.float32(m.mean_loss)
        record[f"norm{step}"] = np.float32(norm)
        record[f"grads{step}"] = cu.to_numpy(m.grads_memory).copy()
        cu.gpt2_update(m, 1e-2, 0.9, 0.95, 1e-8, 0.1, step + 1, grad_scale=cu.grad_clip_scale(norm, 1.0))
    record["params"] = cu.to_numpy(m.params_memory).copy()
    return record


THREE_STEPS_RUN = """
import sys
import numpy as np
sys.path[:0] = [{repo!r}, {tests!r}]
import train_gpt2_cuda as cu
from test_cuda_trainer import three_steps
assert cu.EMULATE
np.savez({path!r}, **three_steps(cu, {ckpt!r}))
"""


def test_training_is_bitwise_deterministic(cuda_trainer, tiny_checkpoint, tmp_path):
    """The same 3 steps run twice give bit-identical losses, norms, gradients and parameters: no kernel
    adds with atomics. Once more in a child process with 4 OS threads running the blocks and the warps
    thread order (LLMC_EMULATOR_THREADS and _ORDER are read per process)."""
    first, again = three_steps(cuda_trainer, tiny_checkpoint), three_steps(cuda_trainer, tiny_checkpoint)
    assert first["loss0"] != first["loss2"]                     # it trained
    path = str(tmp_path / "three_steps.npz")
    script = THREE_STEPS_RUN.format(repo=REPO, tests=os.path.dirname(os.path.abspath(__file__)), path=path,
                                    ckpt=tiny_checkpoint)
    r = run_python(["-c", script], env={"LLMC_EMULATE": "1", "LLMC_EMULATOR_THREADS": "4",
                                        "LLMC_EMULATOR_ORDER": "warps"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    with np.load(path) as saved:
        child = dict(saved)
    for other, what in ((again, "run twice"), (child, "with 4 threads, order warps")):
        assert other.keys() == first.keys()
        for name in first:
            assert first[name].tobytes() == other[name].tobytes(), f"{name} differs bitwise {what}"


# ----------------------------------------------------------------------------------------------
# the GPU code path itself (not the emulator switch), through a fake CuPy
#
# The module below stands in for cupy and cupy_backends: arrays are NumPy arrays with a .data.ptr,
# RawModule is the emulator's, and cublasSgemmStridedBatched is a column-major reference that reads
# and writes raw memory through the pointers, leading dimensions and strides it is given. So the
# row-major to column-major mapping of train_gpt2_cuda.gemm, the TF32 math-mode switch and the
# null-pointer argument run as they would on a GPU (only CuPy's own behaviour is assumed).

FAKE_CUPY = """
import ctypes, sys, time, types
import numpy as np
from emulator import RawModule

class DevArray(np.ndarray):
    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)

asarray = lambda x, dtype=None: np.array(x, dtype=dtype).view(DevArray)
array = asarray                       # both copy here, as cupy.array does from the host
zeros = lambda shape, dtype=np.float32: np.zeros(shape, dtype=dtype).view(DevArray)
asnumpy = lambda x: np.array(x)
sqrt = np.sqrt

class Event:
    def record(self): self.t = time.perf_counter()
    def synchronize(self): pass

class Device:
    id, compute_capability, pci_bus_id = 0, "90", "0000:00:00.0"

cuda = types.SimpleNamespace(
    runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, getDeviceProperties=lambda i: {"name": b"FakeGPU"},
                                  memGetInfo=lambda: (3 << 30, 16 << 30)),    # (free, total) bytes
    Event=Event, get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3, Device=Device,
    device=types.SimpleNamespace(get_cublas_handle=lambda: 7))
get_default_memory_pool = lambda: types.SimpleNamespace(free_bytes=lambda: 1 << 20)  # unused blocks in the pool

linalg = types.ModuleType("cupy._core._routines_linalg")
linalg.COMPUTE_TYPE_DEFAULT, linalg.COMPUTE_TYPE_TF32 = 1, 7
linalg.set_compute_type = lambda dtype, t: setattr(linalg, "current", t)
_core = types.ModuleType("cupy._core")
_core._routines_linalg = linalg
sys.modules["cupy._core"], sys.modules["cupy._core._routines_linalg"] = _core, linalg

cublas = types.ModuleType("cupy_backends.cuda.libs.cublas")
cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_T, cublas.CUBLAS_DEFAULT_MATH, cublas.CUBLAS_TF32_TENSOR_OP_MATH = 0, 1, 0, 3
cublas.math_mode, cublas.calls, cublas.alphas, cublas.betas = {}, [], set(), set()
cublas.setMathMode = lambda handle, mode: cublas.math_mode.__setitem__(handle, mode)
cublas.getMathMode = lambda handle: cublas.math_mode.get(handle, cublas.CUBLAS_DEFAULT_MATH)

def column_major(ptr, offset, rows, cols, ld):
    buf = np.ctypeslib.as_array((ctypes.c_float * (offset + (cols - 1) * ld + rows)).from_address(ptr))
    return np.lib.stride_tricks.as_strided(buf[offset:], shape=(rows, cols), strides=(4, 4 * ld))

def sgemmStridedBatched(handle, transa, transb, m, n, k, alpha, A, lda, sA, B, ldb, sB, beta, C, ldc, sC, batch):
    alpha, beta = ctypes.c_float.from_address(alpha).value, ctypes.c_float.from_address(beta).value
    cublas.calls.append((transa, transb))
    cublas.alphas.add(alpha)
    cublas.betas.add(beta)
    for i in range(batch):
        a = column_major(A, i * sA, *((m, k) if transa == 0 else (k, m)), lda)
        b = column_major(B, i * sB, *((k, n) if transb == 0 else (n, k)), ldb)
        c = column_major(C, i * sC, m, n, ldc)
        c[...] = alpha * ((a if transa == 0 else a.T) @ (b if transb == 0 else b.T)) + (beta * c if beta else 0)
cublas.sgemmStridedBatched = sgemmStridedBatched
for name in ("cupy_backends", "cupy_backends.cuda", "cupy_backends.cuda.libs"):
    sys.modules[name] = types.ModuleType(name)
sys.modules["cupy_backends.cuda.libs"].cublas = cublas
sys.modules["cupy_backends.cuda.libs.cublas"] = cublas
"""

GPU_PATH_CHECK = """
import os, sys
import numpy as np
sys.path[:0] = [{fake!r}, {repo!r}, {tests!r}]
import train_gpt2_cuda as cu, train_gpt2 as npt
from llmc import formats
from llmc.model import param_shapes
from test_cuda_trainer import CONFIG, B, T, batch, assert_close
from cupy_backends.cuda.libs import cublas
assert not cu.EMULATE and cu.NO_GPU is None and type(cu.xp.zeros(1)).__name__ == "DevArray"
linalg = sys.modules["cupy._core._routines_linalg"]
assert cu.set_tf32(1) is True and cublas.math_mode[7] == 3 and linalg.current == linalg.COMPUTE_TYPE_TF32
assert cu.set_tf32(0) is False and cublas.math_mode[7] == 0 and linalg.current == linalg.COMPUTE_TYPE_DEFAULT
ours, ref = cu.gpt2_build_from_checkpoint({ckpt!r}), npt.gpt2_build_from_checkpoint({ckpt!r})
x, y = batch(1)
# the device's free bytes and the pool's unused ones, less cuBLAS's headroom, read once its handle exists
free = (3 << 30) + (1 << 20) - cu.CUBLAS_HEADROOM
calls, mem_info = [], cu.xp.cuda.runtime.memGetInfo
cu.xp.cuda.device.get_cublas_handle = lambda: calls.append("handle") or 7
cu.xp.cuda.runtime.memGetInfo = lambda: calls.append("memGetInfo") or mem_info()
assert cu.device_memory() == (free, 16 << 30) and calls == ["handle", "memGetInfo"]
largest = cu.largest_batch_size(CONFIG, T, 1, free)
assert cu.state_bytes_to_allocate(CONFIG, largest, T, 1) <= free < cu.state_bytes_to_allocate(CONFIG, largest + 1, T, 1)
assert cu.memory_report(CONFIG, B, T, 1, cu.device_memory())[-1] == f"estimated maximum batch size at T={{T}}: {{largest}}"
for step in range(3):
    for tr, m in ((cu, ours), (npt, ref)):
        tr.gpt2_zero_grad(m)
        tr.gpt2_forward(m, x, y, B, T)
        if step == 0:
            m.logits0 = tr.to_numpy(m.acts.logits)[:, :, :CONFIG.vocab_size].copy()
        tr.gpt2_backward(m)
        m.norm = tr.gpt2_calculate_grad_norm(m)
    assert_close("loss", ours.mean_loss, ref.mean_loss)
    if step == 0:
        assert_close("logits", ours.logits0, ref.logits0)
        for name, _ in param_shapes(CONFIG):
            assert_close("d" + name, cu.to_numpy(getattr(ours.grads, name)), getattr(ref.grads, name))
    for tr, m in ((cu, ours), (npt, ref)):
        tr.gpt2_update(m, 1e-2, 0.9, 0.95, 1e-8, 0.0, step + 1, grad_scale=tr.grad_clip_scale(m.norm, 1.0))
assert set(cublas.calls) == {{(0, 0), (0, 1), (1, 0)}}, set(cublas.calls)  # N/N, N/T and T/N GEMMs all ran
assert cublas.alphas == {{1.0}} and cublas.betas == {{0.0, 1.0}}   # the module's alpha/beta scalars, read as floats
# a CuPy whose private set_compute_type is gone (AttributeError), or whose module is (ImportError):
# set_tf32 still switches the cuBLAS math mode
del linalg.set_compute_type
assert cu.set_tf32(1) is True and cublas.math_mode[7] == 3
sys.modules["cupy._core._routines_linalg"] = None
del sys.modules["cupy._core"]._routines_linalg
assert cu.set_tf32(0) is False and cublas.math_mode[7] == 0
print("gpu path ok", len(cublas.calls), "gemm calls")
"""


def test_gpu_code_path_with_a_fake_cupy_and_a_column_major_cublas(tmp_path, tiny_checkpoint):
    fake = tmp_path / "fake"
    (fake / "cupy").mkdir(parents=True)
    (fake / "cupy" / "__init__.py").write_text(FAKE_CUPY)
    script = GPU_PATH_CHECK.format(fake=str(fake), repo=REPO, tests=os.path.dirname(os.path.abspath(__file__)),
                                   ckpt=tiny_checkpoint)
    r = run_python(["-c", script])
    assert r.returncode == 0 and "gpu path ok" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# the CLI, end to end on the emulator

def test_gradients_accumulate_over_micro_steps(cuda_trainer, tiny_checkpoint):
    """Two backward passes without zeroing in between give twice the gradients (the residual
    stream's scratch gradient restarts from zero in each pass; the parameters' gradients add)."""
    cu = cuda_trainer
    m = cu.gpt2_build_from_checkpoint(tiny_checkpoint)
    x, y = batch(5)
    cu.gpt2_zero_grad(m)
    cu.gpt2_forward(m, x, y, B, T)
    cu.gpt2_backward(m)
    once = cu.to_numpy(m.grads_memory).copy()
    cu.gpt2_forward(m, x, y, B, T)
    cu.gpt2_backward(m)
    assert_close("grads after two passes", cu.to_numpy(m.grads_memory), 2 * once, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cli_trains_validates_samples_and_writes_files(tmp_path, tiny_checkpoint, precision):
    """The whole loop through the CLI: -p fp32, and the emulator's default (-p auto: bf16, as an sm_90)."""
    rng = np.random.default_rng(4)
    V = CONFIG.vocab_size
    train, val = tmp_path / "tiny_train.bin", tmp_path / "tiny_val.bin"
    formats.write_data_shard(str(train), rng.integers(0, V, size=2000))
    formats.write_data_shard(str(val), rng.integers(0, V, size=500))
    # a tokenizer for the tiny vocabulary, read from the working directory as llm.c does: token i is
    # the letter chr(ord('a') + i % 26), the last one (V-1) the EOT
    tokens = [bytes([ord("a") + i % 26]) for i in range(V - 1)] + [b"<|endoftext|>"]
    formats.write_tokenizer_file(str(tmp_path / "gpt2_tokenizer.bin"), tokens, V - 1)
    out = tmp_path / "log"
    r = run_python([os.path.join(REPO, "train_gpt2_cuda.py")], "-e", tiny_checkpoint, "-i", train, "-j", val,
                   "-o", out, "-b", B, "-t", T, "-d", 2 * B * T, "-x", 4, "-v", 2, "-m", 3, "-s", 2, "-g", 6,
                   "-l", 1e-2, *(["-p", "fp32"] if precision == "fp32" else []), env={"LLMC_EMULATE": "1"},
                   cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    if precision == "fp32":
        assert "precision: fp32" in lines and "TF32: disabled" in lines
    else:
        assert ("precision: bf16 parameters, gradients and activations; fp32 AdamW state, fp32 master weights"
                in lines) and not any(line.startswith("TF32") for line in lines)
    assert f"padded_vocab_size: {CONFIG.padded_vocab_size}" in lines
    assert f"batch: B={B} T={T}, total {2 * B * T} tokens = 2 micro-step(s); 4 steps" in lines
    assert "AdamW: lr 0.01 (cosine, warmup 0, final frac 1), betas (0.9, 0.95), eps 1e-08, weight decay 0, grad clip 1" in lines
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 4 and steps[0].startswith("step    1/4: train loss ") and "tok/s, MFU n/a) norm " in steps[0], steps
    val_losses = [float(line.split()[-1]) for line in lines if line.startswith("val loss ")]
    assert len(val_losses) == 3 and val_losses[-1] < val_losses[0], val_losses   # it learns
    samples = [lines[i + 2] for i, line in enumerate(lines) if line == "generating:"]
    assert len(samples) == 2 and all(len(s) == 5 and s.isalpha() for s in samples), samples  # 5 decoded letters
    log = (out / "main.log").read_text().splitlines()
    assert [line.split()[0] for line in log if "tel:" in line] == ["s:0", "s:2", "s:4"], log
    assert [line.split()[0] for line in log if "trl:" in line] == ["s:0", "s:1", "s:2", "s:3"], log
    final = str(out / "model_00000004.bin")
    assert formats.read_header(final, formats.MODEL_MAGIC, (3, 5))[0][1] == {"fp32": 3, "bf16": 5}[precision]
    config, params = formats.read_model_file(final)
    _, initial = formats.read_model_file(tiny_checkpoint)
    assert config == CONFIG and np.all(np.isfinite(params)) and 1e-3 < np.abs(params - initial).max() < 1.0


def test_cli_reports_bad_input_in_one_line(tmp_path, tiny_checkpoint):
    r = run_python([os.path.join(REPO, "train_gpt2_cuda.py")], "-e", tiny_checkpoint, "-i", tmp_path / "none_*.bin",
                   "-j", tmp_path / "none.bin", "-t", T, env={"LLMC_EMULATE": "1"}, cwd=str(tmp_path))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: no data files match"), r.stderr
    assert "Traceback" not in r.stderr
