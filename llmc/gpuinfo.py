"""-lg N: the GPU's state every N steps through NVML, as llm.c's get_gpu_utilization_info (llmc/mfu.h).

After the step line of every N-th step (steps N, 2N, ...) the CUDA trainer prints one line,

    gpu: 97% busy (memory 41%) | 61,234 / 143,771 MiB | SM 1980 / 1980 MHz | 54 C (slows at 87 C) |
         612 / 700 W | throttle: none                                         (one line, folded here)

and with -o writes the same readings into main.log, one line with that step's trl line's step number,
every value a plain number so dev/vislog.py and llm.c's notebook read the file as before:

    s:<step> gpu_util:97 gpu_mem_util:41 gpu_mem_used:61234 gpu_mem_total:143771 gpu_sm_mhz:1980 ...

Units: % busy over NVML's last sample period, MiB, MHz, degrees C, W; gpu_throttle is NVML's bit mask of
clock-event reasons (the stdout line names them). A reading this GPU does not give (NVML says "not
supported": a fan on a passively cooled card, say) is "n/a" on stdout and left out of main.log.

Where llm.c differs: it stops the run when NVML is missing or a query fails; here one line says so and
training goes on without the readings. It averages the utilisation samples NVML keeps (here: NVML's own
rate over its last period), names only the first of power/thermal/other for the throttling (here every
reason set), and prints the fan speed (here memory used and total instead, the question a run asks).
The package is nvidia-ml-py (`import pynvml`), an optional dependency: only -lg needs it.
"""

import importlib

from llmc.utils import ConfigError

# NVML's enum values (nvml.h): the clock domain, the temperature sensor and threshold read below
NVML_CLOCK_SM = 1
NVML_TEMPERATURE_GPU = 0
NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
# nvmlClocksEventReason* bits (nvml.h), in bit order, with the words the stdout line uses
THROTTLE_REASONS = ((0x1, "idle"), (0x2, "application clocks"), (0x4, "power cap"), (0x8, "hw slowdown"),
                    (0x10, "sync boost"), (0x20, "thermal (sw)"), (0x40, "thermal (hw)"),
                    (0x80, "power brake"), (0x100, "display clock"))
MIB = 1 << 20


def throttle_words(bits):
    """NVML's clock-event bit mask as words: "none", or "power cap, thermal (sw)"; unknown bits in hex."""
    words = [word for bit, word in THROTTLE_REASONS if bits & bit]
    rest = bits & ~sum(bit for bit, _ in THROTTLE_REASONS)
    if rest:
        words.append(f"0x{rest:x}")
    return ", ".join(words) or "none"


def open_nvml(module_name="pynvml", pci_bus_id=None):
    """(nvml module, device handle), or (None, why) in one phrase when NVML cannot be used here.
    pci_bus_id: the training GPU's (CuPy's Device().pci_bus_id), since NVML's indices need not follow
    CUDA_VISIBLE_DEVICES; None takes NVML's device 0, as llm.c does."""
    try:
        nvml = importlib.import_module(module_name)
    except ImportError:
        return None, "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        nvml.nvmlInit()
        if pci_bus_id:
            return nvml, nvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id)
        return nvml, nvml.nvmlDeviceGetHandleByIndex(0)
    except nvml.NVMLError as e:
        return None, f"NVML cannot be started ({e})"


def _reading(nvml, query, *args):
    """query(*args), or None where NVML says this GPU does not give it (or cannot now)."""
    try:
        return query(*args)
    except nvml.NVMLError:
        return None


def _throttle_query(nvml):
    """NVML 12.535 renamed the throttle reasons "clock event reasons"; older bindings have only the old name."""
    return getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        nvml.nvmlDeviceGetCurrentClocksThrottleReasons


