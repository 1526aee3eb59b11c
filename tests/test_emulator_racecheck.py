"""The emulator's race checker (racecheck=True, LLMC_EMULATOR_RACECHECK=1; emulator.h, "the race checker").

1. Faults planted in copies of the shipped kernels' sources (a __syncthreads removed, also after flash
   attention's tile loads; a plain += where an atomicAdd is needed; two blocks storing one global
   element) are named: kernel, buffer, byte offset and both threads, in every thread order.
2. The rules on small hand-written kernels: a __syncthreads orders a block, a warp operation (shuffle,
   __syncwarp, vote) orders a warp but not two warps, atomics on both sides are fine, reads with reads
   are fine, blocks are never ordered (not even by a __syncthreads), shared memory is the block's own,
   neighbouring bf16 elements are not one granule.
3. The switch: the keyword, the environment variable and its bad values; the checked build computes
   what the plain one does.
"""

import os
import re

import numpy as np
import pytest

import emulator
from llmc.cuda_common import kernel_source

ORDERS = emulator.THREAD_ORDERS
FP32 = ("--std=c++17",)
LINE = re.compile(r"racecheck: (\w+): (read|write)-after-(read|write) race on (.+?) at byte offset (\d+) between "
                  r"block \((\d+),(\d+),(\d+)\) thread \((\d+),(\d+),(\d+)\) and "
                  r"block \((\d+),(\d+),(\d+)\) thread \((\d+),(\d+),(\d+)\)$")


def races(fn, *args, **kwargs):
    """Launch with the race checker: [] when no race, else one dict per named race."""
    try:
        fn(*args, racecheck=True, **kwargs)
    except emulator.RaceError as e:
        lines = str(e).splitlines()
        assert lines[-1].startswith(f"racecheck: {fn.name}: ") and "racing accesses in all" in lines[-1], lines[-1]
        found = []
        for line in lines[:-1]:
            m = LINE.match(line)
            assert m, f"not a race line: {line}"
            v = [int(x) for x in m.groups()[4:]]
            found.append(dict(kernel=m[1], kind=f"{m[2]}-after-{m[3]}", where=m[4], offset=v[0],
                              threads={(tuple(v[1:4]), tuple(v[4:7])), (tuple(v[7:10]), tuple(v[10:13]))}))
        assert found, str(e)
        return found
    return []


def pair(block_a, thread_a, block_b, thread_b):
    """The set of (block, thread) coordinates of two accesses, 1-D launches."""
    return {((block_a, 0, 0), (thread_a, 0, 0)), ((block_b, 0, 0), (thread_b, 0, 0))}


def planted(file, old, new, count=1):
    """kernels/<file>.cu (common.cuh pasted in) with `old` replaced by `new`, which must occur `count` times
    (old may be a compiled regex: then it must match at least once)."""
    code = kernel_source(file)
    if isinstance(old, re.Pattern):
        code, n = old.subn(new, code)
        assert n >= 1, f"{file}.cu: the text to plant the fault in is gone: {old.pattern!r}"
        return code
    assert code.count(old) == count, f"{file}.cu: the text to plant the fault in is gone: {old!r}"
    return code.replace(old, new)


# ---------------------------------------------------------------------------------------------
# 1. faults planted in the shipped kernels
# (launched here by hand, not through train_gpt2_cuda.py's launchers: each is a copy of a kernel with a fault
# planted in it, on blocks smaller than the launchers' so that the races expected can be named thread by thread)

CLASSIFIER_BARRIER = "    __syncthreads();                                   // x[target] is read before anyone overwrites it\n"


@pytest.fixture(scope="module")
def classifier_without_barrier():
    """fused_classifier_kernel without the barrier between thread 0's read of x[target] and its overwrite."""
    code = planted("classifier", CLASSIFIER_BARRIER, "", count=2)
    return emulator.RawModule(code=code, options=FP32).get_function("fused_classifier_kernel")


