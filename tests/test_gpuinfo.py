"""-lg N (llmc/gpuinfo.py): the GPU's readings through NVML every N steps, tested with a stand-in NVML.

No GPU here, so FAKE_NVML below plays nvidia-ml-py's `pynvml`: fixed readings (the utilisation counts
the reads, so each line tells which reading it is), a query per reading that checks its handle and enum
argument, and switches (environment variables, for the subprocess runs) for a failed start and for
readings the "GPU" does not support. The module's functions are checked against it, then the CUDA
trainer on the emulator with the stand-in first on its PYTHONPATH: the lines after steps 2 and 4 of 4,
in stdout and main.log; without NVML one line and the run goes on; a bad -lg is one line.
"""

import os
import sys
import types

import numpy as np
import pytest

from llmc import formats, gpuinfo
from llmc.logger import Logger
from llmc.model import GPT2Config
from llmc.utils import ConfigError
from test_cuda_trainer import random_params, run_python

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_NVML = '''
import os
from types import SimpleNamespace

class NVMLError(Exception):
    pass

class NVMLError_NotSupported(NVMLError):
    pass

MIB = 1 << 20
reads = [0]
UNSUPPORTED = set(filter(None, os.environ.get("FAKE_NVML_UNSUPPORTED", "").split(",")))

def nvmlInit():
    if os.environ.get("FAKE_NVML_INIT_FAILS"):
        raise NVMLError("Driver Not Loaded")

def nvmlDeviceGetHandleByIndex(index):
    return ("index", index)

def nvmlDeviceGetHandleByPciBusId(bus_id):
    return ("pci", bus_id)

def _query(name, expected_arg, value):
    def query(handle, *args):
        assert handle == ("index", 0), handle
        assert args == expected_arg, (name, args)
        if name in UNSUPPORTED:
            raise NVMLError_NotSupported("Not Supported")
        return value() if callable(value) else value
    return query

def _utilization():
    reads[0] += 1
    return SimpleNamespace(gpu=90 + reads[0], memory=41)

nvmlDeviceGetUtilizationRates = _query("nvmlDeviceGetUtilizationRates", (), _utilization)
nvmlDeviceGetMemoryInfo = _query("nvmlDeviceGetMemoryInfo", (), SimpleNamespace(used=61234 * MIB + 5,
                                                                               total=143771 * MIB))
nvmlDeviceGetClockInfo = _query("nvmlDeviceGetClockInfo", (1,), 1980)                  # NVML_CLOCK_SM
nvmlDeviceGetMaxClockInfo = _query("nvmlDeviceGetMaxClockInfo", (1,), 1980)
nvmlDeviceGetTemperature = _query("nvmlDeviceGetTemperature", (0,), 54)              # NVML_TEMPERATURE_GPU
nvmlDeviceGetTemperatureThreshold = _query("nvmlDeviceGetTemperatureThreshold", (1,), 87)   # SLOWDOWN
nvmlDeviceGetPowerUsage = _query("nvmlDeviceGetPowerUsage", (), 612345)               # mW
nvmlDeviceGetPowerManagementLimit = _query("nvmlDeviceGetPowerManagementLimit", (), 700000)
nvmlDeviceGetCurrentClocksThrottleReasons = _query("nvmlDeviceGetCurrentClocksThrottleReasons", (), 0x24)
'''
# the readings above as the two lines; n is the read's number (its utilisation is 90 + n)
STDOUT_LINE = ("gpu: {util}% busy (memory 41%) | 61,234 / 143,771 MiB | SM 1980 / 1980 MHz | 54 C (slows at 87 C) | "
               "612 / 700 W | throttle: power cap, thermal (sw)")
LOG_LINE = ("s:{step} gpu_util:{util} gpu_mem_util:41 gpu_mem_used:61234 gpu_mem_total:143771 gpu_sm_mhz:1980 "
            "gpu_sm_max_mhz:1980 gpu_temp:54 gpu_temp_slowdown:87 gpu_power:612.3 gpu_power_limit:700.0 "
            "gpu_throttle:36")


@pytest.fixture
def fake_nvml(monkeypatch):
    """FAKE_NVML as the `pynvml` an import finds (sys.modules); returns the module."""
    module = types.ModuleType("pynvml")
    exec(FAKE_NVML, module.__dict__)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return module


def test_throttle_words():
    assert gpuinfo.throttle_words(0) == "none"
    assert gpuinfo.throttle_words(0x24) == "power cap, thermal (sw)"
    assert gpuinfo.throttle_words(0x1 | 0x80 | 0x1000) == "idle, power brake, 0x1000"   # an unknown bit in hex


def test_readings_lines_and_steps(fake_nvml, tmp_path, capsys):
    log = GpuLogRun(tmp_path / "out", every=3)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "-lg 3: GPU readings (NVML) every 3 steps, to stdout and main.log"
    for step in range(7):                                 # reads after steps 3 and 6 (0-based 2 and 5)
        log.after_step(step, log.logger)
    out = capsys.readouterr().out.splitlines()
    assert out == [STDOUT_LINE.format(util=91), STDOUT_LINE.format(util=92)]
    assert log.logger_lines() == [LOG_LINE.format(step=2, util=91), LOG_LINE.format(step=5, util=92)]


