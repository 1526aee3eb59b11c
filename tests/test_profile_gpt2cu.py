"""dev/profile_gpt2cu.py without a GPU: its emulator table against the traffic counter, its launch timer, its
reading of ncu's CSV, and its bad input.

On the emulator the script trains one step of a tiny model (L2 NH2 C128: head size 64, so bf16 takes the
flash attention kernels) with the traffic counter on. Its per-kernel launches and bytes must be the ones a
second, independent count of the same step gives (perf_model.count_training_step on a fresh model of the
same file and batch), and its model column perf_model's formulas. The GPU paths are checked in pieces: the
CUDA-event timer runs on the emulator's stand-in events (calls per kernel over two steps), and the ncu
parser reads a CSV written here in ncu's raw format.
"""

import collections

import numpy as np
import pytest

import perf_model
import profile_gpt2cu
from conftest import emulated_cuda_trainer
from llmc import formats
from llmc.model import GPT2Config, num_parameters

B, T = 2, 16
TINY = GPT2Config(max_seq_len=16, vocab_size=200, num_layers=2, num_heads=2, channels=128, padded_vocab_size=256)


@pytest.fixture(scope="module")
def cu():
    return emulated_cuda_trainer("train_gpt2_cuda_profiled")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("profile") / "tiny.bin")
    rng = np.random.default_rng(0)
    formats.write_model_file(path, TINY, (0.05 * rng.standard_normal(num_parameters(TINY))).astype(np.float32))
    return path


