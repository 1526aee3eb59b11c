#!/usr/bin/env bash
# GPT-2 (124M) from scratch on FineWeb, llm.c's scripts/run_gpt2_124M.sh with our trainer.
#
# What:  d12 (12 layers, 12 heads, 768 channels, 124M parameters), one epoch of FineWeb's 10B-token sample:
#        18,865 steps of 524,288 tokens (-d), 64 x 1024 per GPU per micro-step on 8 GPUs.
# Data:  python dev/data/fineweb.py -t classic -v 10B      (dev/data/fineweb10B/, about 20 GB of shards)
#        python dev/data/hellaswag.py                      (the -h 1 eval file)
# llm.c: about 90 minutes on 8x A100 80GB SXM (~300 ms a step), ~$20 (discussion #481).
# Published result: HellaSwag 29.9 at the end (OpenAI's GPT-2 124M: 29.4); val loss about 3.28 (llm.c's
#        run as modded-nanogpt's README quotes it: 3.2847 after 10B tokens).
# Run it from anywhere: bash scripts/run_gpt2_124M.sh. One GPU: NPROC=1 (same result, 8x the time).
# Out of memory: -r 1, then halve -b (the gradient accumulation keeps -d), as llm.c's scripts/README says.
source "$(dirname "$0")/lib.sh"
fineweb dev/data/fineweb10B/fineweb "python dev/data/fineweb.py -t classic -v 10B"
run_until_done log_gpt2_124M 18865 train_gpt2_cuda.py "${DATA[@]}" "${LLMC_COMMON[@]}" -e d12 \
    -b 64 -t 1024 -d 524288 -r 0 -l 0.0006 -q 0.0 -n 5000 -s 20000 -g 144
