#!/usr/bin/env bash
# dev/gpu_check.sh: every GPU check and benchmark of the repository in one run, for a machine
# lent for a few minutes (an H100/H200 with CuPy, PyTorch and tiktoken installed, no network).
#
#   bash dev/gpu_check.sh                  # logs and summary.txt under $OUT (default ./gpu_out)
#   GPU_CHECK_BUDGET=300 bash dev/gpu_check.sh
#
# Stages, in order, each with its own timeout (cut to what is left of GPU_CHECK_BUDGET seconds,
# default 450, so the whole run stays under 8 minutes), each going on after a failure:
#   env             nvidia-smi, Python package versions
#   test_kernels    pytest tests/test_kernels.py (backend cupy on the GPU, plus the emulator)
#   test_trainer    pytest tests/test_cuda_trainer.py
#   check_kernel    python dev/check_kernel.py all: every kernel vs its NumPy twin, then timed at d12
#   data            prepro_tinyshakespeare.py --input <shared data>/tinyshakespeare/input.txt
#                   (skipped, and what needs it too, when neither that text nor the .bin files exist)
#   export_d12      python train_gpt2_torch.py --model d12 (checkpoint + PyTorch's debug state)
#   test_gpt2_cuda  python test_gpt2.py --trainer cuda on that export
#   bench_gpu       python dev/bench_gpu.py with fewer steps (ours vs PyTorch compile + TF32)
# Offline data (the tiny shakespeare text and a tiktoken cache for the gpt2 encoding) is read from
# ./shared/data, else ../shared/data. The device tool sends the checkout and a shared/ folder inside
# it, not the ../shared beside it, so before a device call copy it in (shared/ is git-ignored):
#   mkdir -p shared && cp -r ../shared/data shared/
# Without a GPU the GPU stages say "no GPU" at once; check_kernel then runs on the emulator
# (no timings) and data runs as usual, so a CPU run checks the script itself.
# $OUT/summary.txt: one line per stage (PASS / FAIL / TIMEOUT / SKIP, seconds, key numbers), then
# the kernel timing table and the benchmark table. $OUT/<stage>.log: each stage's full output.

set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET=${GPU_CHECK_BUDGET:-450}
PY=${PYTHON:-python}
export PYTHONDONTWRITEBYTECODE=1
SHARED_DATA=../shared/data
[ -d shared/data ] && SHARED_DATA=shared/data        # the copy a device call carries (see above)
if [ -z "${TIKTOKEN_CACHE_DIR:-}" ] && [ -d "$SHARED_DATA/tiktoken_cache" ]; then
    TIKTOKEN_CACHE_DIR=$(cd "$SHARED_DATA/tiktoken_cache" && pwd)
    export TIKTOKEN_CACHE_DIR                     # the offline tokenizer, when there is one
fi
SUMMARY=$OUT/summary.txt
START=$(date +%s)
: > "$SUMMARY"

if "$PY" -c "import cupy, sys; sys.exit(0 if cupy.cuda.runtime.getDeviceCount() > 0 else 1)" >/dev/null 2>&1; then
    GPU=1
else
    GPU=0
fi

record() {  # record NAME STATUS SECONDS NOTE
    printf '%-15s %-8s %5ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$SUMMARY"
}

# stage NAME TIMEOUT NEEDS_GPU COMMAND...: run COMMAND with its output in $OUT/NAME.log; sets STATUS
stage() {
    local name=$1 limit=$2 needs_gpu=$3
    shift 3
    LOG="" ELAPSED=0
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$needs_gpu" = 1 ] && [ "$GPU" = 0 ]; then
        STATUS=SKIP; record "$name" SKIP 0 "no GPU (CuPy finds no CUDA device)"; return
    fi
    if [ "$left" -lt 10 ]; then
        STATUS=SKIP; record "$name" SKIP 0 "no time left of the ${BUDGET}s budget"; return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (timeout ${limit}s): $*" | tee "$OUT/$name.log"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >>"$OUT/$name.log" 2>&1
    rc=$?
    ELAPSED=$(($(date +%s) - t0))
    if [ $rc -eq 0 ]; then STATUS=PASS; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then STATUS=TIMEOUT; else STATUS=FAIL; fi
    LOG=$OUT/$name.log
}

note_last_line() {  # the last non-empty line of the stage's log, e.g. pytest's "93 passed in 20.1s"
    grep -v '^\s*$' "$LOG" | tail -n 1 | cut -c1-150
}

