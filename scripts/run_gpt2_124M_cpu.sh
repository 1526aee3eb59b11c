#!/usr/bin/env bash
# GPT-2 (124M) from scratch on FineWeb with the NumPy trainer (train_gpt2.py): run_gpt2_124M.sh for the CPU.
#
# What:  the same job as run_gpt2_124M.sh (d12, one epoch of FineWeb's 10B sample: 18,865 steps of 524,288
#        tokens, llm.c's learning rate, schedule, weight decay, checkpoints and HellaSwag), with micro-batches
#        of 4 x 1024 (128 accumulated per step) instead of 64 x 1024: the NumPy trainer keeps the (B, NH, T, T)
#        attention tensors, 4.8 GB at -b 4 -t 1024. The optimizer differs from the GPU run's as train_gpt2.c's
#        does from train_gpt2.cu's: AdamW betas (0.9, 0.999), no gradient clipping.
# Data:  python dev/data/fineweb.py -t classic -v 10B      (dev/data/fineweb10B/, about 20 GB of shards)
#        python dev/data/hellaswag.py                      (the -h 1 eval file)
# llm.c: has no CPU run of this size (train_gpt2.c trains on tiny shakespeare); its GPU run took 90 minutes on
#        8x A100 and reached HellaSwag 29.9, val loss about 3.28 (see run_gpt2_124M.sh).
# Time here: at the README's 2-core figure for d12 (about 6 ms a token) a step takes about an hour, the run
#        two years: this is the reproduction's recipe for a machine with many cores, or for several
#        (NPROC=N: torchrun starts N processes, gloo sums their gradients, -z 1 shards AdamW), or with a smaller -x.
# Run it from anywhere: bash scripts/run_gpt2_124M_cpu.sh
source "$(dirname "$0")/lib.sh"
fineweb dev/data/fineweb10B/fineweb "python dev/data/fineweb.py -t classic -v 10B"
[ "${NPROC:-1}" -gt 1 ] || LAUNCH=()       # one process unless NPROC says more (torchrun then starts them)
run_until_done log_gpt2_124M_cpu 18865 train_gpt2.py "${DATA[@]}" "${LLMC_COMMON[@]}" -e d12 \
    -b 4 -t 1024 -d 524288 -l 0.0006 -q 0.0 -n 5000 -s 20000 -g 144
