#!/usr/bin/env bash
# dev/gpu_check.sh: every GPU check and benchmark of the repository in one run, for a machine
# lent for a few minutes (an H100/H200 with CuPy, PyTorch and tiktoken installed, no network).
#
#   bash dev/gpu_check.sh                  # summary.txt and stages.log under $OUT (default ./gpu_out)
#   bash dev/gpu_check.sh --quick          # the correctness stages that matter most, under 4 minutes
#   GPU_CHECK_BUDGET=300 bash dev/gpu_check.sh
#   GPU_CHECK_STAGES="bench_bf16 bench_fp32" bash dev/gpu_check.sh    # only these (and what they need)
#
# Stages, in this order (the checks of the results first, bf16 before fp32; then the benchmarks, so a
# short budget cuts timings, not checks), each with its own timeout (cut to what is left of
# GPU_CHECK_BUDGET seconds, default 500, so the whole run stays under 9 minutes; --quick: 220 s and
# only env, test_kernels_bf16, sanitize_memcheck, data, export_d12, test_gpt2_bf16, bf16_determinism and
# test_gpt2_fp32), each going on after a failure:
#   env               nvidia-smi, Python package versions
#   test_kernels_bf16 pytest tests/test_kernels_bf16.py (every kernel built with -DENABLE_BF16, on the
#                     GPU and the emulator; skipped with a line when the file is not there)
#   sanitize_memcheck compute-sanitizer --tool memcheck on the kernel tests' GPU backend only
#                     (LLMC_TEST_BACKENDS=cupy: small shapes), fp32 and bf16: out-of-bounds and misaligned
#                     accesses, which the GPU may not fault on; skipped when compute-sanitizer is not there
#   sanitize_racecheck the same with --tool racecheck on the bf16 kernels: shared-memory races between
#                     barriers on the real hardware (the emulator checks its own thread orders only)
#   flash_check       dev/bench_attention.py --time 0: flash attention (kernels/flash_attention.cu) and the
#                     materialized path against PyTorch's SDPA (fp32 and bf16) at B=4, hs 64 and 128, T from 1
#                     to 1024 (tests/test_flash_attention.py is the emulator's; skipped without the kernel)
#   data              prepro_tinyshakespeare.py --input <shared data>/tinyshakespeare/input.txt
#                     (skipped, and what needs it too, when neither that text nor the .bin files exist)
#   export_d12        python train_gpt2_torch.py --model d12 (gpt2_d12.bin, gpt2_d12_bf16.bin, debug state)
#   test_gpt2_bf16    python test_gpt2.py --trainer cuda --precision bf16 on that export
#   bf16_determinism  train_gpt2_cuda.py -e gpt2_d12_bf16.bin -b 4 -t 256 -x 10 -n 10 -p bf16 twice:
#                     the same step lines (loss, norm) and the same model and state files, byte for byte
#   bf16_resume       the same, -x 20 in one go against the -x 10 run then -x 20 -y 1 from its checkpoint:
#                     the same step lines, model_00000020.bin and state_00000020_00000.bin
#   nccl_one_rank     the determinism run's 10 steps as one torchrun rank with -z 1: NCCL starts (the id
#                     over torchrun's store) and the step lines equal the plain run's
#   test_gpt2_fp32    python test_gpt2.py --trainer cuda --precision fp32 on the export
#   gelu_fusion       train_gpt2_cuda.py -e gpt2_d12_bf16.bin -b 4 -t 256 -x 10 -p bf16 with -ge 2 (cuBLASLt's
#                     GELU epilogues) and with -ge 0: -ge 2 must have loaded cuBLASLt, and each step's loss must
#                     be within 0.05 of -ge 0's (test_gpt2.cu's bf16 loss tolerance); then test_gpt2.py -ge 2
#                     on gpt2_d12.bin: step 0's logits, loss and gradients against PyTorch's
#   test_kernels      pytest tests/test_kernels.py (fp32; backend cupy on the GPU, plus the emulator)
#   check_kernel_bf16 python dev/check_kernel.py all --precision bf16: every kernel vs its NumPy twin,
#                     then timed at d12 in bf16
#   check_kernel      python dev/check_kernel.py all: the same in fp32
#   bench_attention   dev/bench_attention.py: one layer's attention forward + backward at B=16 NH=12 hs=64,
#                     T 1024 and 2048, flash vs materialized vs SDPA (target: flash <= 1.3x SDPA's time), then
#                     the d12 step's tokens/s with -fa 1 and -fa 0 (target >= 1.2x)
#   bench_bf16        dev/bench_gpu.py --precision bf16: ours vs PyTorch (bf16 autocast, compile, flash)
#                     at B=16 and at the largest B that fits both, 10 timed steps
#   bench_fp32        dev/bench_gpu.py --precision fp32 --trainers ours: our fp32 (TF32) numbers beside
#                     them (PyTorch fp32 is left to make bench_gpu: one more torch.compile does not fit)
#   test_trainer      pytest tests/test_cuda_trainer.py (the emulator and a fake CuPy, as CI runs it: no
#                     check of the GPU, so last, when time is left)
# Offline data (the tiny shakespeare text and a tiktoken cache for the gpt2 encoding) is read from
# ./shared/data, else ../shared/data. The device tool sends the checkout and a shared/ folder inside
# it, not the ../shared beside it, so before a device call copy it in (shared/ is git-ignored):
#   mkdir -p shared && cp -r ../shared/data shared/
# Without a GPU the GPU stages say "no GPU" at once; check_kernel then runs on the emulator
# (no timings) and data runs as usual, so a CPU run checks the script itself.
# Every command is run with python3 ($PYTHON to choose another; on the lent machine a plain `python`
# may be another Python than the one with PyTorch and CuPy, or none).
# $OUT/summary.txt: one line per stage (PASS / FAIL / TIMEOUT / SKIP, seconds, key numbers), then
# the kernel timing tables and the benchmark tables. $OUT/stages.log: every stage's full output, one
# after the other, each opening with its "== <stage>" line, written as it runs (so a run cut short
# keeps what it did). Two files: the device tool brings back at most 8 from $OUT.
# The training runs write their checkpoints (GBs for d12) into a temporary folder, never under $OUT.

