"""-ge (llm.c's gelu_fusion): GELU fused into the fc layer's GEMMs by cuBLASLt's epilogues.

-ge 1: the fc forward is one GEMM with GELU_AUX_BIAS (bias added, GELU applied, the pre-GELU kept in fch as the
aux matrix); -ge 2: also fcproj's dinp GEMM with DGELU (the product times gelu'(fch)), no gelu_backward launch.
On the emulator (train_gpt2_cuda's NumPy gemm with the same epilogues) we check the fused layers and the whole
model against -ge 0; through a fake CuPy and a fake libcublasLt (a table of ctypes callbacks that checks every
attribute it is given and computes with NumPy) the GPU code path, ctypes marshaling included, against the
NumPy trainer; and the flag's errors.

Rounding points (bf16), the same in the emulator and, as cuBLASLt documents its epilogues, on a GPU: everything
between the GEMM's fp32 sum and the store is fp32, and each stored tensor is rounded once. So fch (the aux) has
the same bits as -ge 0's (product + bias in fp32, one rounding, as -ge 0's bias-then-beta=1 GEMM), fch_gelu is
GELU of the unrounded sum where -ge 0's gelu_forward reads the rounded fch (apart by at most the input's half
step through gelu' <= 1.13 and the outputs' half steps), and DGELU multiplies the unrounded product
where -ge 0 rounds it into dinp first. fp32: the same values up to float32's last bits (NumPy's tanh against
the kernel's tanhf), so 1e-5 relative.
"""

import os
import sys

import numpy as np
import pytest

from conftest import emulated_cuda_trainer
from llmc import formats
from llmc.model import param_shapes
from llmc.formats import bf16_to_f32, f32_to_bf16
from test_cuda_trainer import B, CONFIG, FAKE_CUPY, T, batch, random_params, run_python

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))

BF16_STEP = 2.0 ** -7          # one bf16 step, relative (8 bits of mantissa: 2^-7 at the bottom of a binade)


@pytest.fixture(scope="module")
def cu():
    return emulated_cuda_trainer("train_gpt2_cuda_gelu_fusion")


