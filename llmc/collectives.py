"""Data parallel across processes: the collectives train() needs, on the trainer's own flat arrays.

Two engines, one interface (World):
  - NumPy arrays (train_gpt2.py, and train_gpt2_cuda.py on the kernel emulator): torch.distributed's gloo
    backend on the CPU. bf16 arrays (uint16 bits) are summed in float32 and rounded back to nearest even.
  - CuPy arrays on GPUs (train_gpt2_cuda.py): NCCL through cupy.cuda.nccl (NcclWorld below), as llm.c's
    llmc/zero.cuh; float32 and bf16 (NCCL's own bfloat16 sums).

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

ZeRO-1's shard is llm.c's (train_gpt2.cu's gpt2_update with llmc/zero.cuh's multi_gpu_get_shard_offset): a
ShardLayout (below) gives each rank its 1/world of every layer slice of every parameter tensor, and
reduce_scatter_sum / all_gather take it as `layout` to move exactly those pieces. Without a layout they work
on x as one block: rank r's contiguous 1/world of it, shard_range(x.size).

On GPUs the last micro-step's reduction runs during the backward pass (OverlappedReduction, NcclWorld's
reduce_slices_async / wait_reductions: a second stream and two events, as llm.c's
multi_gpu_async_reduce_gradient); gloo's World reduces after the backward (World.overlaps).
"""

import os
import sys
import time

from llmc.utils import ConfigError


def shard_range(n, rank, world_size):
    """(start, stop) of rank's contiguous 1/world_size of n floats, n dividing evenly: the collectives' split
    of an array given without a ShardLayout (ZeRO-1's parameters go by the layout, llm.c's pieces)."""
    if n % world_size != 0:
        raise ConfigError(f"-z 1 shards the {n:,} parameters over {world_size} processes, which does not divide "
                          f"them; use -z 0 or a number of processes that divides {n:,}")
    size = n // world_size
    return rank * size, (rank + 1) * size


# the tensors outside the transformer blocks (llm.c's parameter tensors 0, 1, 14, 15): one slice each;
# every other tensor has one slice per layer
WHOLE_TENSORS = ("wte", "wpe", "lnfw", "lnfb")