def classifier_args(rows, V, Vp, targets):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((rows, Vp)).astype(np.float32)
    return (logits, np.zeros(rows, np.float32), None, np.array(targets, np.int32), np.int32(1), np.int32(rows),
            np.int32(V), np.int32(Vp), np.int32(1))


@pytest.mark.parametrize("order", ORDERS)
def test_classifier_without_its_barrier_races_on_the_target_logit(classifier_without_barrier, order):
    rows, V, Vp, block = 3, 101, 128, 64
    targets = [5, 70, 33]                              # owned by threads 5, 6 and 33 (column % 64), not 0
    found = races(classifier_without_barrier, rows, block, classifier_args(rows, V, Vp, targets), order=order)
    assert len(found) == rows
    for row, (race, t) in enumerate(zip(found, targets)):
        assert race["kernel"] == "fused_classifier_kernel" and race["where"] == "logits (argument 0)"
        assert race["offset"] == (row * Vp + t) * 4
        assert race["threads"] == pair(row, 0, row, t % block)
        # thread 0 reads before the owner writes, or after: which one depends on the order
        assert race["kind"] in ("write-after-read", "read-after-write")


@pytest.mark.parametrize("order", ORDERS)
def test_classifier_with_its_barrier_is_race_free(order):
    fn = emulator.RawModule(code=kernel_source("classifier"), options=FP32).get_function("fused_classifier_kernel")
    assert races(fn, 3, 64, classifier_args(3, 101, 128, [5, 70, 33]), order=order) == []


@pytest.mark.parametrize("order", ORDERS)
def test_block_sum_without_its_first_barrier_races_in_static_shared_memory(order):
    """common.cuh's block_sum without the barrier that lets block_max's partials be read before block_sum
    overwrites them: lane 0 of warp w writes shared[w] while lane w of every warp may still read it."""
    code = planted("classifier", "    __syncthreads();                                   "
                                 "// shared may still be read by the last call\n", "")
    fn = emulator.RawModule(code=code, options=FP32).get_function("fused_classifier_kernel")
    found = races(fn, 2, 128, classifier_args(2, 101, 128, [5, 70]), order=order)
    assert found
    for race in found:
        assert race["kernel"] == "fused_classifier_kernel" and race["where"] == "static __shared__ memory"
        assert race["kind"] in ("write-after-read", "read-after-write")
        (b1, (t1, _, _)), (b2, (t2, _, _)) = sorted(race["threads"])
        assert b1 == b2                                # shared memory races are within a block
        writer, reader = (t1, t2) if t1 % 32 == 0 and t2 != t1 else (t2, t1)
        assert writer % 32 == 0 and reader % 32 == writer // 32 and reader // 32 != writer // 32


def split_args(num_blocks, C):
    rng = np.random.default_rng(1)
    scratch = rng.standard_normal((num_blocks, 2 * C)).astype(np.float32)
    return np.zeros(C, np.float32), np.zeros(C, np.float32), scratch, np.int32(num_blocks), np.int32(C)