def relative_error(ours, ref):
    """max |ours - ref| over max |ref|: the tensor's error on its own scale."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


# ----------------------------------------------------------------------------------------------
# the fused layers alone: matmul_forward with pre_gelu, matmul_backward with pre_gelu

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_fc_layer_against_the_unfused_one(cu, precision):
    rng = np.random.default_rng(0)
    Bs, Ts, C, OC = 2, 8, 32, 128
    dev = (lambda x: f32_to_bf16(x)) if precision == "bf16" else (lambda x: x.astype(np.float32))
    dtype = cu.BF16 if precision == "bf16" else np.float32
    inp, weight = dev(rng.standard_normal((Bs, Ts, C))), dev(0.2 * rng.standard_normal((OC, C)))
    bias = dev(0.5 * rng.standard_normal(OC))
    dout, wproj = dev(rng.standard_normal((Bs, Ts, C))), dev(0.2 * rng.standard_normal((C, OC)))
    results = {}
    for ge in (0, 1, 2):
        out, pre = np.zeros((Bs, Ts, OC), dtype), np.zeros((Bs, Ts, OC), dtype)
        cu.matmul_forward(out, inp, weight, bias, Bs, Ts, C, OC, pre_gelu=pre, gelu_fusion=ge)
        # fcproj's backward: dinp = d(pre) through GELU; dweight, dbias as always
        dinp, dweight, dbias = np.zeros((Bs, Ts, OC), dtype), np.zeros((C, OC), dtype), np.zeros(C, dtype)
        cu.matmul_backward(dinp, dweight, dbias, dout, out, wproj, None, Bs, Ts, OC, C, pre_gelu=pre, gelu_fusion=ge)
        results[ge] = {name: cu.to_numpy(x).copy() for name, x in
                       (("out", out), ("pre", pre), ("dinp", dinp), ("dweight", dweight), ("dbias", dbias))}
    ref = results[0]
    assert np.abs(ref["out"]).max() > 0.1 and np.abs(ref["dinp"]).max() > 0.1
    for ge in (1, 2):
        errors = {name: relative_error(results[ge][name], ref[name]) for name in ref}
        print(f"{precision} -ge {ge} vs -ge 0, max error / max |value|: "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
        if precision == "fp32":
            assert all(e <= 1e-5 for e in errors.values()), errors
        else:
            np.testing.assert_array_equal(results[ge]["pre"], ref["pre"])     # the aux: the same one rounding
            # GELU of the unrounded sum: pre's half step through gelu' (<= 1.13), and the two outputs' half
            # steps (plus a subnormal-sized slack); and not the same bits (the test would prove nothing)
            err = np.abs(results[ge]["out"] - ref["out"])
            bound = BF16_STEP * (0.6 * np.abs(ref["pre"]) + np.abs(ref["out"])) + 1e-6
            assert np.all(err <= bound), (err - bound).max()
            assert results[ge]["out"].tobytes() != ref["out"].tobytes()
            # dinp: -ge 2 rounds once where -ge 0 rounds twice; -ge 1 is -ge 0 there
            if ge == 1:
                np.testing.assert_array_equal(results[ge]["dinp"], ref["dinp"])
            else:
                err = np.abs(results[ge]["dinp"] - ref["dinp"])
                assert np.all(err <= 2 * BF16_STEP * np.abs(ref["dinp"]) + 1e-6), err.max()
            # dweight and dbias read out (fch_gelu) and dout: out's steps, summed over B*T rows
            assert errors["dweight"] <= 4 * BF16_STEP and errors["dbias"] == 0.0, errors


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bias_epilogue_is_the_unfused_bits(cu, precision):
    """-ge >= 1: every other linear's bias in the BIAS epilogue (product + bias in fp32, rounded once), which is
    -ge 0's sum: bf16's bias copy then the beta = 1 GEMM, fp32's GEMM then add_bias_kernel. The same bits, and
    no bias launch or copy left (the launches are counted)."""
    rng = np.random.default_rng(3)
    Bs, Ts, C, OC = 2, 8, 32, 96
    dev = (lambda x: f32_to_bf16(x)) if precision == "bf16" else (lambda x: x.astype(np.float32))
    dtype = cu.BF16 if precision == "bf16" else np.float32
    inp, weight, bias = dev(rng.standard_normal((Bs, Ts, C))), dev(0.2 * rng.standard_normal((OC, C))), \
        dev(rng.standard_normal(OC))
    outs, launched = {}, {}
    kernel = cu.kernel
    for ge in (0, 1, 2):
        launched[ge] = []
        cu.kernel = lambda file, name, floatx=np.float32, ge=ge: (launched[ge].append(name), kernel(file, name, floatx))[1]
        try:
            out = np.full((Bs, Ts, OC), 7, dtype)
            cu.matmul_forward(out, inp, weight, bias, Bs, Ts, C, OC, gelu_fusion=ge)
        finally:
            cu.kernel = kernel
        outs[ge] = out
    assert np.abs(cu.to_numpy(outs[0])).max() > 0.5
    assert outs[1].tobytes() == outs[0].tobytes() and outs[2].tobytes() == outs[0].tobytes()
    assert launched[1] == launched[2] == [] and launched[0] == ([] if precision == "bf16" else ["add_bias_packed_kernel"])
    # without the bias the epilogue is not asked for: the plain GEMM
    plain = np.zeros((Bs, Ts, OC), dtype)
    cu.matmul_forward(plain, inp, weight, None, Bs, Ts, C, OC, gelu_fusion=1)
    assert plain.tobytes() != outs[1].tobytes()


# ----------------------------------------------------------------------------------------------
# the whole model on the emulator: -ge 1 and 2 against -ge 0

# per-tensor tolerances (max error over max |value|): fp32 the order of operations only; bf16 what the fused
# roundings move through a tiny 2-layer model (test_gpt2.py's bf16 check allows more)
FORWARD_BACKWARD_TOL = {"fp32": 1e-5, "bf16": 3e-2}
LOSS_TOL = {"fp32": 1e-5, "bf16": 5e-3}    # 10 steps' losses, relative


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("recompute", [0, 1])
def test_model_gradients_with_gelu_fusion(cu, precision, recompute):
    params = random_params(CONFIG)
    x, y = batch(1)
    runs = {}
    for ge in (0, 1, 2):
        m = cu.GPT2(CONFIG, params, recompute, precision, True, gelu_fusion=ge)
        cu.gpt2_zero_grad(m)
        cu.gpt2_forward(m, x, y, B, T)
        acts = {name: cu.to_numpy(getattr(m.acts, name)).copy() for name in ("fch", "fch_gelu", "fcproj")}
        cu.gpt2_backward(m)
        grads = {name: cu.to_numpy(getattr(m.grads, name)).copy() for name, _ in param_shapes(CONFIG)}
        runs[ge] = (m.mean_loss, acts, grads)
    loss0, acts0, grads0 = runs[0]
    tol = FORWARD_BACKWARD_TOL[precision]
    for ge in (1, 2):
        loss, acts, grads = runs[ge]
        assert abs(loss - loss0) <= tol * abs(loss0)
        errors = {name: relative_error(acts[name], acts0[name]) for name in acts}
        errors.update({"d" + name: relative_error(grads[name], grads0[name]) for name in grads})
        print(f"{precision} -r {recompute} -ge {ge}: loss {loss:.6f} vs {loss0:.6f}; worst "
              + ", ".join(f"{k} {v:.1e}" for k, v in sorted(errors.items(), key=lambda kv: -kv[1])[:4]))
        bad = {k: v for k, v in errors.items() if v > tol}
        assert not bad, bad


def train_steps(cu, precision, ge, steps=10):
    m = cu.GPT2(CONFIG, random_params(CONFIG), 1, precision, True, gelu_fusion=ge)
    losses = []
    for step in range(steps):
        x, y = batch(100 + step % 3)
        cu.gpt2_zero_grad(m)
        cu.gpt2_forward(m, x, y, B, T)
        cu.gpt2_backward(m)
        norm = cu.gpt2_calculate_grad_norm(m)
        cu.gpt2_update(m, 1e-2, 0.9, 0.95, 1e-8, 0.0, step + 1, grad_scale=cu.grad_clip_scale(norm, 1.0))
        losses.append(m.mean_loss)
    return np.array(losses)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ten_training_steps_with_gelu_fusion(cu, precision):
    ref = train_steps(cu, precision, 0)
    assert ref[-1] < ref[0] - 0.5                         # it trains
    for ge in (1, 2):
        losses = train_steps(cu, precision, ge)
        rel = np.abs(losses - ref) / ref
        print(f"{precision} -ge {ge}: losses {np.round(losses, 4)}, max relative difference {rel.max():.1e}")
        assert rel.max() <= LOSS_TOL[precision], rel


# ----------------------------------------------------------------------------------------------
# the flag

def test_flag_is_listed_and_checked(tmp_path):
    r = run_python(["-c", "import sys; sys.modules['cupy'] = None; import train_gpt2_cuda as t; t.main(['-h'])"])
    assert r.returncode == 0
    assert any(line.startswith("  -ge ") and "(default: 0; llm.c's 2 on sm_90 waits for a GPU check" in line
               for line in r.stdout.splitlines()), r.stdout
    r = run_python([os.path.join(REPO, "train_gpt2_cuda.py"), "-ge", "3", "-e", "d6"], env={"LLMC_EMULATE": "1"},
                   cwd=str(tmp_path))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: -ge must be 0, 1 or 2 (GELU fused into the fc GEMMs by cuBLASLt: 0 none, 1 forward, "
        "2 forward and backward), got 3"], r.stderr
    r = run_python([os.path.join(REPO, "train_gpt2.py"), "-ge", "1"], cwd=str(tmp_path))   # the NumPy trainer
    assert r.returncode == 1 and "error: unknown flag -ge" in r.stderr


def test_cli_runs_fused_and_says_so(tmp_path):
    """gpu_check's gelu_fusion stage on the emulator: the same run with -ge 2 and -ge 0 through the CLI; the
    fused one names itself in the config block (the stage greps that line), the losses agree within bf16's
    rounding (LOSS_TOL)."""
    checkpoint, train, val = tmp_path / "gpt2_tiny.bin", tmp_path / "train.bin", tmp_path / "val.bin"
    formats.write_model_file(str(checkpoint), CONFIG, random_params(CONFIG))
    rng = np.random.default_rng(4)
    formats.write_data_shard(str(train), rng.integers(0, CONFIG.vocab_size, size=2000))
    formats.write_data_shard(str(val), rng.integers(0, CONFIG.vocab_size, size=500))
    losses = {}
    for ge in (0, 2):
        r = run_python([os.path.join(REPO, "train_gpt2_cuda.py")], "-e", checkpoint, "-i", train, "-j", val,
                       "-b", B, "-t", T, "-x", 4, "-v", 0, "-s", 0, "-l", 1e-2, "-ge", ge,
                       env={"LLMC_EMULATE": "1"}, cwd=str(tmp_path))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        lines = r.stdout.splitlines()
        fused = [line for line in lines if line.startswith("gelu fusion:")]
        assert fused == ([] if ge == 0 else ["gelu fusion: -ge 2 (bias + GELU in the fc GEMM, the other biases in "
                                             "theirs, GELU's gradient in fcproj's, cuBLASLt epilogues)"]), fused
        losses[ge] = np.array([float(line.split()[4]) for line in lines if line.startswith("step ")])
    assert len(losses[2]) == 4
    assert np.all(np.abs(losses[2] - losses[0]) <= LOSS_TOL["bf16"] * losses[0]), losses


# ----------------------------------------------------------------------------------------------
# the GPU code path: a fake CuPy (test_cuda_trainer's) and a fake libcublasLt
#
# FAKE_CUBLASLT is a table of ctypes callbacks with cublasLt.h's C signatures, written here independently of
# train_gpt2_cuda's own table: the trainer binds their addresses as it binds the real library's, so every
# argument crosses the C boundary. Each attribute is read back with the type and size cublasLt.h gives it
# (a wrong size is CUBLAS_STATUS_INVALID_VALUE), and cublasLtMatmul computes D from the raw pointers,
# layouts and epilogue with NumPy (fp32).

FAKE_CUBLASLT = r"""
import ctypes
import numpy as np