# shellcheck disable=SC2317,SC2329  # the bf16 training checks below run in a child bash (export -f), unseen here
set -u
cd "$(dirname "$0")/.." || exit 1
BUDGET=${GPU_CHECK_BUDGET:-500}
STAGES=${GPU_CHECK_STAGES:-}
if [ "${1:-}" = --quick ]; then                  # the stages a short loan must not miss, bf16 first
    BUDGET=${GPU_CHECK_BUDGET:-220}
    STAGES=${GPU_CHECK_STAGES:-env test_kernels_bf16 sanitize_memcheck data export_d12 test_gpt2_bf16 bf16_determinism test_gpt2_fp32}
elif [ -n "${1:-}" ]; then
    echo "gpu_check.sh: unknown argument '$1' (the only one is --quick)" >&2; exit 2
fi
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PY
export PYTHONDONTWRITEBYTECODE=1
SHARED_DATA=../shared/data
[ -d shared/data ] && SHARED_DATA=shared/data        # the copy a device call carries (see above)
if [ -z "${TIKTOKEN_CACHE_DIR:-}" ] && [ -d "$SHARED_DATA/tiktoken_cache" ]; then
    TIKTOKEN_CACHE_DIR=$(cd "$SHARED_DATA/tiktoken_cache" && pwd)
    export TIKTOKEN_CACHE_DIR                     # the offline tokenizer, when there is one
fi
SUMMARY=$OUT/summary.txt
STAGES_LOG=$OUT/stages.log
START=$(date +%s)
: > "$SUMMARY"
: > "$STAGES_LOG"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")   # the training runs' output folders
STAGE_LOGS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_logs.XXXXXX")   # each stage's log alone, for its note
trap 'rm -rf "$WORK" "$STAGE_LOGS"' EXIT

if "$PY" -c "import cupy, sys; sys.exit(0 if cupy.cuda.runtime.getDeviceCount() > 0 else 1)" >/dev/null 2>&1; then
    GPU=1
else
    GPU=0
fi

record() {  # record NAME STATUS SECONDS NOTE
    printf '%-17s %-8s %5ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$SUMMARY"
}

wanted() {  # wanted NAME...: is any of these stages asked for (all are, without GPU_CHECK_STAGES)?
    [ -z "$STAGES" ] && return 0
    local name
    for name in "$@"; do
        case " $STAGES " in *" $name "*) return 0 ;; esac
    done
    return 1
}