@pytest.mark.parametrize("order", ORDERS)
def test_layernorm_sum_split_without_its_barrier_races_on_the_warp_sums(order):
    """layernorm_backward_sum_split_kernel without the barrier between the warps' partials and their sum:
    lane 0 of warp w writes warp_sums[w*4 + k] while thread k reads it."""
    code = planted("layernorm", "        if (lane == 0) { warp_sums[warp * P + k] = w; }\n    }\n    __syncthreads();\n",
                   "        if (lane == 0) { warp_sums[warp * P + k] = w; }\n    }\n")
    fn = emulator.RawModule(code=code, options=FP32).get_function("layernorm_backward_sum_split_kernel")
    C = 8
    found = races(fn, 2 * C // 4, 128, split_args(300, C), order=order)
    assert found
    for race in found:
        assert race["where"] == "static __shared__ memory"
        (b1, (t1, _, _)), (b2, (t2, _, _)) = sorted(race["threads"])
        assert b1 == b2 and t1 != t2
        assert (t1 < 4 and t2 % 32 == 0) or (t2 < 4 and t1 % 32 == 0)    # a reader k < 4, a warp's lane 0


@pytest.mark.parametrize("order", ORDERS)
def test_two_blocks_adding_into_one_column_race_across_blocks(order):
    """layernorm_backward_sum_split_kernel with two blocks per pack of columns: both read-modify-write the
    same dbias elements, and blocks are never ordered."""
    code = planted("layernorm", re.compile(r"int col = blockIdx\.x \* (?:P|4);"), "int col = (blockIdx.x / 2) * 4;")
    fn = emulator.RawModule(code=code, options=FP32).get_function("layernorm_backward_sum_split_kernel")
    C = 8
    found = races(fn, 2 * C // 4, 128, split_args(40, C), order=order)
    # thread k of blocks 0 and 1 on column k (its first 4 races: which column comes first depends on the order)
    assert sorted((r["where"], r["offset"], sorted(r["threads"])) for r in found) == [
        ("dbias (argument 1)", 4 * k, sorted(pair(0, k, 1, k))) for k in range(4)]


NORM_STORE = "    if (threadIdx.x == 0) { out[blockIdx.x] = sum; }"


@pytest.mark.parametrize("order", ORDERS)
def test_norm_partials_added_with_plus_equals_race_and_with_atomicadd_do_not(order):
    """global_norm_squared_kernel summing its blocks' partials into out[0]: with atomicAdd (llm.c's first
    version) it is race free; with a plain += the blocks' read-modify-writes race (a lost update, which
    the thread orders alone cannot show)."""
    count = 3000
    data = np.random.default_rng(2).standard_normal(count).astype(np.float32)
    want = float(np.sum(data.astype(np.float64) ** 2))
    atomic = planted("adamw", NORM_STORE, "    if (threadIdx.x == 0) { atomicAdd(out, sum); }")
    fn = emulator.RawModule(code=atomic, options=FP32).get_function("global_norm_squared_kernel")
    out = np.zeros(1, np.float32)
    assert races(fn, 3, 256, (out, data, np.int64(count)), order=order) == []
    assert abs(out[0] - want) < 1e-4 * want
    plain = planted("adamw", NORM_STORE, "    if (threadIdx.x == 0) { out[0] += sum; }")
    fn = emulator.RawModule(code=plain, options=FP32).get_function("global_norm_squared_kernel")
    out = np.zeros(1, np.float32)
    found = races(fn, 3, 256, (out, data, np.int64(count)), order=order)
    assert [(r["kernel"], r["where"], r["offset"]) for r in found] == [("global_norm_squared_kernel",
                                                                         "out (argument 0)", 0)] * 2
    assert [r["threads"] for r in found] == [pair(0, 0, 1, 0), pair(1, 0, 2, 0)]
    assert abs(out[0] - want) < 1e-4 * want            # the emulator still adds right: only the checker sees it


FLASH_LOADS = ("        load_tile<HS, BC>(sm.v, q_head + 2 * C, 3 * C, k0, T);\n        __syncthreads();\n"
               "        matmul_abt<BR, HS>(sm.s, sm.q, sm.k, warp);")


@pytest.mark.parametrize("order", ORDERS)
def test_flash_forward_without_the_barrier_after_its_tile_loads_races_in_shared_memory(order):
    """flash_attention_forward_kernel (bf16, nvcuda::wmma) without the __syncthreads between the loads of
    a key/value tile into shared memory and the tensor-core product that reads them: the warps' fragment
    loads (each lane's own accesses, emulator/include/mma.h) race with other threads' stores of the tile."""
    code = planted("flash_attention", FLASH_LOADS, FLASH_LOADS.replace("        __syncthreads();\n", ""))
    fn = emulator.RawModule(code=code, options=("--std=c++17", "-DENABLE_BF16")).get_function(
        "flash_attention_forward_kernel")
    B, T, NH, hs = 1, 40, 1, 64
    rng = np.random.default_rng(3)
    qkv = (rng.standard_normal((B, T, 3 * NH * hs)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    out, lse = np.zeros((B, T, NH * hs), np.uint16), np.zeros(B * NH * T, np.float32)
    import train_gpt2_cuda                            # the launcher's shared bytes (its import needs no GPU)
    shared = train_gpt2_cuda.flash_shared_bytes(hs, False)
    found = races(fn, (1, B * NH), 128, (out, lse, qkv, np.int32(B), np.int32(T), np.int32(NH), np.int32(hs)),
                  shared_mem=shared, order=order)               # one tile of 40 rows, one head: grid (1, 1)
    assert found
    for race in found:
        assert race["kernel"] == "flash_attention_forward_kernel" and race["where"] == "shared memory"
        (b1, t1), (b2, t2) = sorted(race["threads"])
        assert b1 == b2 == (0, 0, 0) and t1 != t2


# ---------------------------------------------------------------------------------------------
# 2. the rules, on hand-written kernels

RULES = r"""
#include <cuda_bf16.h>
// each thread writes its slot, then reads its neighbour's (next thread, wrapping) after a barrier
extern "C" __global__ void shared_barrier(float* out, int barrier) {
    __shared__ float s[256];
    s[threadIdx.x] = (float)threadIdx.x;
    if (barrier) { __syncthreads(); }
    out[blockIdx.x * blockDim.x + threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}
// the same in dynamic shared memory, ordered by a __syncwarp only: fine within one warp
extern "C" __global__ void dynamic_syncwarp(float* out, int sync) {
    extern __shared__ float d[];
    d[threadIdx.x] = (float)threadIdx.x;
    if (sync) { __syncwarp(); }
    int lane = threadIdx.x % 32;
    out[threadIdx.x] = d[threadIdx.x - lane + (lane + 1) % 32];
}
// reads a slot of the next warp after a __syncwarp: a warp operation does not order two warps
extern "C" __global__ void syncwarp_across_warps(float* out) {
    extern __shared__ float d[];
    d[threadIdx.x] = (float)threadIdx.x;
    __syncwarp();
    out[threadIdx.x] = d[(threadIdx.x + 32) % blockDim.x];
}
// global memory ordered by a shuffle: lane l writes x[l], lanes exchange, lane l rewrites x[l ^ 1]
extern "C" __global__ void shuffle_orders(float* x, int shuffle) {
    x[threadIdx.x] = 1.0f;
    float v = shuffle ? __shfl_xor_sync(0xffffffffu, 1.0f, 1) : 1.0f;
    x[threadIdx.x ^ 1] += v;
}
// a ballot orders its warp too
extern "C" __global__ void ballot_orders(float* x) {
    x[threadIdx.x] = 1.0f;
    unsigned votes = __ballot_sync(0xffffffffu, 1);
    x[threadIdx.x ^ 1] += (float)(votes & 1u);
}
// every thread of every block adds into out[0] and out[1]
extern "C" __global__ void atomics(float* out, int plain_read) {
    atomicAdd(&out[0], 1.0f);
    atomicAdd(&out[1], 2.0f);
    if (plain_read && threadIdx.x == 7) { out[2] = out[0]; }
}
// every thread reads x[0]; thread 0 of each block writes its block's y
extern "C" __global__ void read_read(float* y, const float* x) {
    float v = x[0];
    __syncthreads();
    if (threadIdx.x == 0) { y[blockIdx.x] = v; }
}
// thread 3 of every block writes out[0], a barrier between the blocks' turns does not order them
extern "C" __global__ void blocks_store(float* out) {
    __syncthreads();
    if (threadIdx.x == 3) { out[0] = (float)blockIdx.x; }
    __syncthreads();
}
// each block's thread 0 writes shared s[0] and thread 1 reads it after a barrier: no race, since each
// block has its own shared memory
extern "C" __global__ void shared_per_block(float* out) {
    __shared__ float s[4];
    if (threadIdx.x == 0) { s[0] = (float)blockIdx.x; }
    __syncthreads();
    if (threadIdx.x == 1) { out[blockIdx.x] = s[0]; }
}
// neighbouring bf16 elements written by neighbouring threads: no byte in common
extern "C" __global__ void bf16_neighbours(__nv_bfloat16* out) {
    out[threadIdx.x] = __float2bfloat16((float)threadIdx.x);
}
// a 2-D launch: thread (1,1) of block (1,1) and thread (0,1) of block (0,1) write out[5]
extern "C" __global__ void coords(float* out) {
    if (threadIdx.y == 1 && blockIdx.y == 1 && threadIdx.x == blockIdx.x) { out[5] = 1.0f; }
}
"""


@pytest.fixture(scope="module")
def rules():
    return emulator.RawModule(code=RULES, options=FP32)


def run(rules, name, grid, block, *args, shared_mem=0, order="forward"):
    return races(rules.get_function(name), grid, block, args, shared_mem=shared_mem, order=order)


@pytest.mark.parametrize("order", ORDERS)
def test_a_barrier_orders_a_block_and_its_absence_is_named(rules, order):
    out = np.zeros(2 * 64, np.float32)
    assert run(rules, "shared_barrier", 2, 64, out, np.int32(1), order=order) == []
    assert np.array_equal(out, np.tile((np.arange(64) + 1) % 64, 2).astype(np.float32))
    found = run(rules, "shared_barrier", 2, 64, out, np.int32(0), order=order)
    assert all(r["where"] == "static __shared__ memory" for r in found)
    # each slot is written by its thread and read by the thread before it (slot 0 by thread 63)
    assert all(len({t for _, (t, _, _) in r["threads"]}) == 2 for r in found)
    assert all({(a - b) % 64 for (_, (a, _, _)) in r["threads"] for (_, (b, _, _)) in r["threads"]} == {0, 1, 63}
               for r in found)


@pytest.mark.parametrize("order", ORDERS)
def test_a_syncwarp_orders_its_warp(rules, order):
    out = np.zeros(64, np.float32)
    assert run(rules, "dynamic_syncwarp", 1, 64, out, np.int32(1), shared_mem=256, order=order) == []
    found = run(rules, "dynamic_syncwarp", 1, 64, out, np.int32(0), shared_mem=256, order=order)
    assert found and all(r["where"] == "shared memory" for r in found)
    for r in found:                                    # slot s (offset 4s) written by thread s, read by its lane neighbour
        (_, (t1, _, _)), (_, (t2, _, _)) = sorted(r["threads"])
        assert t1 // 32 == t2 // 32 and r["offset"] // 4 in (t1, t2)


@pytest.mark.parametrize("order", ORDERS)
def test_a_syncwarp_does_not_order_two_warps(rules, order):
    found = run(rules, "syncwarp_across_warps", 1, 64, np.zeros(64, np.float32), shared_mem=256, order=order)
    assert found
    for r in found:
        (_, (t1, _, _)), (_, (t2, _, _)) = sorted(r["threads"])
        assert t2 == t1 + 32 and r["offset"] // 4 in (t1, t2)


@pytest.mark.parametrize("order", ORDERS)
def test_shuffles_and_ballots_order_their_warp(rules, order):
    x = np.zeros(64, np.float32)
    assert run(rules, "shuffle_orders", 1, 64, x, np.int32(1), order=order) == []
    assert np.array_equal(x, np.full(64, 2.0, np.float32))
    found = run(rules, "shuffle_orders", 1, 64, np.zeros(64, np.float32), np.int32(0), order=order)
    assert found and all(r["where"] == "x (argument 0)" for r in found)
    assert all({t for _, (t, _, _) in r["threads"]} == {r["offset"] // 4, r["offset"] // 4 ^ 1} for r in found)
    assert run(rules, "ballot_orders", 1, 64, np.zeros(64, np.float32), order=order) == []


@pytest.mark.parametrize("order", ORDERS)
def test_atomics_on_both_sides_are_fine_and_a_plain_read_of_them_is_not(rules, order):
    out = np.zeros(3, np.float32)
    assert run(rules, "atomics", 3, 64, out, np.int32(0), order=order) == []
    assert out.tolist() == [192.0, 384.0, 0.0]
    found = run(rules, "atomics", 3, 64, np.zeros(3, np.float32), np.int32(1), order=order)
    assert found[0]["where"] == "out (argument 0)" and found[0]["offset"] == 0
    assert ((0, 0, 0), (7, 0, 0)) in found[0]["threads"]   # thread 7's plain read against another's atomicAdd


@pytest.mark.parametrize("order", ORDERS)
def test_reads_with_reads_are_fine(rules, order):
    y = np.zeros(4, np.float32)
    assert run(rules, "read_read", 4, 96, y, np.full(1, 3.0, np.float32), order=order) == []
    assert y.tolist() == [3.0] * 4


@pytest.mark.parametrize("order", ORDERS)
def test_blocks_are_never_ordered(rules, order):
    found = run(rules, "blocks_store", 3, 32, np.zeros(1, np.float32), order=order)
    assert [(r["kind"], r["where"], r["offset"], r["threads"]) for r in found] == [
        ("write-after-write", "out (argument 0)", 0, pair(0, 3, 1, 3)),
        ("write-after-write", "out (argument 0)", 0, pair(1, 3, 2, 3))]


@pytest.mark.parametrize("order", ORDERS)
def test_shared_memory_is_each_blocks_own(rules, order):
    out = np.zeros(5, np.float32)
    assert run(rules, "shared_per_block", 5, 32, out, order=order) == []
    assert out.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_neighbouring_bf16_elements_do_not_race(rules):
    out = np.zeros(64, np.uint16)
    assert run(rules, "bf16_neighbours", 1, 64, out) == []


def test_a_race_names_2d_coordinates(rules):
    found = run(rules, "coords", (2, 2), (2, 2), np.zeros(8, np.float32))
    assert len(found) == 1 and found[0]["offset"] == 20
    assert found[0]["threads"] == {((0, 1, 0), (0, 1, 0)), ((1, 1, 0), (1, 1, 0))}


def test_the_message_names_the_first_races_and_counts_them_all(rules):
    fn = rules.get_function("shared_barrier")
    with pytest.raises(emulator.RaceError) as e:
        fn(1, 256, (np.zeros(256, np.float32), np.int32(0)), racecheck=True)
    lines = str(e.value).splitlines()
    assert len(lines) == emulator.rawmodule.RACE_REPORTS + 1
    assert lines[-1].startswith("racecheck: shared_barrier: 256 racing accesses in all")


# ---------------------------------------------------------------------------------------------
# 3. the switch

def test_the_environment_variable_turns_it_on_and_the_keyword_wins(rules, monkeypatch):
    fn = rules.get_function("blocks_store")
    out = np.zeros(1, np.float32)
    monkeypatch.setenv("LLMC_EMULATOR_RACECHECK", "0")
    fn(2, 32, (out,))                                  # off: the plain build, nothing checked
    fn(2, 32, (out,), racecheck=False)
    monkeypatch.setenv("LLMC_EMULATOR_RACECHECK", "1")
    with pytest.raises(emulator.RaceError, match="racecheck: blocks_store: write-after-write race on out"):
        fn(2, 32, (out,))
    fn(2, 32, (out,), racecheck=False)
    monkeypatch.setenv("LLMC_EMULATOR_RACECHECK", "yes")
    with pytest.raises(ValueError, match="LLMC_EMULATOR_RACECHECK must be 0 or 1, got 'yes'"):
        fn(2, 32, (out,))


def test_the_checked_build_computes_what_the_plain_one_does():
    fn = emulator.RawModule(code=kernel_source("classifier"), options=FP32).get_function("fused_classifier_kernel")
    outputs = []
    for racecheck in (False, True):
        args = classifier_args(3, 101, 128, [5, 70, 33])
        fn(3, 64, args, racecheck=racecheck, guard=True)
        outputs.append((args[0].copy(), args[1].copy()))
    assert np.array_equal(outputs[0][0], outputs[1][0]) and np.array_equal(outputs[0][1], outputs[1][1])
    assert not np.array_equal(outputs[0][0], classifier_args(3, 101, 128, [5, 70, 33])[0])   # it did write