def table(text, title):
    """{kernel: [numbers]} of the table that opens with `title` in the script's output."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 1
    rows = {}
    for line in lines[start:]:
        if not line.strip() or line.startswith(("step ", "[")):
            break
        name, fields = line[:44].strip(), line[44:].split()
        rows[name] = fields
    return rows


def independent_count(cu, path):
    """The same step counted again, apart from the script: {kernel: (launches, bytes read + written)}."""
    args = profile_gpt2cu.parse_args(["-e", path, "-b", str(B), "-t", str(T)], cu.TRAIN_GPT2_CU_DEFAULTS)
    settings = cu.device_setup(args)
    model = cu.gpt2_build_from_descriptor(path, settings=settings)
    cu.gpt2_allocate_state(model, B, T)
    x, y = perf_model.random_batch(TINY.vocab_size, B, T)
    launches, gemms, _ = perf_model.count_training_step(cu, model, x, y, B, T)
    counts = collections.defaultdict(lambda: [0, 0])
    for name, nbytes in [(r.kernel, r.bytes_read + r.bytes_written) for r in launches] + \
            [(f"gemm ({g.caller})", g.bytes_read + g.bytes_written) for g in gemms]:
        counts[name][0] += 1
        counts[name][1] += nbytes
    return {name: tuple(v) for name, v in counts.items()}, settings, len(np.unique(x))


def test_emulator_table_is_the_traffic_counters(cu, tiny_model, capsys):
    result = profile_gpt2cu.main(["-e", tiny_model, "-b", str(B), "-t", str(T), "-x", "1"], trainer=cu)
    out = capsys.readouterr().out
    assert result["mode"] == "emulator" and "[profile] emulator: one step counted on the emulator" in out
    counted = {name: (int(f[0]), int(f[1])) for name, f in table(out, "kernel (emulator, one step)").items()}
    expected, settings, distinct = independent_count(cu, tiny_model)
    assert counted == expected
    assert "flash_attention_forward_kernel" in counted and "gemm (matmul_backward)" in counted
    # the main table: the same launches and MB, and the model's MB and H100 time from perf_model's formulas
    main = table(out, "kernel ")
    flash, _ = cu.attention_path(TINY, settings.precision, settings.flash_attention)
    formulas = perf_model.step_launches(cu, TINY, B, T, settings.precision, settings.recompute,
                                        settings.master_weights, distinct, settings.gelu_fusion, flash)
    rows = {r.name: r for r in perf_model.tabulate(formulas, lambda f: f.kernel, settings.gemm_precision)[0]}
    h100 = [label for label, _, _ in perf_model.GPUS].index("H100-SXM")
    for name, (launches, nbytes) in counted.items():
        fields = main[name]
        assert int(fields[0]) == launches and float(fields[3]) == pytest.approx(nbytes / 1e6, abs=5e-5), (name, fields)
        model_bytes = rows[name].bytes_read + rows[name].bytes_written
        assert float(fields[6]) == pytest.approx(model_bytes / 1e6, abs=5e-5), name
        assert float(fields[7]) == pytest.approx(rows[name].seconds[h100] * 1e6, abs=0.05), name
    cupy_rows = [name for name in main if name.startswith("cupy ")]   # what the model has and no kernel runs
    assert cupy_rows and all(main[name][:6] == ["-"] * 6 for name in cupy_rows)


def test_launch_timer_counts_every_launch(cu, tiny_model, capsys):
    args = profile_gpt2cu.parse_args(["-e", tiny_model, "-b", str(B), "-t", str(T)], cu.TRAIN_GPT2_CU_DEFAULTS)
    settings = cu.device_setup(args)
    model = cu.gpt2_build_from_descriptor(tiny_model, settings=settings)
    cu.gpt2_allocate_state(model, B, T)
    x, y = perf_model.random_batch(TINY.vocab_size, B, T)
    measured = profile_gpt2cu.Measured()
    kernel, gemm = cu.kernel, cu.gemm
    seconds = profile_gpt2cu.timed_steps(cu, model, x, y, B, T, 2, measured)
    assert cu.kernel is kernel and cu.gemm is gemm                   # the wrappers are gone afterwards
    expected, _, _ = independent_count(cu, tiny_model)
    assert dict(measured.calls) == {name: 2 * launches for name, (launches, _) in expected.items()}
    assert all(s >= 0 for s in measured.seconds.values()) and sum(measured.seconds.values()) <= seconds


NCU_CSV = '''==PROF== Connected to process 123
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","gpu__time_duration.sum","dram__bytes_read.sum","dram__bytes_write.sum"
"","","","","","","","nsecond","byte","byte"
"0","123","python3","h","layernorm_forward_x128_kernel","1","7","2500","1000000","500000"
"1","123","python3","h","void flash_attention_forward_kernel<64>(const __nv_bfloat16*, float*, int)","1","7","10000","4000000","2000000"
"2","123","python3","h","sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64","1","7","40000","8000000","4000000"
"3","123","python3","h","layernorm_forward_x128_kernel","1","7","3500","1000000","500000"
==PROF== Disconnected from process 123
'''


def test_ncu_csv_and_names(tmp_path, capsys):
    measured = profile_gpt2cu.Measured()
    profile_gpt2cu.parse_ncu_csv(NCU_CSV, measured)
    assert dict(measured.calls) == {"layernorm_forward_x128_kernel": 2, "flash_attention_forward_kernel": 1,
                                    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": 1}
    assert measured.seconds["layernorm_forward_x128_kernel"] == pytest.approx(6e-6)
    assert measured.bytes["layernorm_forward_x128_kernel"] == 3_000_000
    assert measured.bytes["flash_attention_forward_kernel"] == 6_000_000
    with pytest.raises(SystemExit, match="ncu printed no kernel rows"):
        profile_gpt2cu.parse_ncu_csv("==PROF== nothing\n", profile_gpt2cu.Measured())
    # the child process under ncu: a stand-in ncu that prints the CSV above, then one that fails
    fake = tmp_path / "ncu"
    fake.write_text(f"#!/bin/sh\ncat <<'CSV'\n{NCU_CSV}CSV\n")
    fake.chmod(0o755)
    measured = profile_gpt2cu.Measured()
    profile_gpt2cu.run_under_ncu(str(fake), ["-e", "d12"], measured)
    line = capsys.readouterr().out
    assert measured.calls["layernorm_forward_x128_kernel"] == 2 and line.startswith(
        f"[profile] {fake} --csv --page raw --print-units base --profile-from-start off --metrics "
        "gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum ")
    assert line.rstrip().endswith("profile_gpt2cu.py -e d12 --child 1  (kernels serialized, each timed alone)")
    fake.write_text("#!/bin/sh\necho '==ERROR== ERR_NVGPUCTRPERM - no permission' >&2\nexit 1\n")
    with pytest.raises(SystemExit, match=r"^profile_gpt2cu.py: ncu failed \(1\): ==ERROR== ERR_NVGPUCTRPERM.*--ncu 0"):
        profile_gpt2cu.run_under_ncu(str(fake), ["-e", "d12"], profile_gpt2cu.Measured())
    labels = [label for label, _, _ in perf_model.GPUS]
    for device, label in (("NVIDIA H200", "H200"), ("NVIDIA H100 80GB HBM3", "H100-SXM"),
                          ("NVIDIA A100-SXM4-80GB", "A100-80GB"), ("NVIDIA A100-PCIE-40GB", "A100-40GB")):
        assert profile_gpt2cu.model_gpu(device) == (labels.index(label), None), device
    gpu, note = profile_gpt2cu.model_gpu("Tesla T4")
    assert labels[gpu] == "H100-SXM" and note == "Tesla T4 is none of perf_model's GPUs: the model column is an H100's"


def test_bad_input_is_one_line(cu, tiny_model, capsys):
    with pytest.raises(SystemExit) as e:
        profile_gpt2cu.main(["-e", tiny_model, "-b", str(B), "-t", "64"], trainer=cu)
    assert str(e.value) == "profile_gpt2cu.py: -t 64 exceeds the model's max_seq_len 16"
    with pytest.raises(SystemExit) as e:
        profile_gpt2cu.main(["-e", "missing.bin", "-b", str(B), "-t", str(T)], trainer=cu)
    assert str(e.value).startswith("profile_gpt2cu.py: missing.bin: no such file; create it with python "
                                   "train_gpt2_torch.py"), e.value
    with pytest.raises(SystemExit):
        profile_gpt2cu.main(["-x", "0"], trainer=cu)
    assert capsys.readouterr().err.splitlines()[-1].endswith("-x, -b and -t must be positive, got -x 0 -b 16 -t 1024")
