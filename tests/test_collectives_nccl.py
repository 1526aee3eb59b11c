"""llmc/collectives.py's NcclWorld, the GPU side of data parallel, without GPUs: two ranks in two threads,
each with a stand-in NCCL communicator that does what NCCL's documentation says each call does, on the
host memory behind the pointers it is given (an in-place reduce-scatter receives into the sender's own
rank-th chunk, an in-place all-gather sends from it). So the pointer arithmetic, the counts and the dtypes
that NcclWorld hands NCCL are checked by the results they give: sums, shards and gathers, fp32 and bf16.
What only GPUs can show (NCCL itself, streams) is dev/gpu_check.sh's. Also the NCCL id's exchange through
a shared directory (-pi fs), and its one-line errors."""

import ctypes
import threading
import types

import numpy as np
import pytest

from llmc import collectives
from llmc.formats import bf16_to_f32, f32_to_bf16
from llmc.utils import ConfigError


class DevArray(np.ndarray):
    """A NumPy array that answers .data.ptr as a CuPy array does (its slices too)."""
    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


fake_cupy = types.SimpleNamespace(
    zeros=lambda shape, dtype=np.float32: np.zeros(shape, dtype).view(DevArray),
    cuda=types.SimpleNamespace(get_current_stream=lambda: types.SimpleNamespace(ptr=0)))
fake_nccl = types.SimpleNamespace(NCCL_FLOAT32=7, NCCL_FLOAT64=8, NCCL_BFLOAT16=9, NCCL_SUM=0)
DTYPES = {7: np.float32, 8: np.float64, 9: np.uint16}


def host(ptr, count, code):
    """The `count` elements of NCCL dtype `code` at address ptr, as a writable NumPy view."""
    dtype = np.dtype(DTYPES[code])
    return np.ctypeslib.as_array((ctypes.c_uint8 * (count * dtype.itemsize)).from_address(ptr)).view(dtype)


def widen(a, code):
    return bf16_to_f32(a).astype(np.float64) if code == 9 else a.astype(np.float64)


def narrow(a, code):
    return f32_to_bf16(a.astype(np.float32)) if code == 9 else a.astype(DTYPES[code])


class Group:
    """What the ranks' communicators share: a barrier and a slot per rank."""
    def __init__(self, size):
        self.size, self.barrier, self.slots = size, threading.Barrier(size), [None] * size
        self.calls = []


class FakeComm:
    """NCCL's collectives on host memory: every rank posts its arguments, all read, then each writes its own
    receive buffer (the barrier between reading and writing makes in-place calls safe, as on a GPU)."""

    def __init__(self, group, rank):
        self.group, self.rank = group, rank

    def _all(self, item):
        self.group.slots[self.rank] = item
        self.group.barrier.wait()
        items = list(self.group.slots)
        self.group.barrier.wait()
        return items

    def allReduce(self, send, recv, count, code, op, stream):
        items = self._all((send, count, code))
        total = sum(widen(host(p, n, c), c) for p, n, c in items)
        self.group.barrier.wait()
        host(recv, count, code)[...] = narrow(total, code)
        self.group.barrier.wait()

    def reduceScatter(self, send, recv, recvcount, code, op, stream):
        items = self._all((send, recvcount, code))
        lo = self.rank * recvcount
        total = sum(widen(host(p, self.group.size * n, c)[lo:lo + n], c) for p, n, c in items)
        self.group.barrier.wait()
        host(recv, recvcount, code)[...] = narrow(total, code)
        self.group.barrier.wait()

    def allGather(self, send, recv, sendcount, code, stream):
        items = self._all((send, sendcount, code))
        parts = [host(p, n, c).copy() for p, n, c in items]
        self.group.barrier.wait()
        host(recv, self.group.size * sendcount, code)[...] = np.concatenate(parts)
        self.group.barrier.wait()

    def bcast(self, buff, count, code, root, stream):
        items = self._all((buff, count, code))
        data = host(*items[root]).copy()
        self.group.barrier.wait()
        host(buff, count, code)[...] = data
        self.group.barrier.wait()

    def destroy(self):
        pass