# ---- env
stage env 30 0 bash -c "nvidia-smi -L 2>&1 || echo 'nvidia-smi: not found'; $PY -c '
import platform, numpy; print(\"python\", platform.python_version(), \"numpy\", numpy.__version__)
for m in (\"cupy\", \"torch\", \"tiktoken\"):
    try:
        print(m, __import__(m).__version__)
    except Exception as e:
        print(m, \"not importable:\", type(e).__name__)
'"
record env "$STATUS" "$ELAPSED" "$(grep -m1 '^GPU 0' "$LOG" || echo 'no nvidia-smi GPU')"

# ---- the pytest suites that use the GPU
stage test_kernels 150 1 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py
[ "$STATUS" != SKIP ] && record test_kernels "$STATUS" "$ELAPSED" "$(note_last_line)"
stage test_trainer 120 1 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_trainer.py
[ "$STATUS" != SKIP ] && record test_trainer "$STATUS" "$ELAPSED" "$(note_last_line)"

# ---- every kernel against its NumPy twin, timed at d12 on the GPU (the emulator, untimed, without one)
stage check_kernel 120 0 "$PY" dev/check_kernel.py all
record check_kernel "$STATUS" "$ELAPSED" "$(grep -m1 'kernels, .* outputs' "$LOG" || note_last_line)"
CHECK_LOG=$LOG

# ---- data, the d12 export, and test_gpt2.py on the CUDA trainer
VAL=data/tinyshakespeare/tiny_shakespeare_val.bin
INPUT=$SHARED_DATA/tinyshakespeare/input.txt
if [ -f "$VAL" ]; then
    record data PASS 0 "$VAL already there"
elif [ -f "$INPUT" ]; then
    stage data 60 0 "$PY" prepro_tinyshakespeare.py --input "$INPUT"
    record data "$STATUS" "$ELAPSED" "$(note_last_line)"
else
    record data SKIP 0 "no $INPUT and no $VAL: export_d12 and test_gpt2_cuda need them"
fi
if [ ! -f "$VAL" ]; then
    record export_d12 SKIP 0 "no data ($VAL)"
    record test_gpt2_cuda SKIP 0 "no data, no export"
else
    [ "$GPU" = 1 ] && rm -f gpt2_d12.bin gpt2_d12_debug_state.bin   # a fresh export, never a stale one
    stage export_d12 120 1 "$PY" train_gpt2_torch.py --model d12
    [ "$STATUS" != SKIP ] && record export_d12 "$STATUS" "$ELAPSED" "$(grep 'wrote ' "$LOG" | tr '\n' ' ' | cut -c1-150)"
    if [ "$GPU" = 0 ]; then
        record test_gpt2_cuda SKIP 0 "no GPU (CuPy finds no CUDA device)"
    elif [ -f gpt2_d12_debug_state.bin ]; then
        stage test_gpt2_cuda 120 1 "$PY" test_gpt2.py --trainer cuda --checkpoint gpt2_d12.bin
        [ "$STATUS" != SKIP ] && record test_gpt2_cuda "$STATUS" "$ELAPSED" "$(grep -m1 'overall okay' "$LOG" || note_last_line)"
    else
        record test_gpt2_cuda SKIP 0 "no export (gpt2_d12_debug_state.bin)"
    fi
fi

# ---- whole training steps: ours vs PyTorch (torch.compile + TF32), fewer steps than the default
stage bench_gpu 240 1 "$PY" dev/bench_gpu.py --steps 8 --warmup 2 --breakdown 1
[ "$STATUS" != SKIP ] && record bench_gpu "$STATUS" "$ELAPSED" "$(grep -m1 'ratio ours/PyTorch' "$LOG" || note_last_line)"
BENCH_LOG=${LOG:-}

# ---- the tables, after the one-line summary
TOTAL=$(($(date +%s) - START))
{
    echo
    echo "total: ${TOTAL}s of a ${BUDGET}s budget; GPU: $([ "$GPU" = 1 ] && echo yes || echo no)"
    if [ -f "$CHECK_LOG" ] && grep -q '^timing on the GPU' "$CHECK_LOG"; then
        echo
        sed -n '/^timing on the GPU/,$p' "$CHECK_LOG"
    fi
    if [ "$GPU" = 1 ] && [ -n "$BENCH_LOG" ] && [ -f "$BENCH_LOG" ]; then
        echo
        grep -A4 'median ms/step' "$BENCH_LOG"
    fi
} | tee -a "$SUMMARY"
grep -qE '^\S+\s+(FAIL|TIMEOUT) ' "$SUMMARY" && exit 1
exit 0
