#!/usr/bin/env bash
# GPT-2 (124M) on FineWeb over two machines of 8 GPUs each, started by mpirun: llm.c's
# scripts/multi_node/run_gpt2_124M_mpi.sh with our trainer. Processes find each other through MPI
# (-pi mpi: rank 0's NCCL id goes out in an MPI broadcast, which needs pip install mpi4py on every machine).
#
# What:  d12 on FineWeb's 10B sample, 2,097,152 tokens a step (4x the one-machine run's), 64 x 1024 per GPU
#        per micro-step on 16 GPUs, ZeRO-1; llm.c's multi-node settings (-q 0.1, checkpoints every 1,000 steps,
#        a fresh start: -y 0). With -x unset the run is one epoch (about 4,700 steps).
# Data:  python dev/data/fineweb.py -t classic -v 10B, on a path every machine reads (data_prefix below)
#        python dev/data/hellaswag.py                      (the -h 1 eval file, in each machine's working dir)
# llm.c: gives no time or result for this script; the one-machine run (run_gpt2_124M.sh: 90 minutes on 8x A100,
#        HellaSwag 29.9, val loss about 3.28) is the reference, and twice the GPUs should take about half the time.
# Run on the first machine, from the repository root (the same path on every machine, or a shared filesystem):
#   host1=node-a host2=node-b bash scripts/multi_node/run_gpt2_124M_mpi.sh
source "$(dirname "$0")/../lib.sh"
# change these to match your machines (names from /etc/hosts or `hostname`) and where the shards are
host1=${host1:-h100-node-1-0}
host2=${host2:-h100-node-1-1}
out=${out_dir:-log_gpt2_124M_multi}
fineweb "${data_prefix:-dev/data/fineweb10B/fineweb}" "python dev/data/fineweb.py -t classic -v 10B"

# NCCL settings llm.c suggests for InfiniBand clusters; uncomment what matches yours
# export NCCL_DEBUG=INFO                     # say what NCCL does, when something hangs
# export NCCL_IB_DISABLE=0                   # use InfiniBand where there is some
# export NCCL_NET_GDR_LEVEL=2                # GPUDirect RDMA: NIC to GPU memory without the CPU
# export NCCL_SOCKET_IFNAME=ens17            # the network interface NCCL and MPI talk over
# export OMPI_MCA_btl_tcp_if_include=ens17

LAUNCH=(mpirun -np 16 --host "$host1:8,$host2:8")
launch train_gpt2_cuda.py "${DATA[@]}" "${LLMC_COMMON[@]}" -o "$out" -y 0 -e d12 -pg 8 -pi mpi \
    -b 64 -t 1024 -d 2097152 -r 0 -l 0.0006 -q 0.1 -n 1000 -s 20000 -g 144
