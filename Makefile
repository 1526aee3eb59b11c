# llm.c in Python: the usual jobs, named like llm.c's targets.
#   make train   set up, make the data, export d12, train with the NumPy trainer (CPU)
#   make test    set up, run the test suite (what CI runs)
# Everything works offline when ../shared/data holds the tiny shakespeare text and a tiktoken cache.

PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
# MODEL: d6 d12 d24 d36 d48 (random init) or gpt2 gpt2-medium gpt2-large gpt2-xl (OpenAI's weights)
MODEL ?= d12

# offline tokenizer: use the shared tiktoken cache when there is one and nothing else is set
ifneq ($(wildcard ../shared/data/tiktoken_cache),)
export TIKTOKEN_CACHE_DIR ?= $(abspath ../shared/data/tiktoken_cache)
endif
# a local copy of tiny shakespeare saves the download
SHAKESPEARE_INPUT := $(if $(wildcard ../shared/data/tinyshakespeare/input.txt),--input ../shared/data/tinyshakespeare/input.txt,)

TS_TRAIN := data/tinyshakespeare/tiny_shakespeare_train.bin
# the exporter names OpenAI's models by parameter count (gpt2 -> gpt2_124M.bin), the dN ones by depth
SIZE_gpt2 := 124M
SIZE_gpt2-medium := 355M
SIZE_gpt2-large := 774M
SIZE_gpt2-xl := 1558M
CHECKPOINT := gpt2_$(or $(SIZE_$(MODEL)),$(MODEL)).bin

.PHONY: setup data data_tinystories export train train_cuda test test_gpt2 test_gpt2_cuda bench bench_gpu gpu_check gpu_check_quick clean

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==$(TORCH_VERSION)
	$(PYTHON) -m pip install -q -r requirements.txt

data: $(TS_TRAIN)
$(TS_TRAIN):
	$(PYTHON) prepro_tinyshakespeare.py $(SHAKESPEARE_INPUT)

data_tinystories:
	$(PYTHON) prepro_tinystories.py

export: $(CHECKPOINT)
$(CHECKPOINT): | $(TS_TRAIN)
	@echo "== train_gpt2_torch.py: the PyTorch reference writes $(CHECKPOINT) and its debug state (10 reference steps)"
	$(PYTHON) train_gpt2_torch.py --model $(MODEL)

train: setup data export
	@echo "== train_gpt2.py (NumPy) trains $(CHECKPOINT) on tiny shakespeare (the PyTorch steps above, if any, were the exporter's)"
	$(PYTHON) train_gpt2.py -e $(CHECKPOINT)

train_cuda: setup data export
	@echo "== train_gpt2_cuda.py (CUDA kernels) trains $(CHECKPOINT) (the PyTorch steps above, if any, were the exporter's)"
	$(PYTHON) train_gpt2_cuda.py -e $(CHECKPOINT)

test: setup
	$(PYTHON) -m pytest -q tests

# the end-to-end check on the full d12 export (slow on a CPU: minutes, not seconds); test_gpt2.py
# finds the debug state beside the checkpoint (gpt2_<size>_debug_state.bin)
test_gpt2: setup data export
	$(PYTHON) test_gpt2.py --checkpoint $(CHECKPOINT)

# on the GPU in its default precision (bf16 where the GPU has it, SM >= 80); PRECISION=fp32 for the fp32 check
PRECISION ?=
test_gpt2_cuda: setup data export
	$(PYTHON) test_gpt2.py --trainer cuda --checkpoint $(CHECKPOINT) $(if $(PRECISION),--precision $(PRECISION),)

bench: setup data
	$(PYTHON) dev/bench_cpu.py
	@$(PYTHON) -c "import cupy; cupy.cuda.runtime.getDeviceCount()" 2>/dev/null && $(PYTHON) dev/bench_gpu.py || echo "bench: no GPU with CuPy here, skipping dev/bench_gpu.py"

# ours vs PyTorch (torch.compile) on one GPU: fp32 and bf16 at B=16, then bf16 at the largest B that fits both
bench_gpu: setup data
	$(PYTHON) dev/bench_gpu.py

# every GPU check and benchmark in one run of under 9 minutes (bf16 first), a summary in $(OUT) (default
# ./gpu_out); GPU_CHECK_STAGES="bench_bf16 ..." runs only those stages, GPU_CHECK_BUDGET the seconds
gpu_check:
	bash dev/gpu_check.sh

# the correctness stages that matter most, under 4 minutes (bash dev/gpu_check.sh --quick)
gpu_check_quick:
	bash dev/gpu_check.sh --quick

clean:
	rm -rf build emulator/build __pycache__ tests/__pycache__ .pytest_cache
