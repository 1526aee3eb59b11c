"""Data parallel across processes: the collectives train() needs, on NumPy float32 arrays, over
torch.distributed's gloo backend (llm.c's llmc/zero.cuh does the same over NCCL).

The processes are started by torchrun, which gives each one RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT in its environment:

    python -m torch.distributed.run --standalone --nproc_per_node 2 train_gpt2.py -d 1024 ...

Without WORLD_SIZE (or with 1) the run is one process: init() returns a World of size 1 whose
collectives do nothing, and torch is never imported. The arrays are handed to torch as views
(torch.from_numpy shares the memory), so every collective works in place on the trainer's buffers.

    all_reduce_sum(x)        x = the sum of every rank's x                     (ZeRO-0 gradients)
    reduce_scatter_sum(x)    x[shard] = the sum of every rank's x[shard]        (ZeRO-1 gradients;
                             the rest of x is left as it was)
    all_gather(x)            every rank's x[its shard] copied into every rank's x  (ZeRO-1 parameters)
    broadcast(x, src)        x = rank src's x
    sum(value) / mean(value) a python float summed / averaged over the ranks (loss, squared norm)
    barrier()                every rank waits until all have arrived here

ZeRO-1's shard of a flat array of n floats is the contiguous slice shard_range(n) of n / world floats.
"""

import os

from llmc.utils import ConfigError


def shard_range(n, rank, world_size):
    """(start, stop) of rank's contiguous 1/world_size of n floats; n must divide evenly (as llm.c's ZeRO-1)."""
    if n % world_size != 0:
        raise ConfigError(f"-z 1 shards the {n:,} parameters over {world_size} processes, which does not divide "
                          f"them; use -z 0 or a number of processes that divides {n:,}")
    size = n // world_size
    return rank * size, (rank + 1) * size


class World:
    """This process's rank among world_size; `dist` is torch.distributed, None for one process."""

    def __init__(self, rank=0, world_size=1, dist=None):
        self.rank, self.size, self.dist = rank, world_size, dist

    def _tensor(self, x):
        import torch
        assert x.flags.c_contiguous, "collectives work in place on contiguous arrays"
        return torch.from_numpy(x)

    def all_reduce_sum(self, x):
        if self.size > 1:
            self.dist.all_reduce(self._tensor(x), op=self.dist.ReduceOp.SUM)

    def reduce_scatter_sum(self, x):
        if self.size > 1:
            start, stop = shard_range(x.size, self.rank, self.size)
            t = self._tensor(x)
            out = t[start:stop].clone()                   # the input's chunks include this view: no aliasing
            self.dist.reduce_scatter(out, list(t.chunk(self.size)), op=self.dist.ReduceOp.SUM)
            t[start:stop] = out

    def all_gather(self, x):
        if self.size > 1:
            start, stop = shard_range(x.size, self.rank, self.size)
            t = self._tensor(x)
            self.dist.all_gather(list(t.chunk(self.size)), t[start:stop].clone())

    def broadcast(self, x, src=0):
        if self.size > 1:
            self.dist.broadcast(self._tensor(x), src=src)

    def sum(self, value):
        """A python float summed over the ranks (in float64)."""
        if self.size == 1:
            return value
        import numpy as np
        buf = np.array([value], dtype=np.float64)
        self.all_reduce_sum(buf)
        return float(buf[0])

    def mean(self, value):
        return value if self.size == 1 else self.sum(value) / self.size

    def barrier(self):
        if self.size > 1:
            self.dist.barrier()

    def close(self):
        if self.size > 1:
            self.dist.destroy_process_group()


def init():
    """The World torchrun's environment describes: gloo over MASTER_ADDR:MASTER_PORT, or one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World()
    try:
        import torch.distributed as dist
    except ImportError as e:
        raise ConfigError(f"WORLD_SIZE={world_size} asks for data parallel, which needs torch.distributed "
                          f"(pip install torch): {e}")
    if not dist.is_available() or not dist.is_gloo_available():
        raise ConfigError(f"WORLD_SIZE={world_size}: this torch has no torch.distributed gloo backend")
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=world_size)   # env://: MASTER_ADDR, MASTER_PORT
    return World(rank, world_size, dist)
