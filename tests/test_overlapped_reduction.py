"""The last micro-step's gradient reduction overlapped with the backward pass (llm.c's gpt2_backward_and_reduce
with zero.cuh's multi_gpu_async_reduce_gradient): train_gpt2_cuda.py's gpt2_backward, given a
collectives.OverlappedReduction, reduces layer l's gradients once they are final, on NcclWorld's second
stream after an event, and wte, wpe, lnfw, lnfb after the encoder's backward.

Without GPUs: the CUDA trainer on the kernel emulator (everything runs when queued), rank 0 of an NcclWorld
of 2 whose stand-in communicator adds a fixed "other rank's" gradient to what it reads at the moment of the
call. So a slice reduced before its gradients were final gives other sums: the overlapped backward must
give the very bits of the backward followed by the reduction over the whole buffer (test_data_parallel's
path), -z 0 (all-reduce) and -z 1 (reduce-scatter of each rank's 1/2 of every slice), fp32 and bf16; and the
calls are one per slice, layer L-1 first, each group after an event on the compute stream, on the second
stream, whose end the compute stream waits for.
"""

import contextlib
import io
import types

import numpy as np
import pytest

from conftest import emulated_cuda_trainer
from llmc import collectives, formats
from llmc.model import param_shapes
from test_collectives_nccl import DevArray, host, narrow, widen
from test_cuda_trainer import CONFIG, random_params

B, T = 2, 8
COMPUTE, SIDE = 0, 1          # the stand-in streams' pointers


class Log(list):
    """What the stand-ins saw, in order."""


def stand_ins(log):
    """cupy's streams and events and cupy.cuda.nccl's group calls, each logging itself."""
    class Stream:
        def __init__(self, non_blocking=False):
            self.ptr = SIDE

        def wait_event(self, event):
            log.append(("wait", self.ptr, event.name))

    class Event:
        count = 0

        def __init__(self, disable_timing=False):
            Event.count += 1
            self.name = ("computed", "reduced")[Event.count - 1]

        def record(self, stream):
            log.append(("record", stream.ptr, self.name))

    current = types.SimpleNamespace(ptr=COMPUTE, wait_event=lambda e: log.append(("wait", COMPUTE, e.name)))
    cupy = types.SimpleNamespace(zeros=lambda shape, dtype=np.float32: np.zeros(shape, dtype).view(DevArray),
                                 cuda=types.SimpleNamespace(Stream=Stream, Event=Event,
                                                            get_current_stream=lambda: current))
    nccl = types.SimpleNamespace(NCCL_FLOAT32=7, NCCL_FLOAT64=8, NCCL_BFLOAT16=9, NCCL_SUM=0,
                                 groupStart=lambda: log.append(("groupStart",)),
                                 groupEnd=lambda: log.append(("groupEnd",)))
    return cupy, nccl


class PeerComm:
    """Rank 0's communicator with rank 1 stood in: rank 1's buffer is rank 0's as it is when the call is made
    (the same backward, at the same point) plus `peer`. So a slice reduced too early sums unfinished
    gradients on both ranks and misses what the backward adds to them later on rank 1."""

    def __init__(self, base, peer, log):
        self.base, self.peer, self.log = base, peer, log

    def _at(self, ptr):
        return (ptr - self.base) // self.peer.itemsize

    def allReduce(self, send, recv, count, code, op, stream):
        at = self._at(send)
        self.log.append(("allReduce", at, count, stream))
        mine = widen(host(send, count, code), code)
        host(recv, count, code)[...] = narrow(mine + (mine + widen(self.peer[at:at + count], code)), code)

    def reduceScatter(self, send, recv, recvcount, code, op, stream):
        at = self._at(send)                               # rank 0 receives the slice's first half
        assert self._at(recv) == at
        self.log.append(("reduceScatter", at, recvcount, stream))
        mine = widen(host(send, recvcount, code), code)
        host(recv, recvcount, code)[...] = narrow(mine + (mine + widen(self.peer[at:at + recvcount], code)), code)


@pytest.fixture(scope="module")
def cu():
    return emulated_cuda_trainer("train_gpt2_cuda_overlap")


