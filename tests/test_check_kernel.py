"""dev/check_kernel.py, the one-command check of a kernel file, run on the emulator.

Its table is parsed and held to account here, independently of its own verdict: every kernel of every
kernels/*.cu has a row, every row is within tolerance, and the exit status agrees. A copy of kernels/
with a wrong constant in gelu.cu must fail it. The GPU timing path runs against a stand-in CuPy made of
the emulator (at the odd shape: at d12 the emulator would take minutes), to check its plumbing.
"""

import dataclasses
import os
import re
import shutil
import sys
import types

import numpy as np
import pytest

from conftest import run_script
from llmc.cuda_common import KERNEL_DIR

import check_kernel

# kernel, output, (compared with), max abs err, (tolerance), worst/tol, result
ROW_RE = re.compile(r"^(\w+_kernel)\s+(\S+)\s.*?\s(\d\.\d\de[-+]\d\d|nan)\s.*\s(\d+\.\d{3}|inf)\s+(OK|NOT OK)$")


def parse_rows(stdout):
    """(kernel, output, max abs err, worst/tol, ok) for each row of the table."""
    rows = []
    for line in stdout.splitlines():
        m = ROW_RE.match(line)
        if m:
            rows.append((m.group(1), m.group(2), float(m.group(3)), float(m.group(4)), m.group(5) == "OK"))
    return rows


def kernels_of(kernel_dir=KERNEL_DIR):
    names = []
    for f in check_kernel.kernel_files(kernel_dir):
        with open(os.path.join(kernel_dir, f + ".cu")) as fh:
            names += check_kernel.kernels_in(fh.read())
    return names


@pytest.fixture(scope="module")
def all_run(tmp_path_factory):
    return run_script("dev/check_kernel.py", "all", "--backend", "emulator",
                      cwd=tmp_path_factory.mktemp("check"), timeout=600)


def test_all_kernels_pass_on_the_emulator(all_run):
    """fp32: every kernel but flash attention's (bf16 only: one line says it is skipped, and it fails nothing)."""
    r = all_run
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-3000:]}"
    rows = parse_rows(r.stdout)
    fp32 = set(kernels_of()) - set(check_kernel.FLASH_KERNELS)
    assert set(check_kernel.FLASH_KERNELS) <= set(kernels_of())
    assert {k for k, *_ in rows} == fp32, "every kernel of kernels/*.cu but flash's has a row"
    assert r.stdout.count("skipped: kernels/flash_attention.cu is bf16-only") == 1
    assert len(rows) >= 28                           # some kernels write several outputs
    for kernel, output, err, ratio, ok in rows:
        assert ok and ratio < 1.0, f"{kernel} {output}: max abs err {err:.2e}, {ratio:.2f} of the tolerance"
        if output != "sum(out)":                       # the norm's sum of squares is ~1e5: 1e-5 relative
            assert err < 1e-4, f"{kernel} {output}: max abs err {err:.2e}"  # float32 vs float64, small shapes
    exact = [(k, o) for k, o, err, _, _ in rows if k in ("permute_kernel", "unpermute_backward_kernel")]
    assert len(exact) == 4 and all(err == 0.0 for k, o, err, _, _ in rows if (k, o) in exact)
    assert (f"{len(fp32)} kernels, {len(rows)} outputs: all within tolerance (flash_attention.cu skipped: "
            "bf16-only)") in r.stdout
    assert "nothing timed" in r.stdout