c = ctypes
DESC_TYPES = {3: c.c_int32, 4: c.c_int32, 7: c.c_int32, 8: c.c_void_p, 11: c.c_void_p, 12: c.c_int64,
              22: c.c_int32, 26: c.c_int32}                     # TRANSA, TRANSB, EPILOGUE, BIAS_POINTER, AUX_*, BIAS_DATA_TYPE
LAYOUT_TYPES = {5: c.c_int32, 6: c.c_int64}                    # BATCH_COUNT, STRIDED_BATCH_OFFSET
PREF_TYPES = {1: c.c_uint64}                                   # MAX_WORKSPACE_BYTES
S = 0x5EED                                                     # the fake CuPy's current stream


def matrix(ptr, rows, cols, ld, offset=0):
    # a column-major float32 matrix at ptr, as a writable NumPy view
    buf = np.ctypeslib.as_array((c.c_float * (offset + (cols - 1) * ld + rows)).from_address(ptr))
    return np.lib.stride_tricks.as_strided(buf[offset:], shape=(rows, cols), strides=(4, 4 * ld))


def gelu(x):
    return 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x ** 3)))


def gelu_grad(x):
    t = np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x ** 3)
    return (0.5 * (1.0 + np.tanh(t)) + 0.5 * x * (1.0 - np.tanh(t) ** 2) * np.float32(0.7978845608028654)
            * (1.0 + np.float32(3 * 0.044715) * x * x))