# stage NAME TIMEOUT NEEDS_GPU COMMAND...: run COMMAND, its output added to $STAGES_LOG and kept alone in
# $LOG for the summary's note; sets STATUS (SKIP, already recorded, when the stage is not wanted, needs a
# GPU there is not, or has no time left)
stage() {
    local name=$1 limit=$2 needs_gpu=$3
    shift 3
    LOG="" ELAPSED=0
    local left=$((BUDGET - ($(date +%s) - START)))
    if ! wanted "$name"; then
        STATUS=SKIP; record "$name" SKIP 0 "not in GPU_CHECK_STAGES"; return
    fi
    if [ "$needs_gpu" = 1 ] && [ "$GPU" = 0 ]; then
        STATUS=SKIP; record "$name" SKIP 0 "no GPU (CuPy finds no CUDA device)"; return
    fi
    if [ "$left" -lt 10 ]; then
        STATUS=SKIP; record "$name" SKIP 0 "no time left of the ${BUDGET}s budget"; return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local log=$STAGE_LOGS/$name.log t0 rc
    echo "== $name (timeout ${limit}s): $*" | tee -a "$STAGES_LOG" "$log"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$STAGES_LOG" >> "$log"
    rc=${PIPESTATUS[0]}
    ELAPSED=$(($(date +%s) - t0))
    if [ "$rc" -eq 0 ]; then STATUS=PASS; elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then STATUS=TIMEOUT; else STATUS=FAIL; fi
    LOG=$log
}

note_last_line() {  # the last non-empty line of the stage's log, e.g. pytest's "93 passed in 20.1s"
    grep -v '^\s*$' "$LOG" | tail -n 1 | cut -c1-150
}

note_match() {  # note_match REGEX: the first line of the stage's log that matches, else its last line
    local line
    line=$(grep -m1 -E "$1" "$LOG")
    if [ -n "$line" ]; then echo "$line" | cut -c1-150; else note_last_line; fi
}

# ---- the bf16 training checks (run under `timeout` in a child bash: exported with export -f)

# step_lines LOG: a training log's step lines without their timings: "step 3/10: train loss 10.83 (...)
# (12.1 ms, ...) norm 1.2353 (...) lr 3.00e-04" -> "3 10.83 1.2353"
step_lines() {
    sed -nE 's|^step +([0-9]+)/[0-9]+: train loss ([^ ]+) .* norm ([^ ]+) .*|\1 \2 \3|p' "$1"
}

# train_bf16 LOG ARGS...: train_gpt2_cuda.py in bf16 without val loss and samples, its output in LOG
train_bf16() {
    local log=$1
    shift
    echo "-- $PY train_gpt2_cuda.py -p bf16 -v 0 -s 0 $*"
    if ! "$PY" train_gpt2_cuda.py -p bf16 -v 0 -s 0 "$@" > "$log" 2>&1; then
        cat "$log"
        echo "FAILED: train_gpt2_cuda.py -p bf16 -v 0 -s 0 $*"
        return 1
    fi
    grep -E '^(precision|allocating|master weights|total|estimated|step|wrote|resumed)' "$log"
}

# same_files DIR1 DIR2 NAME...: the files byte for byte
same_files() {
    local name ok=0
    for name in "${@:3}"; do
        if cmp "$1/$name" "$2/$name"; then echo "same bytes: $name"; else ok=1; fi
    done
    return "$ok"
}

# same_run STEPS_A STEPS_B DIR_A DIR_B N WHAT: STEPS_A has N step lines, STEPS_B the same ones, and the
# output dirs the same model and state files of step N, byte for byte
same_run() {
    local steps_a=$1 steps_b=$2 dir_a=$3 dir_b=$4 n=$5 what=$6 step
    step=$(printf '%08d' "$n")
    if [ "$(wc -l < "$steps_a")" -ne "$n" ]; then
        echo "FAILED: expected $n step lines, found $(wc -l < "$steps_a")"; return 1
    fi
    diff "$steps_a" "$steps_b" || { echo "FAILED: $what: the steps differ"; return 1; }
    same_files "$dir_a" "$dir_b" "model_$step.bin" "state_${step}_00000.bin" || {
        echo "FAILED: $what: the checkpoints of step $n differ"; return 1; }
}