def test_one_file_and_a_broken_copy(tmp_path):
    """`check_kernel.py gelu` on kernels/ passes; on a copy with GELU's 0.044715 changed in gelu_value (the
    forward's math, shared by the per-element and the packed kernel) both forward kernels fail, naming the
    output, and the backward ones still pass: gelu_grad has its own copy of the constant."""
    r = run_script("dev/check_kernel.py", "gelu", "--backend", "emulator", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [row[:2] for row in parse_rows(r.stdout)] == [("gelu_forward_kernel", "out"),
                                                         ("gelu_backward_kernel", "dinp"),
                                                         ("gelu_forward_packed_kernel", "out"),
                                                         ("gelu_backward_packed_kernel", "dinp")]
    broken = tmp_path / "kernels"
    shutil.copytree(KERNEL_DIR, broken)
    src = (broken / "gelu.cu").read_text()
    forward = src.index("float gelu_value(")
    cut = src.index("0.044715f", forward)
    (broken / "gelu.cu").write_text(src[:cut] + "0.045f" + src[cut + len("0.044715f"):])
    r = run_script("dev/check_kernel.py", "gelu", "--backend", "emulator", "--kernel_dir", broken, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    rows = {(k, o): (ratio, ok) for k, o, _, ratio, ok in parse_rows(r.stdout)}
    for k in ("gelu_forward_kernel", "gelu_forward_packed_kernel"):
        assert rows[(k, "out")][1] is False and rows[(k, "out")][0] > 10
    for k in ("gelu_backward_kernel", "gelu_backward_packed_kernel"):
        assert rows[(k, "dinp")][1] is True
    assert "2 NOT OK: gelu_forward_kernel.out, gelu_forward_packed_kernel.out" in r.stdout


def test_a_kernel_without_a_check_fails(tmp_path):
    broken = tmp_path / "kernels"
    shutil.copytree(KERNEL_DIR, broken)
    with open(broken / "residual.cu", "a") as f:
        f.write('\nextern "C" __global__ void residual_twice_kernel(float* out, int N) {}\n')
    r = run_script("dev/check_kernel.py", "residual", "--backend", "emulator", "--kernel_dir", broken, cwd=tmp_path)
    assert r.returncode == 1 and "residual_twice_kernel" in r.stdout and "no check" in r.stdout, r.stdout


def test_timing_path_with_a_stand_in_cupy(monkeypatch, capsys):
    """time_file as on a GPU, with CuPy's RawModule, asarray and events played by the emulator and NumPy."""
    import emulator
    clock = iter(range(1000))

    class Event:
        def record(self):
            self.t = next(clock)

        def synchronize(self):
            pass

    cupy = types.ModuleType("cupy")
    cupy.RawModule = emulator.RawModule
    cupy.asarray = np.array
    cupy.cuda = types.SimpleNamespace(Event=Event, get_elapsed_time=lambda a, b: (b.t - a.t) * 1.0)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    rows = check_kernel.time_file("layernorm", KERNEL_DIR, repeats=2, shape=check_kernel.ODD)
    out = capsys.readouterr().out
    assert [k for _, k, _, _ in rows] == ["layernorm_forward_kernel", "layernorm_backward_kernel",
                                          "layernorm_backward_sum_kernel", "layernorm_backward_sum_split_kernel",
                                          "fused_residual_layernorm_forward_kernel", "layernorm_forward_x128_kernel",
                                          "layernorm_backward_x128_kernel", "layernorm_backward_sum3_split_kernel",
                                          "fused_residual_layernorm_forward_x128_kernel",
                                          "layernorm_backward_onepass_kernel"]
    s = check_kernel.ODD
    n = s.B * s.T * s.C * 4
    # forward: out, inp (B,T,C) + mean, rstd (B,T) + weight, bias (C); 1 ms per 2 launches -> 0.5 ms
    fwd_bytes = 2 * n + 2 * s.B * s.T * 4 + 2 * s.C * 4
    assert rows[0][2] == 0.5 and rows[0][3] == pytest.approx(fwd_bytes / 0.5e-3 / 1e9)
    assert "layernorm_backward_kernel" in out
    rows = check_kernel.time_file("encoder", KERNEL_DIR, repeats=2, shape=check_kernel.ODD)  # a 2-D grid
    assert [k for _, k, _, _ in rows] == ["encoder_forward_kernel", "encoder_forward_packed_kernel",
                                          "encoder_backward_wte_kernel", "encoder_backward_wpe_kernel",
                                          "encoder_backward_wpe_x128_kernel"]
    assert "encoder_backward_wte_kernel" in capsys.readouterr().out
    # with a bandwidth (an H200's, by the name CUDA gives it) each row prints the model's ms, bytes / bandwidth,
    # and the measured time over it: the forward moves fwd_bytes in 0.5 ms
    label, bandwidth = check_kernel.modeled_bandwidth("NVIDIA H200")
    assert (label, bandwidth) == ("H200", 4.8e12) and check_kernel.modeled_bandwidth("NVIDIA H100 PCIe")[0] == "H100-SXM"
    assert check_kernel.modeled_bandwidth("Tesla T4") is None
    check_kernel.time_file("layernorm", KERNEL_DIR, repeats=2, shape=check_kernel.ODD, bandwidth=bandwidth)
    row = capsys.readouterr().out.splitlines()[0].split()
    model_ms = fwd_bytes / bandwidth * 1e3
    assert row[0] == "layernorm_forward_kernel" and float(row[-2]) == pytest.approx(model_ms, abs=1e-4)
    assert float(row[-1][:-1]) == pytest.approx(0.5 / model_ms, rel=0.01)
    # flash (bf16 only): its three recorded launches, the model column from flash_tiles' bytes, not the arguments'
    rows = check_kernel.time_file("flash_attention", KERNEL_DIR, repeats=2, shape=check_kernel.ODD, precision="bf16",
                                  bandwidth=bandwidth)
    assert [k for _, k, _, _ in rows] == list(check_kernel.FLASH_KERNELS)
    lines = capsys.readouterr().out.splitlines()
    launches = check_kernel.flash_launches(dataclasses.replace(check_kernel.ODD, floatx="bf16"),
                                           np.random.default_rng(0), reference=False)
    for (_, kernel, ms, _), line, lc in zip(rows, lines, launches):
        assert line.split()[0] == kernel and lc.model_bytes > 0
        assert float(line.split()[-1][:-1]) == pytest.approx(ms / (lc.model_bytes / bandwidth * 1e3), rel=0.01)
    assert check_kernel.time_file("flash_attention", KERNEL_DIR, repeats=2, shape=check_kernel.ODD) == []
    assert "not timed, bf16-only" in capsys.readouterr().out


def test_all_kernels_pass_in_bf16_and_a_truncating_store_fails(tmp_path):
    """`--precision bf16`: every kernel built with -DENABLE_BF16, within bf16's tolerances (one rounding,
    2^-8 relative, on top of the fp32 ones; 2^-7 where the kernel rounds stochastically), the master
    weights a row of their own. A copy of residual.cu that truncates its float sum to bf16 instead of
    rounding to nearest (errors up to 2^-7 relative, which fp32's tolerances would never see) fails."""
    r = run_script("dev/check_kernel.py", "all", "--backend", "emulator", "--precision", "bf16", cwd=tmp_path,
                   timeout=600)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-3000:]}"
    assert "floatX = bf16 (-DENABLE_BF16)" in r.stdout
    rows = parse_rows(r.stdout)
    assert {k for k, *_ in rows} == set(kernels_of())
    assert ("adamw_kernel", "master") in {(k, o) for k, o, *_ in rows}
    assert all(ok and ratio < 1.0 for *_, ratio, ok in rows), r.stdout
    # flash's five outputs, computed (not copied: nonzero errors) and well inside 2u of their scale
    flash = {(k, o): (err, ratio) for k, o, err, ratio, _ in rows if k in check_kernel.FLASH_KERNELS}
    assert sorted(flash) == sorted([("flash_attention_forward_kernel", "out"), ("flash_attention_forward_kernel", "lse"),
                                    ("flash_attention_backward_dq_kernel", "dq"),
                                    ("flash_attention_backward_dkdv_kernel", "dk"),
                                    ("flash_attention_backward_dkdv_kernel", "dv")])
    assert all(0 < err and ratio < 0.6 for err, ratio in flash.values()), flash
    assert flash[("flash_attention_forward_kernel", "lse")][0] < 1e-5
    assert "skipped" not in r.stdout
    assert f"{len(set(kernels_of()))} kernels, {len(rows)} outputs: all within tolerance" in r.stdout

    broken = tmp_path / "kernels"
    shutil.copytree(KERNEL_DIR, broken)
    src = (broken / "residual.cu").read_text()
    store = "out[i] = (floatX)((float)inp1[i] + (float)inp2[i]);"
    assert store in src
    truncate = "out[i] = __ushort_as_bfloat16((unsigned short)(__float_as_uint((float)inp1[i] + (float)inp2[i]) >> 16));"
    (broken / "residual.cu").write_text(src.replace(store, truncate))
    r = run_script("dev/check_kernel.py", "residual", "--backend", "emulator", "--precision", "bf16",
                   "--kernel_dir", broken, cwd=tmp_path)
    assert r.returncode == 1 and "1 NOT OK: residual_forward_kernel.out" in r.stdout, r.stdout + r.stderr