class FakeCublasLt:
    def __init__(self):
        self.objects, self.next_id, self.calls = {}, 0x1000, []
        P, I, U, L, Z = c.c_void_p, c.c_int, c.c_uint64, c.c_int64, c.c_size_t
        signatures = {
            "cublasLtCreate": (P,), "cublasLtMatmulDescCreate": (P, I, I),
            "cublasLtMatmulDescSetAttribute": (P, I, P, Z), "cublasLtMatmulDescDestroy": (P,),
            "cublasLtMatrixLayoutCreate": (P, I, U, U, L), "cublasLtMatrixLayoutSetAttribute": (P, I, P, Z),
            "cublasLtMatrixLayoutDestroy": (P,), "cublasLtMatmulPreferenceCreate": (P,),
            "cublasLtMatmulPreferenceSetAttribute": (P, I, P, Z), "cublasLtMatmulPreferenceDestroy": (P,),
            "cublasLtMatmulAlgoGetHeuristic": (P, P, P, P, P, P, P, I, P, P),
            "cublasLtMatmul": (P, P, P, P, P, P, P, P, P, P, P, P, P, P, Z, P)}
        for name, argtypes in signatures.items():
            setattr(self, name, c.CFUNCTYPE(c.c_int, *argtypes)(getattr(self, "_" + name[8:])))

    def new(self, out_ptr, **fields):
        self.next_id += 16
        self.objects[self.next_id] = dict(fields, attrs={})
        c.c_void_p.from_address(out_ptr).value = self.next_id
        return 0

    def set_attr(self, obj, attr, buf, size, types, kind):
        if obj not in self.objects or self.objects[obj]["kind"] != kind or attr not in types:
            return 7                                           # CUBLAS_STATUS_INVALID_VALUE
        if size != c.sizeof(types[attr]):
            return 7
        self.objects[obj]["attrs"][attr] = types[attr].from_address(buf).value
        return 0

    def destroy(self, obj, kind):
        return 0 if self.objects.pop(obj, {}).get("kind") == kind else 7

    def _Create(self, handle):
        c.c_void_p.from_address(handle).value = 0xABC
        return 0

    def _MatmulDescCreate(self, desc, compute, scale):
        return self.new(desc, kind="desc", compute=compute, scale=scale)

    def _MatmulDescSetAttribute(self, desc, attr, buf, size):
        return self.set_attr(desc, attr, buf, size, DESC_TYPES, "desc")

    def _MatmulDescDestroy(self, desc):
        return self.destroy(desc, "desc")

    def _MatrixLayoutCreate(self, layout, dtype, rows, cols, ld):
        return self.new(layout, kind="layout", dtype=dtype, rows=rows, cols=cols, ld=ld)

    def _MatrixLayoutSetAttribute(self, layout, attr, buf, size):
        return self.set_attr(layout, attr, buf, size, LAYOUT_TYPES, "layout")

    def _MatrixLayoutDestroy(self, layout):
        return self.destroy(layout, "layout")

    def _MatmulPreferenceCreate(self, pref):
        return self.new(pref, kind="pref")

    def _MatmulPreferenceSetAttribute(self, pref, attr, buf, size):
        return self.set_attr(pref, attr, buf, size, PREF_TYPES, "pref")

    def _MatmulPreferenceDestroy(self, pref):
        return self.destroy(pref, "pref")

    def _MatmulAlgoGetHeuristic(self, handle, desc, a, b, cc, d, pref, requested, results, count):
        assert handle == 0xABC and requested == 1
        assert self.objects[pref]["attrs"][1] == 32 << 20      # the 32 MiB workspace
        c.c_uint64.from_address(results).value = 42            # algo.data[0]: a marker cublasLtMatmul checks
        c.c_int.from_address(count).value = 1
        return 0

    def _Matmul(self, handle, desc, alpha, A, adesc, B, bdesc, beta, C, cdesc, D, ddesc, algo, ws, ws_size, stream):
        o = self.objects
        d_, la, lb, lc, ld_ = o[desc], o[adesc], o[bdesc], o[cdesc], o[ddesc]
        attrs = d_["attrs"]
        assert handle == 0xABC and c.c_uint64.from_address(algo).value == 42 and ws and ws_size == 32 << 20
        assert stream == S and C == D and d_["compute"] in (68, 77) and d_["scale"] == 0
        assert all(x["dtype"] == 0 and x["attrs"].get(5, 1) == 1 for x in (la, lb, lc, ld_))   # fp32, no batch
        alpha, beta = c.c_float.from_address(alpha).value, c.c_float.from_address(beta).value
        ta, tb, epilogue = attrs[3], attrs[4], attrs.get(7, 1)
        a = matrix(A, la["rows"], la["cols"], la["ld"])
        b = matrix(B, lb["rows"], lb["cols"], lb["ld"])
        d = matrix(D, ld_["rows"], ld_["cols"], ld_["ld"])
        product = (a.T if ta else a) @ (b.T if tb else b)
        assert product.shape == d.shape and (lc["rows"], lc["cols"], lc["ld"]) == (ld_["rows"], ld_["cols"], ld_["ld"])
        result = alpha * product + (beta * d if beta else 0)
        m, n = d.shape
        if epilogue == 4:                                      # BIAS
            assert attrs[26] == 0 and 11 not in attrs
            result = result + np.ctypeslib.as_array((c.c_float * m).from_address(attrs[8]))[:, None]
        elif epilogue == 164:                                  # GELU_AUX_BIAS
            assert attrs[26] == 0 and attrs[22] == 0 and attrs[12] >= m
            bias = np.ctypeslib.as_array((c.c_float * m).from_address(attrs[8]))
            result = result + bias[:, None]
            matrix(attrs[11], m, n, attrs[12])[...] = result
            result = gelu(result)
        elif epilogue == 192:                                  # DGELU
            assert 8 not in attrs and attrs[22] == 0 and attrs[12] >= m
            result = result * gelu_grad(matrix(attrs[11], m, n, attrs[12]))
        else:
            return 15                                          # CUBLAS_STATUS_NOT_SUPPORTED: only what -ge uses
        d[...] = result
        self.calls.append(dict(epilogue=epilogue, transa=ta, transb=tb, m=m, n=n, aux_ld=attrs.get(12),
                               compute=d_["compute"]))
        return 0