def on_two_ranks(job):
    """job(world) in two threads, ranks 0 and 1; returns their results."""
    group, results, errors = Group(2), [None, None], []

    def run(rank):
        try:
            world = collectives.NcclWorld(rank, 2, FakeComm(group, rank), fake_cupy, fake_nccl)
            results[rank] = job(world)
        except Exception as e:  # noqa: BLE001  (re-raised below, in the test's thread)
            errors.append(e)
            group.barrier.abort()
    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    return results


def rank_values(rank, n, bf16):
    x = (np.arange(n, dtype=np.float32) * 0.25 + 100 * (rank + 1)).astype(np.float32)
    return (f32_to_bf16(x) if bf16 else x).view(DevArray)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_all_reduce_reduce_scatter_all_gather(bf16):
    n = 16
    ones, twos = (widen(np.asarray(rank_values(r, n, bf16)), 9 if bf16 else 7) for r in (0, 1))

    def job(world):
        x = rank_values(world.rank, n, bf16)
        world.all_reduce_sum(x)
        reduced = np.array(x)
        y = rank_values(world.rank, n, bf16)
        world.reduce_scatter_sum(y)                       # in place: this rank's half is the sum
        scattered = np.array(y)
        world.all_gather(y)                               # every rank's half into every rank's y
        return reduced, scattered, np.array(y), world.sum(1.5 + world.rank)

    (r0, s0, g0, t0), (r1, s1, g1, t1) = on_two_ranks(job)
    code = 9 if bf16 else 7
    total = narrow(ones + twos, code)
    assert np.array_equal(r0, total) and np.array_equal(r1, total)
    assert np.array_equal(s0[:8], total[:8]) and np.array_equal(s0[8:], np.asarray(rank_values(0, n, bf16))[8:])
    assert np.array_equal(s1[8:], total[8:]) and np.array_equal(s1[:8], np.asarray(rank_values(1, n, bf16))[:8])
    assert np.array_equal(g0, total) and np.array_equal(g1, total)
    assert t0 == t1 == 4.0


def test_broadcast_and_barrier():
    def job(world):
        x = rank_values(world.rank, 8, False)
        world.broadcast(x, src=1)
        world.barrier()
        return np.array(x)
    a, b = on_two_ranks(job)
    assert np.array_equal(a, b) and np.array_equal(a, np.asarray(rank_values(1, 8, False)))


def test_a_dtype_nccl_does_not_take_is_refused():
    world = collectives.NcclWorld(0, 2, types.SimpleNamespace(allReduce=lambda *args: None), fake_cupy, fake_nccl)
    with pytest.raises(TypeError, match="NCCL collectives take float32, float64 or bf16"):
        world.all_reduce_sum(np.zeros(4, np.int32).view(DevArray))


def test_the_id_goes_through_a_shared_directory(tmp_path):
    """-pi fs: rank 0 writes its id (atomically), rank 1 waits for the file and reads the same id."""
    config = types.SimpleNamespace(fs_path=str(tmp_path))
    uid = tuple(range(128))
    got = [None, None]

    def rank(r):
        got[r] = collectives._exchange_id("fs", uid if r == 0 else None, r, 2, config)
    reader = threading.Thread(target=rank, args=(1,))
    reader.start()
    rank(0)
    reader.join(30)
    assert got == [uid, uid] and (tmp_path / collectives.NCCL_ID_FILE).exists()


def test_bad_multi_gpu_flags_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^-pi fs needs -pf, a directory all processes share"):
        collectives._exchange_id("fs", None, 1, 2, types.SimpleNamespace(fs_path=""))
    with pytest.raises(ConfigError, match=r"^-pi tcp needs -ps"):
        collectives._exchange_id("tcp", None, 1, 2, types.SimpleNamespace(server_ip=""))
    with pytest.raises(ConfigError, match=r"^-pi must be mpi, tcp or fs, got nfs"):
        collectives._exchange_id("nfs", None, 1, 2, types.SimpleNamespace())