class ShardLayout:
    """llm.c's ZeRO-1 split of the flat parameter vector over `world_size` ranks, seen from `rank`.

    Each tensor is cut into slices, one per layer for the per-layer tensors (L of them) and one for
    wte, wpe, lnfw, lnfb; rank r owns the r-th 1/world of every slice. Its m, v and master weights are
    stored compactly, tensor by tensor, layer by layer: the tensor's at tensor offset / world, then its
    layer l's at l * slice / world after that. world_size 1 (or -z 0) is the same walk with whole slices,
    which is also how AdamW's kernel is launched (one grid row per layer) whatever the world size.

    pieces: (tensor index, layer, start in the flat vector, start in the compact state, size), in state
    order; tensors: (index, name, offset, slice size, layers) per tensor; num_state: the state's length."""

    def __init__(self, param_shapes, rank=0, world_size=1):
        self.rank, self.size = rank, world_size
        self.tensors, self.pieces = [], []
        offset = 0
        for index, (name, shape) in enumerate(param_shapes):
            count = 1
            for d in shape:
                count *= d
            layers = 1 if name in WHOLE_TENSORS else shape[0]
            slice_size = count // layers
            if slice_size % world_size != 0:   # llm.c's multi_gpu_get_shard_offset exits here
                raise ConfigError(f"-z 1 gives each of the {world_size} processes 1/{world_size} of every layer "
                                  f"of every parameter tensor (llm.c's ZeRO-1), but {name}'s {slice_size:,} parameters"
                                  f"{' per layer' if layers > 1 else ''} do not divide by {world_size}; use -z 0")
            part = slice_size // world_size
            self.tensors.append((index, name, offset, slice_size, layers))
            for layer in range(layers):
                start = offset + layer * slice_size
                self.pieces.append((index, layer, start + rank * part, offset // world_size + layer * part, part))
            offset += count
        self.num_parameters = offset
        self.num_state = offset // world_size

    def pieces_of(self, rank):
        """The pieces rank `rank` owns: (start in the flat vector, size), in state order."""
        return [(start - self.rank * size + rank * size, size) for _, _, start, _, size in self.pieces]

    def gather(self, flat):
        """This rank's pieces of the flat vector `flat`, concatenated in state order (a new array)."""
        import numpy as np
        return np.concatenate([np.asarray(flat[start:start + size]) for _, _, start, _, size in self.pieces])


class World:
    """This process's rank among world_size; `dist` is torch.distributed, None for one process.
    overlaps: whether the trainer may reduce the gradients during the backward pass (OverlappedReduction,
    below); gloo's calls block the host, so on the CPU they run after the backward."""

    overlaps = False

    def __init__(self, rank=0, world_size=1, dist=None):
        self.rank, self.size, self.dist = rank, world_size, dist

    def _tensor(self, x):
        import torch
        assert x.flags.c_contiguous, "collectives work in place on contiguous arrays"
        return torch.from_numpy(x)

    def all_reduce_sum(self, x):
        if self.size > 1:
            if x.dtype.name == "uint16":                  # bf16 bits: sum them as float32, round back once
                wide = _widen(x)
                self.all_reduce_sum(wide)
                x[...] = _narrow(wide)
                return
            self.dist.all_reduce(self._tensor(x), op=self.dist.ReduceOp.SUM)

    def reduce_scatter_sum(self, x, layout=None):
        if self.size > 1:
            if layout is not None:
                return self._by_layout(x, layout, self.reduce_scatter_sum, back=True)
            start, stop = shard_range(x.size, self.rank, self.size)
            if x.dtype.name == "uint16":
                wide = _widen(x)
                self.reduce_scatter_sum(wide)
                x[start:stop] = _narrow(wide[start:stop])
                return
            t = self._tensor(x)
            out = t[start:stop].clone()                   # the input's chunks include this view: no aliasing
            self.dist.reduce_scatter(out, list(t.chunk(self.size)), op=self.dist.ReduceOp.SUM)
            t[start:stop] = out

    def all_gather(self, x, layout=None):
        if self.size > 1:
            if layout is not None:
                return self._by_layout(x, layout, self.all_gather, back=False)
            start, stop = shard_range(x.size, self.rank, self.size)
            t = self._tensor(x.view("float16") if x.dtype.name == "uint16" else x)   # copied as bits (gloo has no int16)
            self.dist.all_gather(list(t.chunk(self.size)), t[start:stop].clone())

    def _by_layout(self, x, layout, collective, back):
        """A collective over the layout's pieces as ONE gloo call: every rank's pieces copied rank after rank
        into a buffer, whose r-th contiguous chunk is then rank r's (the same sums, element by element, as
        llm.c's per-slice calls); back: only this rank's own chunk returns to x (reduce-scatter), else all."""
        import numpy as np
        owners = [layout.pieces_of(r) for r in range(self.size)]
        buf = np.concatenate([x[start:start + size] for pieces in owners for start, size in pieces])
        collective(buf)
        at = 0
        for r, pieces in enumerate(owners):
            for start, size in pieces:
                if r == self.rank or not back:
                    x[start:start + size] = buf[at:at + size]
                at += size

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


class OverlappedReduction:
    """The last micro-step's gradient reduction during the backward pass, as llm.c's gpt2_backward_and_reduce:
    the backward calls layer(l) once layer l's gradients are final (the end of its layer's step: layer l's
    fcprojb is final since layer l+1's, or the final LayerNorm's, backward, its attprojb since its own ln2's)
    and outside() after the encoder's (wte, wpe, lnfw, lnfb), then finish(). Each call reduces those tensors'
    slices of world's layout (tensor by tensor; the layer's slice of each per-layer tensor) on the world's
    second stream: all-reduce (-z 0) or reduce-scatter, each rank keeping its 1/world of each slice (-z 1,
    llm.c's ZeRO-1 shards). Every slice is reduced once, by the same call as after the backward, so the sums
    are the same bits; only when they run changes."""

    def __init__(self, world, grads, param_shapes, sharded):
        self.world, self.grads, self.sharded = world, grads, sharded
        self.tensors = ShardLayout(param_shapes).tensors   # (index, name, offset, slice size, layers)

    def _slices(self, layer, outside):
        return [(offset + (0 if outside else layer * size), size) for _, name, offset, size, layers in self.tensors
                if (name in WHOLE_TENSORS) == outside]

    def layer(self, layer):
        self.world.reduce_slices_async(self.grads, self._slices(layer, False), self.sharded)

    def outside(self):
        self.world.reduce_slices_async(self.grads, self._slices(0, True), self.sharded)

    def finish(self):
        self.world.wait_reductions()


def lost_a_peer(error):
    """Whether an exception is a collective that failed because another process is gone: gloo reports a
    closed or reset connection, torch.distributed raises its Dist*Error types, NCCL an NcclError."""
    kind = type(error).__name__
    text = str(error)
    return kind in ("DistBackendError", "DistNetworkError", "DistStoreError", "NcclError") or \
        (isinstance(error, RuntimeError) and ("gloo" in text or "Connection reset" in text or "Connection closed" in text))


def _widen(bits):
    from llmc.formats import bf16_to_f32
    return bf16_to_f32(bits)


def _narrow(x):
    from llmc.formats import f32_to_bf16
    return f32_to_bf16(x)


def init(engine="gloo", config=None):
    """This process's World. engine "gloo": the World torchrun's environment describes (gloo over
    MASTER_ADDR:MASTER_PORT), or one process. engine "nccl": an NcclWorld (see init_nccl), with config the
    run's llm.c multi-GPU flags (-pn -pr -pg -pi -ps -pf, as attributes num_processes, process_rank,
    gpus_per_node, nccl_init_method, server_ip, fs_path)."""
    if engine == "nccl":
        return init_nccl(config)
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


# ----------------------------------------------------------------------------
# NCCL, for CuPy arrays on GPUs (train_gpt2_cuda.py)

class NcclWorld(World):
    """Every collective runs on the GPU through one NCCL communicator, in place on device arrays, on
    CuPy's current stream: ZeRO-1's reduce-scatter and all-gather use NCCL's in-place forms (this rank's
    chunk of the buffer is its receive / send buffer). Python floats (loss, squared norm) and the barrier
    go through a small device buffer too, so after start-up nothing but NCCL is used."""

    overlaps = True

    def __init__(self, rank, world_size, comm, cupy, nccl):
        super().__init__(rank, world_size, None)
        self.comm, self.cp, self.nccl = comm, cupy, nccl
        self.scalar = cupy.zeros(1, dtype="float64")
        self.side_stream = None                           # the reductions' own stream, made on first use

    def reduce_slices_async(self, x, slices, sharded):
        """llm.c's multi_gpu_async_reduce_gradient: the slices [(start, size)] of x summed over the ranks
        on a second stream, once every kernel queued so far on the compute stream has run (an event, so the
        host does not wait and the backward goes on queueing). sharded (-z 1): an in-place reduce-scatter
        of each slice, this rank receiving its 1/world of it; else an all-reduce of each. One NCCL group."""
        if self.size == 1:
            return
        cp = self.cp
        if self.side_stream is None:
            self.side_stream = cp.cuda.Stream(non_blocking=True)
            self.computed, self.reduced = cp.cuda.Event(disable_timing=True), cp.cuda.Event(disable_timing=True)
        self.computed.record(cp.cuda.get_current_stream())
        self.side_stream.wait_event(self.computed)
        dtype, stream = self._dtype(x), self.side_stream.ptr
        self.nccl.groupStart()
        try:
            for start, size in slices:
                if sharded:
                    part = size // self.size
                    self.comm.reduceScatter(x[start:].data.ptr, x[start + self.rank * part:].data.ptr, part, dtype,
                                            self.nccl.NCCL_SUM, stream)
                else:
                    self.comm.allReduce(x[start:].data.ptr, x[start:].data.ptr, size, dtype, self.nccl.NCCL_SUM,
                                        stream)
        finally:
            self.nccl.groupEnd()

    def wait_reductions(self):
        """The compute stream waits for every reduction queued on the second stream (llm.c synchronizes
        the device at the end of its backward; an event keeps the host free)."""
        if self.side_stream is not None:
            self.reduced.record(self.side_stream)
            self.cp.cuda.get_current_stream().wait_event(self.reduced)

    def _dtype(self, x):
        if x.dtype.name == "float32":
            return self.nccl.NCCL_FLOAT32
        if x.dtype.name == "float64":
            return self.nccl.NCCL_FLOAT64
        if x.dtype.name == "uint16":                      # bf16 bits
            return getattr(self.nccl, "NCCL_BFLOAT16", 9)
        raise TypeError(f"NCCL collectives take float32, float64 or bf16 (uint16) arrays, not {x.dtype}")

    def _stream(self):
        return self.cp.cuda.get_current_stream().ptr

    def all_reduce_sum(self, x):
        if self.size > 1:
            self.comm.allReduce(x.data.ptr, x.data.ptr, x.size, self._dtype(x), self.nccl.NCCL_SUM, self._stream())

    def reduce_scatter_sum(self, x, layout=None):
        if self.size > 1 and layout is not None:          # llm.c: one in-place reduce-scatter per slice
            for _, _, start, _, size in layout.pieces:
                whole = start - self.rank * size          # the slice this piece is rank's 1/world of
                self.comm.reduceScatter(x[whole:].data.ptr, x[start:].data.ptr, size, self._dtype(x),
                                        self.nccl.NCCL_SUM, self._stream())
        elif self.size > 1:
            start, stop = shard_range(x.size, self.rank, self.size)
            self.comm.reduceScatter(x.data.ptr, x[start:].data.ptr, stop - start, self._dtype(x),
                                    self.nccl.NCCL_SUM, self._stream())

    def all_gather(self, x, layout=None):
        if self.size > 1 and layout is not None:          # llm.c: one in-place all-gather per slice
            for _, _, start, _, size in layout.pieces:
                self.comm.allGather(x[start:].data.ptr, x[start - self.rank * size:].data.ptr, size,
                                    self._dtype(x), self._stream())
        elif self.size > 1:
            start, stop = shard_range(x.size, self.rank, self.size)
            self.comm.allGather(x[start:].data.ptr, x.data.ptr, stop - start, self._dtype(x), self._stream())

    def broadcast(self, x, src=0):
        if self.size > 1:
            self.comm.bcast(x.data.ptr, x.size, self._dtype(x), src, self._stream())

    def sum(self, value):
        if self.size == 1:
            return value
        self.scalar.fill(value)
        self.all_reduce_sum(self.scalar)
        return float(self.scalar[0])                      # a device -> host copy: waits for the sum

    def barrier(self):
        if self.size > 1:
            self.sum(0.0)                                 # every rank must reach the all-reduce

    def close(self):
        self.comm.destroy()
        dist = sys.modules.get("torch.distributed")       # torchrun's id exchange left a gloo group
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()


NCCL_ID_FILE = "ncclUniqueId.sync"


def init_nccl(config):
    """The NcclWorld of this process. Who the processes are and how rank 0's NCCL id reaches the others
    (llm.c's multi_gpu_config_init):
      torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment): torch.distributed's store (gloo
          over MASTER_ADDR:MASTER_PORT) carries the id;
      -pi mpi (llm.c's default; mpirun): MPI's broadcast (mpi4py);
      -pi fs -pf DIR -pn N -pr R: rank 0 writes the id to DIR/ncclUniqueId.sync, the others wait for it;
      -pi tcp -ps IP -pn N -pr R: torch.distributed's TCPStore on IP:12345 (rank 0 serves it).
    Each process uses GPU (its rank within its node) = rank % -pg, or LOCAL_RANK under torchrun."""
    import cupy
    from cupy.cuda import nccl
    method = getattr(config, "nccl_init_method", "mpi")
    if "WORLD_SIZE" in os.environ:                        # torchrun
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        method = "torchrun"
    elif method == "mpi" and _mpi_size() > 1:
        from mpi4py import MPI
        rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
        local = rank % config.gpus_per_node
    elif method in ("fs", "tcp") and config.num_processes > 1:
        rank, size = config.process_rank, config.num_processes
        local = rank % config.gpus_per_node
        if not 0 <= rank < size:
            raise ConfigError(f"-pr {rank} must be in 0..{size - 1} (-pn {size})")
    else:
        return World()                                    # one process: no NCCL at all
    cupy.cuda.Device(local).use()
    uid = nccl.get_unique_id() if rank == 0 else None
    uid = _exchange_id(method, uid, rank, size, config)
    comm = nccl.NcclCommunicator(size, uid, rank)     # collective: returns once every rank has joined
    if method == "fs" and rank == 0:
        os.remove(os.path.join(config.fs_path, NCCL_ID_FILE))   # read by all: a next run must not find it
    return NcclWorld(rank, size, comm, cupy, nccl)


def _mpi_size():
    """Processes in MPI's world when started by mpirun (its environment says so), else 1, without
    importing mpi4py in a plain run."""
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        if name in os.environ:
            return int(os.environ[name])
    return 1


def _exchange_id(method, uid, rank, size, config):
    """Rank 0's NCCL unique id (a tuple of ints, as cupy.cuda.nccl gives it) on every rank."""
    if method == "torchrun":
        import torch.distributed as dist
        dist.init_process_group("gloo")                   # env://: MASTER_ADDR, MASTER_PORT
        box = [uid]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    if method == "mpi":
        from mpi4py import MPI
        return MPI.COMM_WORLD.bcast(uid, root=0)
    if method == "tcp":
        import pickle
        from torch.distributed import TCPStore
        if not config.server_ip:
            raise ConfigError("-pi tcp needs -ps, the IP address of rank 0's machine")
        store = TCPStore(config.server_ip, 12345, size, rank == 0)
        if rank == 0:
            store.set("nccl_id", pickle.dumps(uid))
        return pickle.loads(store.get("nccl_id"))
    if method == "fs":
        import pickle
        if not config.fs_path or not os.path.isdir(config.fs_path):
            raise ConfigError(f"-pi fs needs -pf, a directory all processes share (got '{config.fs_path}')")
        path = os.path.join(config.fs_path, NCCL_ID_FILE)
        if rank == 0:
            import numpy as np
            from llmc.utils import write_atomic
            write_atomic(path, [np.frombuffer(pickle.dumps(uid), np.uint8)])
            return uid
        deadline = time.time() + 300
        while not os.path.exists(path):                   # rank 0 writes it (atomically) once
            if time.time() > deadline:
                raise ConfigError(f"-pi fs: {path} did not appear in 5 minutes: is rank 0 running with the same -pf?")
            time.sleep(0.1)
        with open(path, "rb") as f:
            return pickle.load(f)
    raise ConfigError(f"-pi must be mpi, tcp or fs, got {method}")