# check_determinism MODEL B T DIR: the same 10 bf16 steps twice (into DIR/a and DIR/b)
check_determinism() {
    local model=$1 B=$2 T=$3 dir=$4 run
    for run in a b; do
        rm -rf "${dir:?}/$run"
        train_bf16 "$dir/$run.log" -e "$model" -b "$B" -t "$T" -x 10 -n 10 -o "$dir/$run" || return 1
        step_lines "$dir/$run.log" > "$dir/$run.steps"
    done
    same_run "$dir/a.steps" "$dir/b.steps" "$dir/a" "$dir/b" 10 "the two runs" || return 1
    echo "bf16 determinism: 10 steps twice, identical losses and norms (last: $(tail -n 1 "$dir/a.steps")), model and state (master weights, m, v) files identical"
}

# check_resume MODEL B T DIR: 20 bf16 steps in one go (DIR/full) against 10 (DIR/a, check_determinism's
# if it is there) then 10 more resumed from its checkpoint (-y 1)
check_resume() {
    local model=$1 B=$2 T=$3 dir=$4
    if [ ! -f "$dir/a/DONE_00000010" ]; then
        rm -rf "${dir:?}/a"
        train_bf16 "$dir/a.log" -e "$model" -b "$B" -t "$T" -x 10 -n 10 -o "$dir/a" || return 1
    fi
    rm -rf "${dir:?}/full"
    train_bf16 "$dir/full.log" -e "$model" -b "$B" -t "$T" -x 20 -n 10 -o "$dir/full" || return 1
    train_bf16 "$dir/resumed.log" -e "$model" -b "$B" -t "$T" -x 20 -n 10 -o "$dir/a" -y 1 || return 1
    grep -q "resumed from checkpoint 10" "$dir/resumed.log" || { echo "FAILED: -y 1 did not resume from step 10"; return 1; }
    step_lines "$dir/full.log" > "$dir/full.steps"
    cat "$dir/a.log" "$dir/resumed.log" > "$dir/both.log"
    step_lines "$dir/both.log" > "$dir/both.steps"
    same_run "$dir/full.steps" "$dir/both.steps" "$dir/full" "$dir/a" 20 "20 steps in one go and 10 + 10 resumed" ||
        return 1
    echo "bf16 resume: 20 steps = 10 + 10 resumed (-y 1): identical losses and norms (last: $(tail -n 1 "$dir/full.steps")), step 20's model and state files identical"
}
# check_nccl_one_rank MODEL B T DIR: the 10 steps of check_determinism's DIR/a again as one torchrun rank, so
# the NCCL start-up runs (the id over torchrun's store, a communicator of one; one GPU cannot host two ranks)
check_nccl_one_rank() {
    local model=$1 B=$2 T=$3 dir=$4
    [ -f "$dir/a.steps" ] || { echo "FAILED: no plain run to compare with (bf16_determinism)"; return 1; }
    echo "-- $PY -m torch.distributed.run --standalone --nproc_per_node 1 train_gpt2_cuda.py -p bf16 -z 1 ..."
    if ! "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 train_gpt2_cuda.py -p bf16 -v 0 -s 0 \
            -e "$model" -b "$B" -t "$T" -x 10 -z 1 > "$dir/nccl.log" 2>&1; then
        cat "$dir/nccl.log"; echo "FAILED: one rank under torchrun"; return 1
    fi
    step_lines "$dir/nccl.log" > "$dir/nccl.steps"
    diff "$dir/a.steps" "$dir/nccl.steps" || { echo "FAILED: one NCCL rank's steps differ from the plain run's"; return 1; }
    echo "nccl one rank: NCCL started through torchrun, 10 steps identical to the plain run (last: $(tail -n 1 "$dir/nccl.steps"))"
}
# check_gelu_fusion MODEL B T DIR: 10 bf16 steps with -ge 2 and with -ge 0; the -ge 2 run must have used cuBLASLt
# (its config line), and each step's loss must be within 0.05 of the -ge 0 run's; then step 0's logits, loss and
# gradients with -ge 2 against PyTorch's (test_gpt2.py -ge 2 on the fp32 export MODEL names without _bf16)
check_gelu_fusion() {
    local model=$1 B=$2 T=$3 dir=$4 ge
    for ge in 0 2; do
        train_bf16 "$dir/ge$ge.log" -e "$model" -b "$B" -t "$T" -x 10 -ge "$ge" || return 1
        step_lines "$dir/ge$ge.log" > "$dir/ge$ge.steps"
    done
    grep -q '^gelu fusion: -ge 2 ' "$dir/ge2.log" || {
        grep -m1 -e '-ge 2' "$dir/ge2.log"; echo "FAILED: -ge 2 did not run fused (no cuBLASLt?)"; return 1; }
    [ "$(wc -l < "$dir/ge2.steps")" -eq 10 ] || { echo "FAILED: expected 10 step lines with -ge 2"; return 1; }
    paste -d ' ' "$dir/ge0.steps" "$dir/ge2.steps" | awk '
        { d = $2 - $5; if (d < 0) d = -d; if (d > max) max = d; if ($1 != $4 || d > 0.05) bad = 1 }
        END { printf "gelu fusion: -ge 2 vs -ge 0, 10 bf16 steps: max |loss difference| %.4f (tolerance 0.05), last losses %s (-ge 2) and %s (-ge 0)\n", max, $5, $2
              if (bad || NR != 10) { print "FAILED: the losses differ by more than 0.05"; exit 1 } }' || return 1
    "$PY" test_gpt2.py --trainer cuda --precision bf16 -ge 2 --checkpoint "${model/_bf16/}" > "$dir/ge2_test.log" 2>&1 || {
        tail -n 20 "$dir/ge2_test.log"; echo "FAILED: test_gpt2.py -ge 2 (step 0's gradients against PyTorch's)"; return 1; }
    echo "gelu fusion: test_gpt2.py -ge 2: $(grep -m1 'overall okay' "$dir/ge2_test.log")"
}
export -f step_lines train_bf16 same_files same_run check_determinism check_resume check_nccl_one_rank check_gelu_fusion