def backward(cu, precision, overlap, sharded):
    """Rank 0's gradients after one forward and backward, reduced with the stand-in peer: during the
    backward (overlap) or after it, as train() does on gloo. Returns (the gradients, the log)."""
    model = cu.GPT2(CONFIG, random_params(CONFIG, 3), 1, precision, True, 0)
    with contextlib.redirect_stdout(io.StringIO()):
        cu.gpt2_allocate_state(model, B, T)
    grads = model.grads_memory.view(DevArray)
    rng = np.random.default_rng(5)
    peer = rng.normal(0, 0.01, grads.size).astype(np.float32)
    peer = formats.f32_to_bf16(peer) if grads.dtype == np.uint16 else peer
    log = Log()
    cupy, nccl = stand_ins(log)
    world = collectives.NcclWorld(0, 2, PeerComm(grads.ctypes.data, peer, log), cupy, nccl)
    x = np.random.default_rng(7).integers(0, CONFIG.vocab_size, size=(B, T))
    cu.gpt2_zero_grad(model)
    cu.gpt2_forward(model, x, np.roll(x, -1, axis=1), B, T)
    if overlap:
        model.reduce_in_backward = collectives.OverlappedReduction(world, grads, model.param_shapes, sharded)
    cu.gpt2_backward(model)
    assert getattr(model, "reduce_in_backward", None) is None       # used once
    if not overlap:
        log.append("after the backward")
        if sharded:                                       # the layout's slices, as train() under -z 1
            world.reduce_scatter_sum(grads, collectives.ShardLayout(model.param_shapes, 0, 2))
        else:
            world.all_reduce_sum(grads)
    return np.array(grads), log


def expected_calls(sharded):
    """(offset, count) of every call in the overlapped order: each layer from the last, its 12 tensors'
    slices in llm.c's order, then wte, wpe, lnfw, lnfb."""
    tensors = collectives.ShardLayout(param_shapes(CONFIG)).tensors
    calls = []
    for layer in [*reversed(range(CONFIG.num_layers)), None]:
        for _, name, offset, size, layers in tensors:
            if (layer is None) == (name in collectives.WHOLE_TENSORS):
                calls.append((offset + (layer or 0) * size, size // 2 if sharded else size))
    return calls


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("sharded", [False, True], ids=["z0", "z1"])
def test_overlapped_reduction_gives_the_bits_of_the_reduction_after_the_backward(cu, precision, sharded):
    overlapped, log = backward(cu, precision, True, sharded)
    after, after_log = backward(cu, precision, False, sharded)
    assert np.array_equal(overlapped, after)
    kind = "reduceScatter" if sharded else "allReduce"
    calls = [e for e in log if e[0] in ("allReduce", "reduceScatter")]
    assert [(at, n) for _, at, n, _ in calls] == expected_calls(sharded)
    assert all(c[0] == kind and c[3] == SIDE for c in calls)       # on the second stream
    groups = CONFIG.num_layers + 1
    # each group: the event on the compute stream, the side stream waits for it, then the group's calls
    starts = [i for i, e in enumerate(log) if e == ("groupStart",)]
    assert len(starts) == groups
    for i in starts:
        assert log[i - 2:i] == [("record", COMPUTE, "computed"), ("wait", SIDE, "computed")]
    assert log[-2:] == [("record", SIDE, "reduced"), ("wait", COMPUTE, "reduced")]   # the compute stream waits
    # the same slices were reduced after the backward (fewer calls under -z 0: one all-reduce of everything)
    if sharded:
        assert sorted((at, n) for _, at, n, _ in calls) == \
            sorted((at, n) for e in after_log if e[0] == kind for at, n in [e[1:3]])


def test_a_slice_reduced_before_its_gradients_are_final_is_seen(cu):
    """The check can fail: reducing layer 0 when layer 1 finishes (one layer early) changes the bits."""
    class Early(collectives.OverlappedReduction):
        def layer(self, layer):
            if layer == 1:
                super().layer(0)
            super().layer(layer) if layer != 0 else None

    original = collectives.OverlappedReduction
    collectives.OverlappedReduction = Early
    try:
        early, _ = backward(cu, "fp32", True, False)
    finally:
        collectives.OverlappedReduction = original
    after, _ = backward(cu, "fp32", False, False)
    assert not np.array_equal(early, after)


def test_gloo_keeps_reducing_after_the_backward():
    assert collectives.World.overlaps is False and collectives.NcclWorld.overlaps is True