"""

GPU_PATH_CHECK = """
import sys, types
import numpy as np
sys.path[:0] = [{fake!r}, {repo!r}, {tests!r}]
import train_gpt2_cuda as cu, train_gpt2 as npt
from llmc import formats
from llmc.model import param_shapes
from llmc.cli import parse_args
from test_cuda_trainer import CONFIG, B, T, batch, assert_close
from fake_cublaslt import FakeCublasLt
assert not cu.EMULATE and cu.NO_GPU is None
cu.xp.cuda.get_current_stream = lambda: types.SimpleNamespace(ptr=0x5EED)

# no cuBLASLt: -ge 2 says so in one line and runs -ge 0
def missing():
    raise OSError("no libcublasLt found (tried libcublasLt.so.12)")
cu.cublaslt_library = missing
args = parse_args(["-ge", "2", "-p", "fp32"], cu.TRAIN_GPT2_CU_DEFAULTS)
settings = cu.device_setup(args)
assert settings.gelu_fusion == 0 and not any("gelu fusion" in line for line in settings.lines), settings.lines

fake = FakeCublasLt()
cu.cublaslt_library = lambda: fake
settings = cu.device_setup(parse_args(["-ge", "2", "-p", "fp32", "-f", "{tf32}"], cu.TRAIN_GPT2_CU_DEFAULTS))
lines = settings.lines
assert settings.gelu_fusion == 2 and "gelu fusion: -ge 2 (bias + GELU in the fc GEMM, the other biases in theirs, GELU's gradient in fcproj's, " \\
    "cuBLASLt epilogues)" in lines, lines