# ---- env
stage env 30 0 bash -c "nvidia-smi -L 2>&1 || echo 'nvidia-smi: not found'; $PY -c '
import platform, numpy; print(\"python\", platform.python_version(), \"numpy\", numpy.__version__)
for m in (\"cupy\", \"torch\", \"tiktoken\"):
    try:
        print(m, __import__(m).__version__)
    except Exception as e:
        print(m, \"not importable:\", type(e).__name__)
'"
if [ "$STATUS" != SKIP ]; then
    NOTE="$(grep -m1 '^GPU 0' "$LOG" | cut -c1-70 || true)"
    record env "$STATUS" "$ELAPSED" "${NOTE:-no nvidia-smi GPU}; $(grep -E '^(cupy|torch) ' "$LOG" | tr '\n' ' ')"
fi

# ---- the bf16 kernel tests (when the file is there)
if [ -f tests/test_kernels_bf16.py ]; then
    stage test_kernels_bf16 100 1 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_bf16.py
    [ "$STATUS" != SKIP ] && record test_kernels_bf16 "$STATUS" "$ELAPSED" "$(note_last_line)"
else
    record test_kernels_bf16 SKIP 0 "tests/test_kernels_bf16.py is not in this checkout"
fi

# ---- the kernel tests on the GPU under compute-sanitizer (small shapes; the GPU backend only)
SANITIZER=$(command -v compute-sanitizer || true)
[ -z "$SANITIZER" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && SANITIZER=/usr/local/cuda/bin/compute-sanitizer
sanitized() {  # sanitized NAME TOOL TIMEOUT TEST_FILE...: the kernel tests under compute-sanitizer --tool TOOL
    local name=$1 tool=$2 limit=$3
    shift 3
    if [ -z "$SANITIZER" ]; then
        wanted "$name" && record "$name" SKIP 0 "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
        return
    fi
    stage "$name" "$limit" 1 env LLMC_TEST_BACKENDS=cupy "$SANITIZER" --tool "$tool" --error-exitcode 3 \
        "$PY" -m pytest -q -p no:cacheprovider "$@"
    [ "$STATUS" != SKIP ] && record "$name" "$STATUS" "$ELAPSED" \
        "$( (grep -m1 -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$LOG"; note_match 'passed|failed') | tr '\n' ' ' | cut -c1-150)"
}
sanitized sanitize_memcheck memcheck 90 tests/test_kernels.py tests/test_kernels_bf16.py
sanitized sanitize_racecheck racecheck 90 tests/test_kernels_bf16.py

# ---- flash attention against PyTorch's SDPA on the GPU (the kernel tests run on the emulator only)
if [ -f kernels/flash_attention.cu ]; then
    stage flash_check 60 1 "$PY" dev/bench_attention.py --time 0 -B 4 -T 1,7,64,100,257,1024 --hs 64,128
    [ "$STATUS" != SKIP ] && record flash_check "$STATUS" "$ELAPSED" "$(note_match '^(summary: |FAILED)')"
else
    record flash_check SKIP 0 "kernels/flash_attention.cu is not in this checkout"
fi

# ---- data and the d12 export, which the test_gpt2 and bf16 training stages need
D12_STAGES="test_gpt2_bf16 test_gpt2_fp32 gelu_fusion bf16_determinism bf16_resume nccl_one_rank"
VAL=data/tinyshakespeare/tiny_shakespeare_val.bin
INPUT=$SHARED_DATA/tinyshakespeare/input.txt
ASKED=$STAGES
# shellcheck disable=SC2086  # D12_STAGES: a list of names
if ! wanted data export_d12 $D12_STAGES; then
    record data SKIP 0 "not in GPU_CHECK_STAGES"
elif [ -f "$VAL" ]; then
    record data PASS 0 "$VAL already there"
elif [ -f "$INPUT" ]; then
    STAGES="" stage data 60 0 "$PY" prepro_tinyshakespeare.py --input "$INPUT"   # needed: always wanted
    record data "$STATUS" "$ELAPSED" "$(note_last_line)"
else
    record data SKIP 0 "no $INPUT and no $VAL: export_d12 and the d12 stages need them"
fi
# shellcheck disable=SC2086
if ! wanted export_d12 $D12_STAGES; then
    record export_d12 SKIP 0 "not in GPU_CHECK_STAGES"
elif [ ! -f "$VAL" ]; then
    record export_d12 SKIP 0 "no data ($VAL)"
else
    [ "$GPU" = 1 ] && rm -f gpt2_d12.bin gpt2_d12_bf16.bin gpt2_d12_debug_state.bin   # a fresh export, never a stale one
    STAGES="" stage export_d12 120 1 "$PY" train_gpt2_torch.py --model d12
    [ "$STATUS" != SKIP ] && record export_d12 "$STATUS" "$ELAPSED" "$(grep 'wrote ' "$LOG" | tr '\n' ' ' | cut -c1-150)"
fi
STAGES=$ASKED

d12_ready() {  # d12_ready NAME: are the GPU and the export there? If not, record NAME as skipped, saying why
    if [ "$GPU" = 0 ]; then
        wanted "$1" && record "$1" SKIP 0 "no GPU (CuPy finds no CUDA device)"
    elif [ ! -f gpt2_d12_debug_state.bin ] || [ ! -f gpt2_d12_bf16.bin ] || [ ! -f gpt2_d12.bin ]; then
        wanted "$1" && record "$1" SKIP 0 "no d12 export (gpt2_d12.bin, gpt2_d12_bf16.bin, gpt2_d12_debug_state.bin)"
    else
        return 0
    fi
    wanted "$1" || record "$1" SKIP 0 "not in GPU_CHECK_STAGES"
    return 1
}

# ---- test_gpt2.py on the CUDA trainer in bf16 (test_gpt2.cu's bf16 thresholds, and our 0.5 target)
if ! grep -q -- '--precision' test_gpt2.py; then
    record test_gpt2_bf16 SKIP 0 "test_gpt2.py has no --precision in this checkout"
elif d12_ready test_gpt2_bf16; then
    stage test_gpt2_bf16 90 1 "$PY" test_gpt2.py --trainer cuda --precision bf16 --checkpoint gpt2_d12.bin
    [ "$STATUS" != SKIP ] && record test_gpt2_bf16 "$STATUS" "$ELAPSED" \
        "$( (grep -m1 'overall okay' "$LOG"; grep -m1 '^target (every ratio' "$LOG") | tr '\n' ' ' | cut -c1-150)"
fi

# ---- bf16 determinism and resume (the second reuses the first's 10-step run)
if d12_ready bf16_determinism; then
    # shellcheck disable=SC2016  # $1 is the child bash's: "$WORK" passed after the _
    stage bf16_determinism 90 1 bash -c 'check_determinism gpt2_d12_bf16.bin 4 256 "$1"' _ "$WORK"
    [ "$STATUS" != SKIP ] && record bf16_determinism "$STATUS" "$ELAPSED" "$(note_match '^(bf16 determinism:|FAILED)')"
fi
if d12_ready bf16_resume; then
    # shellcheck disable=SC2016
    stage bf16_resume 120 1 bash -c 'check_resume gpt2_d12_bf16.bin 4 256 "$1"' _ "$WORK"
    [ "$STATUS" != SKIP ] && record bf16_resume "$STATUS" "$ELAPSED" "$(note_match '^(bf16 resume:|FAILED)')"
fi
if d12_ready nccl_one_rank; then
    # shellcheck disable=SC2016
    stage nccl_one_rank 90 1 bash -c 'check_nccl_one_rank gpt2_d12_bf16.bin 4 256 "$1"' _ "$WORK"
    [ "$STATUS" != SKIP ] && record nccl_one_rank "$STATUS" "$ELAPSED" "$(note_match '^(nccl one rank:|FAILED)')"
fi
rm -rf "${WORK:?}"/*                                  # GBs of checkpoints

# ---- fp32: test_gpt2.py and the fp32 kernel tests
if d12_ready test_gpt2_fp32; then
    PRECISION_FLAG=()
    grep -q -- '--precision' test_gpt2.py && PRECISION_FLAG=(--precision fp32)   # before it: fp32 anyway
    stage test_gpt2_fp32 90 1 "$PY" test_gpt2.py --trainer cuda "${PRECISION_FLAG[@]}" --checkpoint gpt2_d12.bin
    [ "$STATUS" != SKIP ] && record test_gpt2_fp32 "$STATUS" "$ELAPSED" "$(note_match 'overall okay')"
fi

# ---- -ge 2 (GELU fused into the fc GEMMs by cuBLASLt) against -ge 0: 10 bf16 training steps at d12
if d12_ready gelu_fusion; then
    # shellcheck disable=SC2016
    stage gelu_fusion 120 1 bash -c 'check_gelu_fusion gpt2_d12_bf16.bin 4 256 "$1"' _ "$WORK"
    [ "$STATUS" != SKIP ] && record gelu_fusion "$STATUS" "$ELAPSED" "$(note_match '^(gelu fusion:|FAILED)')"
fi
stage test_kernels 100 1 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py
[ "$STATUS" != SKIP ] && record test_kernels "$STATUS" "$ELAPSED" "$(note_last_line)"

# ---- every kernel against its NumPy twin, timed at d12 on the GPU (the emulator, untimed, without one)
CHECK_BF16_LOG=""
if grep -q -- '--precision' dev/check_kernel.py; then
    stage check_kernel_bf16 90 0 "$PY" dev/check_kernel.py all --precision bf16
    [ "$STATUS" != SKIP ] && record check_kernel_bf16 "$STATUS" "$ELAPSED" "$(note_match 'kernels, .* outputs')"
    CHECK_BF16_LOG=${LOG:-}
else
    record check_kernel_bf16 SKIP 0 "dev/check_kernel.py has no --precision in this checkout"
fi
stage check_kernel 90 0 "$PY" dev/check_kernel.py all
[ "$STATUS" != SKIP ] && record check_kernel "$STATUS" "$ELAPSED" "$(note_match 'kernels, .* outputs')"
CHECK_LOG=${LOG:-}

# ==== the benchmarks: after every check of the results, so a kernel that fails its check costs no benchmark time,
# and a short budget cuts the timings, not the checks

# ---- one layer's attention, flash vs materialized vs SDPA, then the d12 step with -fa 1 and -fa 0
if [ -f kernels/flash_attention.cu ]; then
    stage bench_attention 150 1 "$PY" dev/bench_attention.py
    [ "$STATUS" != SKIP ] && record bench_attention "$STATUS" "$ELAPSED" "$( (grep -m1 -E '^(summary: flash|FAILED)' "$LOG" |
        sed 's|^summary: flash / SDPA fwd+bwd at B=16 NH=12: |flash/SDPA |'; grep -m1 '^step -fa 1 / -fa 0' "$LOG" |
        sed 's|^step -fa 1 / -fa 0 in tokens/s: |step -fa 1/-fa 0 |') | tr '\n' ' ' | cut -c1-150)"
    BENCH_ATTENTION_LOG=${LOG:-}
else
    record bench_attention SKIP 0 "kernels/flash_attention.cu is not in this checkout"
    BENCH_ATTENTION_LOG=""
fi

# ---- whole training steps in bf16: ours vs PyTorch at B=16 and at the largest B that fits both
ratios() {  # the benchmark's "ratio ours/PyTorch in tokens/s (bf16, B=16): 1.123x (target >= 1.07x: met)" lines
    grep 'ratio ours/PyTorch in tokens/s' "$LOG" | sed 's|ratio ours/PyTorch in tokens/s ||; s|target >= |>= |' |
        tr '\n' ' ' | cut -c1-150
}
stage bench_bf16 240 1 "$PY" dev/bench_gpu.py --precision bf16 --steps 10 --warmup 3 --breakdown 1
if [ "$STATUS" != SKIP ]; then
    NOTE=$(ratios)
    record bench_bf16 "$STATUS" "$ELAPSED" "${NOTE:-$(note_last_line)}"
fi
BENCH_BF16_LOG=${LOG:-}

# ---- our fp32 (TF32) step beside the bf16 numbers (PyTorch's fp32 compile is left to make bench_gpu)
stage bench_fp32 90 1 "$PY" dev/bench_gpu.py --precision fp32 --trainers ours --steps 10 --warmup 3 --breakdown 1
if [ "$STATUS" != SKIP ]; then
    NOTE=$(awk '/^== fp32, B=/ {b = $3} /^ours \(CuPy, -p fp32\)/ {print "ours fp32 " b " " $5 " ms/step, " $8 " tokens/s, MFU " $9; exit}' "$LOG")
    record bench_fp32 "$STATUS" "$ELAPSED" "${NOTE:-$(note_last_line)}"
fi
BENCH_FP32_LOG=${LOG:-}

# ---- the CUDA trainer's tests (the emulator, and the GPU code path with a fake CuPy): last
stage test_trainer 90 1 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_trainer.py
[ "$STATUS" != SKIP ] && record test_trainer "$STATUS" "$ELAPSED" "$(note_last_line)"

# model_beside LOG PRECISION: dev/perf_model.py's ms/step on an H100 and an H200 for each (B, T) the benchmark log
# ran (its "== bf16, B=16, T=1024" rounds), to read beside the measured table; the formulas only, a few seconds
model_beside() {
    grep -oE "^== $2, B=[0-9]+, T=[0-9]+" "$1" | sort -u | while read -r _ _ b t; do
        b=${b#B=}; b=${b%,}; t=${t#T=}
        timeout 60 "$PY" dev/perf_model.py -e d12 -b "$b" -t "$t" -p "$2" 2>/dev/null |
            awk -v p="$2" -v b="$b" -v t="$t" '/^  (H100-SXM|H200) / {
                printf "modeled by dev/perf_model.py (%s, B=%s, T=%s): %s %s ms/step from the counted bytes, %s from the DRAM estimate\n", p, b, t, $1, $2, $10 }'
    done
}

# ---- the tables, after the one-line summary
TOTAL=$(($(date +%s) - START))
{
    echo
    echo "total: ${TOTAL}s of a ${BUDGET}s budget; GPU: $([ "$GPU" = 1 ] && echo yes || echo no)"
    for log in "$CHECK_BF16_LOG" "$CHECK_LOG"; do
        if [ -n "$log" ] && [ -f "$log" ] && grep -q '^timing on the GPU' "$log"; then
            echo
            echo "($(basename "$log" .log))"
            sed -n '/^timing on the GPU/,$p' "$log"
        fi
    done
    if [ "$GPU" = 1 ] && [ -n "$BENCH_ATTENTION_LOG" ] && [ -f "$BENCH_ATTENTION_LOG" ]; then
        echo
        echo "(bench_attention)"
        grep -E '^(== B=|path |flash |materialized |SDPA |flash / SDPA|== the d12|tokens/s|step -fa)' "$BENCH_ATTENTION_LOG"
    fi
    for log in "$BENCH_BF16_LOG" "$BENCH_FP32_LOG"; do
        if [ "$GPU" = 1 ] && [ -n "$log" ] && [ -f "$log" ]; then
            echo
            echo "($(basename "$log" .log))"
            sed -nE '/^== (bf16|fp32), B=/,/^$/p; /^largest B that fits/p' "$log"   # each round's table and ratio
            sed -n '/^summary, T=/,$p' "$log"
            model_beside "$log" "$([ "$log" = "$BENCH_FP32_LOG" ] && echo fp32 || echo bf16)"
        fi
    done
} | tee -a "$SUMMARY"
grep -qE '^\S+\s+(FAIL|TIMEOUT) ' "$SUMMARY" && exit 1
exit 0