def read_gpu_info(nvml, handle):
    """The readings as {main.log key: number or None}, None for what the GPU does not give."""
    get = lambda query, *args: _reading(nvml, query, handle, *args)   # noqa: E731
    util = get(nvml.nvmlDeviceGetUtilizationRates)
    memory = get(nvml.nvmlDeviceGetMemoryInfo)
    power, limit = get(nvml.nvmlDeviceGetPowerUsage), get(nvml.nvmlDeviceGetPowerManagementLimit)   # mW
    return {
        "gpu_util": None if util is None else util.gpu,
        "gpu_mem_util": None if util is None else util.memory,
        "gpu_mem_used": None if memory is None else memory.used // MIB,
        "gpu_mem_total": None if memory is None else memory.total // MIB,
        "gpu_sm_mhz": get(nvml.nvmlDeviceGetClockInfo, NVML_CLOCK_SM),
        "gpu_sm_max_mhz": get(nvml.nvmlDeviceGetMaxClockInfo, NVML_CLOCK_SM),
        "gpu_temp": get(nvml.nvmlDeviceGetTemperature, NVML_TEMPERATURE_GPU),
        "gpu_temp_slowdown": get(nvml.nvmlDeviceGetTemperatureThreshold, NVML_TEMPERATURE_THRESHOLD_SLOWDOWN),
        "gpu_power": None if power is None else power / 1000,
        "gpu_power_limit": None if limit is None else limit / 1000,
        "gpu_throttle": get(_throttle_query(nvml)),
    }


def _pair(info, a, b, fmt):
    """'a / b' with each missing reading as n/a."""
    return " / ".join("n/a" if info[k] is None else format(info[k], fmt) for k in (a, b))


def format_gpu_line(info):
    """The stdout line of one reading (see the module docstring)."""
    def one(key, fmt, unit=""):
        return "n/a" if info[key] is None else f"{info[key]:{fmt}}{unit}"
    throttle = "n/a" if info["gpu_throttle"] is None else throttle_words(info["gpu_throttle"])
    return (f"gpu: {one('gpu_util', 'd', '%')} busy (memory {one('gpu_mem_util', 'd', '%')}) | "
            f"{_pair(info, 'gpu_mem_used', 'gpu_mem_total', ',d')} MiB | "
            f"SM {_pair(info, 'gpu_sm_mhz', 'gpu_sm_max_mhz', 'd')} MHz | "
            f"{one('gpu_temp', 'd', ' C')} (slows at {one('gpu_temp_slowdown', 'd', ' C')}) | "
            f"{_pair(info, 'gpu_power', 'gpu_power_limit', '.0f')} W | throttle: {throttle}")


def format_log_fields(info):
    """The main.log fields of one reading, 'key:value' each, the missing ones left out."""
    def number(v):
        return f"{v:.1f}" if isinstance(v, float) else str(v)
    return " ".join(f"{key}:{number(v)}" for key, v in info.items() if v is not None)


class GpuLog:
    """-lg every: after_step(step, logger) prints (and logs) the readings after steps every, 2*every, ...
    Built once before the loop; says in one line what it will do, or why it will do nothing."""

    def __init__(self, every, output_dir, pci_bus_id=None, module_name="pynvml"):
        if every < -1:
            raise ConfigError(f"-lg {every}: give a positive number of steps between GPU readings, or -1 (off)")
        self.every, self.nvml, self.handle = every, None, None
        if every <= 0:
            return
        self.nvml, self.handle = open_nvml(module_name, pci_bus_id)
        if self.nvml is None:
            print(f"-lg {every}: {self.handle}: no GPU readings; training goes on")
            return
        where = "stdout and main.log" if output_dir else "stdout only (no -o: no main.log to write them into)"
        print(f"-lg {every}: GPU readings (NVML) every {every} steps, to {where}")

    def after_step(self, step, logger):
        """step: the loop's 0-based index, as main.log's trl line; reads at step + 1 = every, 2*every, ..."""
        if self.nvml is None or (step + 1) % self.every:
            return
        info = read_gpu_info(self.nvml, self.handle)
        print(format_gpu_line(info))
        logger.log_fields(step, format_log_fields(info))
