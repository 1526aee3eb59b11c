"""Model FLOPs utilization and tokens/s for the step line, as llm.c's train_gpt2.cu prints them.

MFU = the FLOPs the model needs per second / the device's dense peak FLOPs per second. The model's
FLOPs per token are counted as llm.c counts them (the PaLM paper's estimate):
    6 N          every parameter takes part in one multiply-add (2 FLOPs) forward and two backward
                 (the gradients of the input and of the weight); N counts wte's pad rows too
    + 6 L C T    attention's two (T,T) products per layer, q @ k^T and att @ v, forward and backward
So a step of B*T*grad_accum tokens needs flops_per_token * B*T*grad_accum FLOPs. The peak is the
datasheet's dense number for the precision the GEMMs run in (bf16, tf32 or fp32; the "with
sparsity" numbers are twice these). A device the table does not know, and the CPU, have no peak:
MFU is then None and the step line says "n/a".

tokens/s is smoothed as llm.c does: an exponential moving average with beta 0.95, bias-corrected
like AdamW's moments (divided by 1 - beta^n after n updates), and the first step (allocation,
cuBLAS warm-up) left out of it.
"""


def flops_per_token(num_parameters, num_layers, channels, seq_len):
    """The model's FLOPs per token of training (forward + backward), 6N + 6LCT."""
    return 6 * num_parameters + 6 * num_layers * channels * seq_len


# dense peak TFLOP/s per precision, from NVIDIA's datasheets. A device matches the first entry whose
# key is in its name (CUDA's name, e.g. "NVIDIA H100 80GB HBM3" for the H100 SXM), so the more specific
# keys come first. The H200 has the H100 SXM's tensor cores (its difference is memory: 141 GB of HBM3e);
# the NVL cards run at a lower clock.
H100_SXM = {"bf16": 989.5, "tf32": 494.5, "fp32": 67.0}
H100_NVL = {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}
PEAK_TFLOPS = (
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),   # SXM4 and PCIe, 40 GB and 80 GB
    ("H100 PCIe", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.0}),
    ("H100 NVL", H100_NVL),
    ("H200 NVL", H100_NVL),
    ("GH200", H100_SXM),
    ("H100", H100_SXM),                                         # "NVIDIA H100 80GB HBM3", "H100 SXM5"
    ("H200", H100_SXM),
)


def peak_flops(device_name, precision):
    """The device's dense peak FLOP/s in precision ("bf16", "tf32" or "fp32"), None when unknown."""
    name = (device_name or "").lower()
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in name:
            tflops = peaks.get(precision)
            return None if tflops is None else tflops * 1e12
    return None


def mfu_percent(flops_per_step, seconds, peak):
    """The step's model FLOPs utilization in percent, None without a peak or a time to divide by."""
    if peak is None or peak <= 0 or seconds <= 0:
        return None
    return 100.0 * flops_per_step / seconds / peak


def format_mfu(mfu, precision):
    """The step line's MFU field: "41.3% tf32 MFU", or "MFU n/a"."""
    return "MFU n/a" if mfu is None else f"{mfu:.1f}% {precision} MFU"


class TokensPerSecond:
    """tokens/s as a bias-corrected exponential moving average; update() returns the value to print.
    The first step's rate is returned as measured but kept out of the average."""

    BETA = 0.95

    def __init__(self):
        self.steps = 0        # update() calls so far
        self.ema = 0.0        # the average before bias correction (starts at 0, hence the correction)

    def update(self, tokens, seconds):
        rate = tokens / seconds if seconds > 0 else 0.0
        self.steps += 1
        if self.steps == 1:
            return rate
        self.ema = self.BETA * self.ema + (1.0 - self.BETA) * rate
        return self.ema / (1.0 - self.BETA ** (self.steps - 1))
