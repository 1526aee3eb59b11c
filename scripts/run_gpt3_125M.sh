#!/usr/bin/env bash
# GPT-3 (125M) on FineWeb, llm.c's scripts/run_gpt3_125M.sh with our trainer.
#
# What:  gpt3:c768 (GPT-3 Small's shape: 12 layers, 12 heads, 768 channels, context 2048) on 300B tokens of
#        FineWeb's 100B sample (3 epochs): 572,204 steps of 524,288 tokens, 32 x 2048 per GPU per micro-step on
#        8 GPUs; checkpoints every 10,000 steps, the last 5 kept and every 50,000th forever (-nk, -nm); the
#        outlier guard skips an update whose loss or grad norm z-score passes 7 (-sl, -sg).
# Data:  python dev/data/fineweb.py -t classic -v 100B     (dev/data/fineweb100B/, about 200 GB of shards)
#        python dev/data/hellaswag.py                      (the -h 1 eval file)
# llm.c: about 24 hours on 8x A100 80GB SXM (~150 ms a step), ~$336, by the script's own estimate.
# Published result: none with the script; the GPT-3 paper's 125M model scores 33.7 on HellaSwag
#        (dev/vislog.py --baseline 124M draws it).
# Run it from anywhere: bash scripts/run_gpt3_125M.sh. One GPU: NPROC=1.
source "$(dirname "$0")/lib.sh"
fineweb dev/data/fineweb100B/fineweb "python dev/data/fineweb.py -t classic -v 100B"
run_until_done log_gpt3_125M 572204 train_gpt2_cuda.py "${DATA[@]}" "${LLMC_COMMON[@]}" -e gpt3:c768 \
    -b 32 -t 2048 -d 524288 -r 0 -l 0.0006 -q 0.1 -n 10000 -nk 5 -nm 50000 -ge 1 -sl 7.0 -sg 7.0 -s 20000 -g 144