def test_unsupported_readings_are_na_and_left_out_of_the_log(fake_nvml, tmp_path, capsys):
    fake_nvml.UNSUPPORTED.update({"nvmlDeviceGetTemperatureThreshold", "nvmlDeviceGetPowerUsage",
                                  "nvmlDeviceGetCurrentClocksThrottleReasons"})
    log = GpuLogRun(tmp_path / "out", every=1)
    log.after_step(0, log.logger)
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.endswith("| 54 C (slows at n/a) | n/a / 700 W | throttle: n/a"), line
    fields = log.logger_lines()[0].split()
    assert fields[:2] == ["s:0", "gpu_util:91"] and fields[-1] == "gpu_power_limit:700.0", fields
    assert not any(f.startswith(("gpu_temp_slowdown:", "gpu_power:", "gpu_throttle:")) for f in fields), fields


def test_no_nvml_is_one_line_and_no_readings(fake_nvml, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FAKE_NVML_INIT_FAILS", "1")
    log = GpuLogRun(tmp_path / "out", every=2)
    log.after_step(1, log.logger)
    assert capsys.readouterr().out.splitlines() == [
        "-lg 2: NVML cannot be started (Driver Not Loaded): no GPU readings; training goes on"]
    assert log.logger_lines() == []
    gpuinfo.GpuLog(2, "", module_name="no_such_nvml_module")
    assert capsys.readouterr().out == ("-lg 2: nvidia-ml-py is not installed (pip install nvidia-ml-py): "
                                       "no GPU readings; training goes on\n")


def test_without_o_stdout_only_and_bad_values(fake_nvml, capsys):
    log = gpuinfo.GpuLog(5, "")
    log.after_step(4, Logger(""))
    out = capsys.readouterr().out.splitlines()
    assert out == ["-lg 5: GPU readings (NVML) every 5 steps, to stdout only (no -o: no main.log to write them "
                   "into)", STDOUT_LINE.format(util=91)]
    for off in (0, -1):                                   # off: NVML is not even started
        assert gpuinfo.GpuLog(off, "out").nvml is None and capsys.readouterr().out == ""
    with pytest.raises(ConfigError, match=r"^-lg -3: give a positive number of steps between GPU readings, "
                                          r"or -1 \(off\)$"):
        gpuinfo.GpuLog(-3, "")


class GpuLogRun(gpuinfo.GpuLog):
    """A GpuLog with its own Logger in out/ (main.log), and that file's lines."""

    def __init__(self, out, every):
        self.logger = Logger(str(out))
        self.log_path = out / "main.log"
        super().__init__(every, str(out))

    def logger_lines(self):
        return self.log_path.read_text().splitlines()


# ----------------------------------------------------------------------------------------------
# the CUDA trainer on the emulator, with FAKE_NVML as the pynvml its process imports

TINY = GPT2Config(max_seq_len=16, vocab_size=101, num_layers=1, num_heads=2, channels=32, padded_vocab_size=128)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A folder with a tiny model, train/val shards and FAKE_NVML as pynvml.py; run(*flags, env) trains in it."""
    folder = tmp_path_factory.mktemp("gpuinfo")
    formats.write_model_file(str(folder / "tiny.bin"), TINY, random_params(TINY))
    rng = np.random.default_rng(0)
    for split, n in (("train", 600), ("val", 200)):
        formats.write_data_shard(str(folder / f"{split}.bin"), rng.integers(0, TINY.vocab_size, size=n))
    (folder / "fake_nvml").mkdir()
    (folder / "fake_nvml" / "pynvml.py").write_text(FAKE_NVML)

    def run(*flags, env=None):
        return run_python([os.path.join(REPO, "train_gpt2_cuda.py")], "-e", folder / "tiny.bin",
                          "-i", folder / "train.bin", "-j", folder / "val.bin", "-b", 2, "-t", 8, "-x", 4,
                          "-v", 0, "-s", 0, "-p", "fp32", *flags, cwd=str(folder),
                          env={"LLMC_EMULATE": "1", "PYTHONPATH": str(folder / "fake_nvml"), **(env or {})})
    run.folder = folder
    return run


def test_trainer_logs_every_n_steps(tiny_run):
    out = tiny_run.folder / "log"
    r = tiny_run("-lg", 2, "-o", out)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert "-lg 2: GPU readings (NVML) every 2 steps, to stdout and main.log" in lines
    steps = [i for i, line in enumerate(lines) if line.startswith("step ")]
    assert len(steps) == 4
    assert [lines[i + 1] for i in steps] == [lines[steps[0] + 1], STDOUT_LINE.format(util=91),
                                             lines[steps[2] + 1], STDOUT_LINE.format(util=92)]
    assert not lines[steps[0] + 1].startswith("gpu:") and not lines[steps[2] + 1].startswith("gpu:")
    log = (out / "main.log").read_text().splitlines()
    assert [line for line in log if "gpu_" in line] == [LOG_LINE.format(step=1, util=91),
                                                        LOG_LINE.format(step=3, util=92)]
    trl_1 = next(line for line in log if line.startswith("s:1 trl:"))
    assert log.index(LOG_LINE.format(step=1, util=91)) == log.index(trl_1) + 1   # right after its step's line
    import vislog                                         # the plotting reads the log as before, with more streams
    streams = vislog.parse_logfile(str(out / "main.log"))
    assert list(streams["gpu_util"][0]) == [1, 3] and list(streams["gpu_util"][1]) == [91, 92]
    assert list(streams["trl"][0]) == [0, 1, 2, 3]


def test_trainer_without_nvml_goes_on_and_bad_lg(tiny_run):
    r = tiny_run("-lg", 2, env={"FAKE_NVML_INIT_FAILS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert "-lg 2: NVML cannot be started (Driver Not Loaded): no GPU readings; training goes on" in lines
    assert sum(line.startswith("step ") for line in lines) == 4 and not any(x.startswith("gpu:") for x in lines)
    r = tiny_run("-lg", -3)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: -lg -3: give a positive number of steps between GPU readings, or -1 (off)"], r.stderr