ours = cu.gpt2_build_from_descriptor({ckpt!r}, settings=settings, recompute={recompute})
assert ours.gelu_fusion == 2
ref = npt.gpt2_build_from_checkpoint({ckpt!r})
x, y = batch(1)
for step in range(3):
    for tr, m in ((cu, ours), (npt, ref)):
        tr.gpt2_zero_grad(m)
        tr.gpt2_forward(m, x, y, B, T)
        tr.gpt2_backward(m)
        m.norm = tr.gpt2_calculate_grad_norm(m)
    assert_close("loss", ours.mean_loss, ref.mean_loss)
    if step == 0:
        for name, _ in param_shapes(CONFIG):
            assert_close("d" + name, cu.to_numpy(getattr(ours.grads, name)), getattr(ref.grads, name))
    for tr, m in ((cu, ours), (npt, ref)):
        tr.gpt2_update(m, 1e-2, 0.9, 0.95, 1e-8, 0.0, step + 1, grad_scale=tr.grad_clip_scale(m.norm, 1.0))
L, C = CONFIG.num_layers, CONFIG.channels
# per step L forward GEMMs with GELU_AUX_BIAS, L backward ones with DGELU, in the column-major view:
# D (4C, B*T) = fcw^T... (TRANSA = T) with k = C; dinp D (4C, B*T) = fcprojw (4C, C) @ dresidual^T, k = C
forward = [c for c in fake.calls if c["epilogue"] == 164]
backward = [c for c in fake.calls if c["epilogue"] == 192]
biased = [c for c in fake.calls if c["epilogue"] == 4]         # qkv, attproj, fcproj: their bias in the epilogue
assert len(forward) == len(backward) == 3 * L and len(biased) == 3 * 3 * L and len(fake.calls) == 15 * L
assert [(c["m"], c["n"]) for c in biased[:3]] == [(3 * C, B * T), (C, B * T), (C, B * T)]
assert all((c["transa"], c["transb"], c["m"], c["n"], c["aux_ld"]) == (1, 0, 4 * C, B * T, 4 * C) for c in forward)
assert all((c["transa"], c["transb"], c["m"], c["n"], c["aux_ld"]) == (0, 0, 4 * C, B * T, 4 * C) for c in backward)
assert {{c["compute"] for c in fake.calls}} == {{77 if {tf32} else 68}}    # TF32 follows -f, as the cuBLAS GEMMs
assert set(o["kind"] for o in fake.objects.values()) == set(), fake.objects   # every descriptor destroyed
# an operand off a 16-byte boundary (an odd-sized buffer before it) is a one-line error, before any cuBLASLt call
buf, w, out = cu.xp.zeros(40, np.float32), cu.xp.zeros((4, 9), np.float32), cu.xp.zeros((4, 4), np.float32)
try:
    cu.cublaslt_gemm(out, buf[1:37].reshape(4, 9), w, False, True, "GELU_AUX_BIAS", cu.xp.zeros(4, np.float32),
                     cu.xp.zeros((4, 4), np.float32))
    raise AssertionError("no error")
