#!/usr/bin/env bash
# GPT-2 (350M) from scratch on FineWeb, llm.c's scripts/run_gpt2_350M.sh with our trainer.
#
# What:  d24 (24 layers, 16 heads, 1024 channels, 350M parameters) on ~31.5B tokens of FineWeb's 100B sample:
#        60,000 steps of 524,288 tokens, 64 x 1024 per GPU per micro-step on 8 GPUs; 10x the 124M run's compute.
# Data:  python dev/data/fineweb.py -t classic -v 100B     (dev/data/fineweb100B/, about 200 GB of shards)
#        python dev/data/hellaswag.py                      (the -h 1 eval file)
# llm.c: about 13.7 hours on 8x A100 80GB SXM (~820 ms a step), ~$200.
# Published result: llm.c's script and discussions give no final number for this run; the target is OpenAI's
#        GPT-2 350M checkpoint: val loss 3.08 on FineWeb's val shard, HellaSwag 37.5 (dev/vislog.py --baseline 350M).
# Run it from anywhere: bash scripts/run_gpt2_350M.sh. One GPU: NPROC=1.
source "$(dirname "$0")/lib.sh"
fineweb dev/data/fineweb100B/fineweb "python dev/data/fineweb.py -t classic -v 100B"
run_until_done log_gpt2_350M 60000 train_gpt2_cuda.py "${DATA[@]}" "${LLMC_COMMON[@]}" -e d24 \
    -b 64 -t 1024 -d 524288 -r 0 -l 0.0003 -q 0.0 -n 2000 -s 100000 -g 144