def test_flash_rows_fail_on_a_broken_copy(tmp_path):
    """A copy of flash_attention.cu whose backward drops the diagonal (kj < qi: no key attends to itself)
    fails dq, dk and dv, and only those: the backward reads the reference's out and lse, so the forward
    rows stay OK."""
    broken = tmp_path / "kernels"
    shutil.copytree(KERNEL_DIR, broken)
    src = (broken / "flash_attention.cu").read_text()
    mask = "bool valid = kj <= qi && kj < T && qi < T;"
    assert src.count(mask) == 1
    (broken / "flash_attention.cu").write_text(src.replace(mask, mask.replace("kj <= qi", "kj < qi")))
    r = run_script("dev/check_kernel.py", "flash_attention", "--backend", "emulator", "--precision", "bf16",
                   "--kernel_dir", broken, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    rows = {(k, o): (ratio, ok) for k, o, _, ratio, ok in parse_rows(r.stdout)}
    assert rows[("flash_attention_forward_kernel", "out")][1] and rows[("flash_attention_forward_kernel", "lse")][1]
    for k, o in (("flash_attention_backward_dq_kernel", "dq"), ("flash_attention_backward_dkdv_kernel", "dk"),
                 ("flash_attention_backward_dkdv_kernel", "dv")):
        assert not rows[(k, o)][1] and rows[(k, o)][0] > 2, (k, o, rows[(k, o)])
    assert "3 NOT OK: flash_attention_backward_dq_kernel.dq" in r.stdout


def test_flash_launch_shapes_come_from_the_trainer():
    """The flash rows' launches are the ones train_gpt2_cuda.py's launchers make (grid, block, shared memory),
    recorded, with dev/perf_model.py's flash_tiles bytes; in fp32 there are none."""
    shape = dataclasses.replace(check_kernel.ODD, floatx="bf16")
    launches = check_kernel.flash_launches(shape, np.random.default_rng(0), reference=False)
    cu = check_kernel.launch_trainer()
    B, T, C, NH = check_kernel.FLASH_CHECK
    hs = C // NH
    assert (B, T, hs) == (2, 37, 64)
    assert [(lc.kernel, lc.grid, lc.block, lc.shared_mem) for lc in launches] == [
        ("flash_attention_forward_kernel", (B * NH, 1), 128, cu.flash_shared_bytes(hs, False)),   # 64-row tiles
        ("flash_attention_backward_dq_kernel", (B * NH, 2), 128, cu.flash_shared_bytes(hs, True)),  # 32-row tiles
        ("flash_attention_backward_dkdv_kernel", (B * NH, 2), 128, cu.flash_shared_bytes(hs, True))]
    assert all(a.dtype != np.uint16 for lc in launches for a in lc.args if isinstance(a, np.ndarray))
    # the forward's per-head traffic by hand: one 64-row query tile (37 rows of 128 bytes) and two key tiles
    # (32 and 5 rows, k and v); out (37 rows) and lse (37 floats) written
    assert launches[0].model_bytes == B * NH * (37 * 128 + 2 * 37 * 128 + 37 * 128 + 4 * 37)
    assert check_kernel.flash_launches(check_kernel.ODD, np.random.default_rng(0), reference=False) == []


def test_adamw_multi_tensor_row_fails_on_broken_copies(tmp_path):
    """adamw_multi_tensor_kernel's row (a ZeRO-1 rank 1 of 2 over GPT-2's 16 tensors) sees a copy that decays
    every tensor (the table's flag ignored: params off, m and v fine) and one that steps through the parameters
    by the piece's size instead of the layer's stride (the wrong pieces moved: params, m, v all off)."""
    def run(old, new):
        broken = tmp_path / f"kernels{len(list(tmp_path.iterdir()))}"
        shutil.copytree(KERNEL_DIR, broken)
        src = (broken / "adamw.cu").read_text()
        assert src.count(old) == 1
        (broken / "adamw.cu").write_text(src.replace(old, new))
        r = run_script("dev/check_kernel.py", "adamw", "--backend", "emulator", "--kernel_dir", broken, cwd=tmp_path)
        assert r.returncode == 1, r.stdout + r.stderr
        return {o for k, o, _, _, ok in parse_rows(r.stdout) if k == "adamw_multi_tensor_kernel" and not ok}
    assert run("float decay = row[6] ? weight_decay : 0.0f;", "float decay = weight_decay;") == {"params"}
    assert run("long long w = row[3] + layer * row[4] + i", "long long w = row[3] + layer * row[2] + i") == {
        "params", "m", "v"}