except cu.ConfigError as e:
    assert str(e).startswith("-ge 1 and 2: cuBLASLt needs its operands on 16-byte boundaries") and str(e).endswith("run -ge 0")
assert len(fake.calls) == 15 * L
print("cublaslt path ok", len(fake.calls), "fused gemms")
"""


@pytest.mark.parametrize("recompute, tf32", [(1, 0), (0, 1)])
def test_gpu_code_path_with_a_fake_cublaslt(tmp_path, recompute, tf32):
    fake = tmp_path / "fake"
    (fake / "cupy").mkdir(parents=True)
    (fake / "cupy" / "__init__.py").write_text(FAKE_CUPY)
    (fake / "fake_cublaslt.py").write_text(FAKE_CUBLASLT)
    checkpoint = tmp_path / "gpt2_tiny.bin"
    formats.write_model_file(str(checkpoint), CONFIG, random_params(CONFIG))
    script = GPU_PATH_CHECK.format(fake=str(fake), repo=REPO, tests=TESTS, ckpt=str(checkpoint),
                                   recompute=recompute, tf32=tf32)
    r = run_python(["-c", script])
    assert r.returncode == 0 and "cublaslt path ok" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    if recompute == 1:
        assert "-ge 2: cuBLASLt cannot be loaded (no libcublasLt found (tried libcublasLt.so.12)): running -ge 0 " \
               "(no GELU fusion)" in r.stdout.splitlines()
