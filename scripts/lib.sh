# What the reproduction scripts share; each of them sources this file (it runs nothing by itself).
#
# A script names its processes in two arrays, then hands the trainer and its flags to launch or
# run_until_done:
#   LAUNCH  the program that starts the processes (torchrun, mpirun, srun), or nothing for one process
#   TASK    what each process runs: "$PYTHON", or a wrapper that adds per-process flags (slurm's rank)
# LLMC_DRY_RUN=1 runs TASK once, without LAUNCH, and the trainer then only parses and checks its flags,
# prints them and exits (llmc/dryrun.py): no data, model file or GPU needed. tests/test_scripts.py runs
# every script that way, so a flag renamed in llmc/cli.py fails a test instead of a night's run.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."      # the repository root: the data paths are relative to it

PYTHON=${PYTHON:-python3}
# one machine's GPUs by default: NPROC processes (8), one a GPU; --no-python: torchrun starts TASK itself, as
# mpirun and srun do (mpirun -np 8 "$PYTHON" works as well: the trainer reads either's environment)
LAUNCH=(torchrun --standalone --nproc_per_node "${NPROC:-8}" --no-python)
TASK=("$PYTHON")
DRY_RUN=${LLMC_DRY_RUN:-0}
MAX_FAILURES=${MAX_FAILURES:-3}   # attempts in a row without a new checkpoint before run_until_done gives up

# the flags all of llm.c's reproduction runs give: val loss every 250 steps, HellaSwag, ZeRO-1, weight decay
# 0.1 (the 2-D weights), 700 warmup steps
LLMC_COMMON=(-v 250 -h 1 -z 1 -c 0.1 -u 700)

# fineweb PREFIX PREPRO: DATA=(-i PREFIX_train_*.bin -j PREFIX_val_*.bin), the shards dev/data/fineweb.py
# writes, once need_data has found the train shards
fineweb() {
    need_data "${1}_train_*.bin" "$2"
    DATA=(-i "${1}_train_*.bin" -j "${1}_val_*.bin")
}

# need_data PATTERN PREPRO: one line and exit 1 when no file matches PATTERN (a dry run notes it and goes on)
need_data() {
    if ! compgen -G "$1" > /dev/null; then
        if [ "$DRY_RUN" = 1 ]; then echo "note: no files match $1 (a dry run needs none): $2 makes them"; return; fi
        echo "error: no files match $1: make them first with $2"
        exit 1
    fi
}

# launch SCRIPT FLAGS...: the processes once (a dry run: TASK once, with LLMC_DRY_RUN=1)
launch() {
    if [ "$DRY_RUN" = 1 ]; then
        echo "would run: ${LAUNCH[*]} ${TASK[*]} $*"
        LLMC_DRY_RUN=1 "${TASK[@]}" "$@"
    else
        "${LAUNCH[@]}" "${TASK[@]}" "$@"
    fi
}

newest_checkpoint() {   # (nothing, and no error under set -e, when there is none)
    ls "$1" 2> /dev/null | grep -E '^DONE_[0-9]{8}$' | sort | tail -n 1 || true
}

# run_until_done OUT_DIR STEPS SCRIPT FLAGS...: SCRIPT FLAGS -o OUT_DIR -x STEPS -y 1, launched again after a
# crash or a stall (resuming from the newest checkpoint) until OUT_DIR has step STEPS's DONE_ file, as llm.c's
# scripts do; unlike them, stop after MAX_FAILURES attempts in a row that end without a new checkpoint (a bad
# flag fails the same way every time)
run_until_done() {
    local done_file failures=0 before script=$3
    done_file=$1/DONE_$(printf %08d "$2")
    set -- "$script" -o "$1" -x "$2" -y 1 "${@:4}"
    if [ "$DRY_RUN" = 1 ]; then
        launch "$@"
        return
    fi
    while [ ! -f "$done_file" ]; do
        before=$(newest_checkpoint "$(dirname "$done_file")")
        if launch "$@" && [ ! -f "$done_file" ]; then
            echo "error: the run ended without $done_file: does -x match the step in its name?"
            return 1
        fi
        if [ "$(newest_checkpoint "$(dirname "$done_file")")" = "$before" ]; then
            failures=$((failures + 1))
        else
            failures=0
        fi
        if [ ! -f "$done_file" ] && [ "$failures" -ge "$MAX_FAILURES" ]; then
            echo "error: $failures attempts in a row ended without a new checkpoint: see the errors above"
            return 1
        fi
        sleep 1
    done
    echo "$done_file exists: the run is complete"
}
