# What the reproduction scripts share; each of them sources this file (it runs nothing by itself).
#
# A script names its processes in two arrays, then hands the trainer and its flags to launch or
# run_until_done:
#   LAUNCH  the program that starts the processes (torchrun, mpirun, srun), or nothing for one process
#   TASK    what each process runs: "$PYTHON", or a wrapper that adds per-process flags (slurm's rank)
# LLMC_DRY_RUN=1 runs TASK once, without LAUNCH, and the trainer then only parses and checks its flags,
# prints them and exits (llmc/dryrun.py): no data, model file or GPU needed. tests/test_scripts.py runs
# every script that way, so a flag renamed in llmc/cli.py fails a test instead of a night's run.

PYTHON=${PYTHON:-python3}
LAUNCH=()
TASK=("$PYTHON")
DRY_RUN=${LLMC_DRY_RUN:-0}
MAX_FAILURES=${MAX_FAILURES:-3}   # attempts in a row without a new checkpoint before run_until_done gives up

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

newest_checkpoint() {
    ls "$1" 2> /dev/null | grep -E '^DONE_[0-9]{8}$' | sort | tail -n 1
}

# run_until_done DONE_FILE SCRIPT FLAGS...: launch again (the flags hold -y 1) until DONE_FILE exists, as
# llm.c's scripts do after a crash or a stall; unlike them, stop after MAX_FAILURES attempts in a row that
# end without a new checkpoint (a bad flag or missing data fails the same way every time)
run_until_done() {
    local done_file=$1 failures=0 before
    shift
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
