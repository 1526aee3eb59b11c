"""llmc/mfu.py: the FLOPs per token, the peak table, the tokens/s average, and the step line that shows them."""

import pytest

from llmc.model import GPT2Config, num_parameters
from llmc.mfu import TokensPerSecond, flops_per_token, format_mfu, mfu_percent, peak_flops

D12 = GPT2Config(max_seq_len=1024, vocab_size=50257, num_layers=12, num_heads=12, channels=768,
                 padded_vocab_size=50304)


def test_flops_per_token_of_d12():
    """GPT-2 124M at T=1024: 6 * 124,475,904 (wte's pad rows included) + 6 * 12 * 768 * 1024."""
    N = num_parameters(D12)
    assert N == 124_475_904
    fpt = flops_per_token(N, D12.num_layers, D12.channels, 1024)
    assert fpt == 6 * 124_475_904 + 6 * 12 * 768 * 1024 == 803_478_528
    assert fpt == pytest.approx(6 * 124e6 + 6 * 12 * 768 * 1024, rel=5e-3)     # llm.c's ~6*124M + 6LCT


@pytest.mark.parametrize("name,precision,tflops", [
    ("NVIDIA A100-SXM4-40GB", "bf16", 312), ("NVIDIA A100-SXM4-80GB", "tf32", 156),
    ("NVIDIA A100 80GB PCIe", "fp32", 19.5),
    ("NVIDIA H100 80GB HBM3", "bf16", 989.5), ("NVIDIA H100 80GB HBM3", "tf32", 494.5),
    ("NVIDIA H100 PCIe", "bf16", 756.5), ("NVIDIA H100 PCIe", "tf32", 378),
    ("NVIDIA H200", "bf16", 989.5), ("NVIDIA H200", "fp32", 67),
])
def test_peak_table(name, precision, tflops):
    assert peak_flops(name, precision) == pytest.approx(tflops * 1e12)


def test_h200_has_the_h100_sxms_peak_and_unknown_devices_have_none():
    for precision in ("bf16", "tf32", "fp32"):
        assert peak_flops("NVIDIA H200", precision) == peak_flops("NVIDIA H100 80GB HBM3", precision)
    for name in ("NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB", "CPU", "", None,
                 "CPU (LLMC_EMULATE=1: NumPy + the kernel emulator, emulator/)"):
        assert peak_flops(name, "tf32") is None
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp8") is None                  # not in the table: n/a
    assert mfu_percent(1e15, 1.0, None) is None and mfu_percent(1e15, 0.0, 1e15) is None
    assert format_mfu(None, "tf32") == "MFU n/a"
    assert mfu_percent(494.5e12 / 4, 1.0, peak_flops("NVIDIA H100 80GB HBM3", "tf32")) == pytest.approx(25.0)
    assert format_mfu(25.04, "tf32") == "25.0% tf32 MFU"


def test_tokens_per_second_is_a_bias_corrected_average_without_the_first_step():
    ema = TokensPerSecond()
    assert ema.update(1000, 1.0) == 1000.0        # the first step: shown as measured, not averaged
    assert ema.update(100, 1.0) == pytest.approx(100.0)      # 0.05 * 100 / (1 - 0.95)
    # by hand: ema = 0.95 * 5 + 0.05 * 200 = 14.75; corrected by 1 - 0.95^2 = 0.0975
    assert ema.update(400, 2.0) == pytest.approx(14.75 / 0.0975)
    assert ema.update(100, 0.5) == pytest.approx((0.95 * 14.75 + 0.05 * 200) / (1 - 0.95 ** 3))
