"""llm.c's model and state files as llm.c's train_gpt2.cu reads and writes them, written from its code and
independent of llmc/checkpoint.py and llmc/collectives.py (the tests use it to check those, so it must not
share their mistakes). It follows, in karpathy/llm.c:

  train_gpt2.cu   fill_in_parameter_sizes        the 16 tensors' sizes, in order
                  gpt2_get_tensor_at_layer       a tensor's offset, and one layer's slice of it
                  gpt2_write_to_checkpoint /     the model file: 256 int32 header (magic 20240326, version 3
                  gpt2_build_from_checkpoint       fp32 / 5 bf16), then the parameters
                  gpt2_update                    where each rank's AdamW reads m, v and master weights:
                                                   opt_state_offset = tensor.offset + shard.offset (ZeRO-0)
                                                   or tensor.offset / N (ZeRO-1)
                  save_state / load_state        the state file: header, m, v, master weights, the loader
  llmc/zero.cuh   multi_gpu_get_shard_offset     rank r's (offset, size) of a slice: r * size/N under ZeRO-1
  llmc/adamw.cuh  adamw_kernel3                  grid row y = layer: params at y * w_stride, m / v / master
                                                   at y * s_stride (s_stride = the shard's size)

slots(...) maps every parameter element a rank updates to the slot of m, v and master weights where that
rank's state file holds it.
"""

import numpy as np

MODEL_MAGIC, STATE_MAGIC = 20240326, 20240527
HEADER_INTS = 256
NAMES = ("wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w", "ln2b", "fcw", "fcb",
         "fcprojw", "fcprojb", "lnfw", "lnfb")


def param_sizes(maxT, V, Vp, L, NH, C):
    """fill_in_parameter_sizes: the 16 tensors' element counts."""
    return [Vp * C, maxT * C, L * C, L * C, L * 3 * C * C, L * 3 * C, L * C * C, L * C, L * C, L * C,
            L * 4 * C * C, L * 4 * C, L * C * 4 * C, L * C, C, C]


def tensor_at_layer(sizes, L, layer, i):
    """gpt2_get_tensor_at_layer: (offset, size) of tensor i's slice at `layer` (tensors 2..13 have L slices)."""
    offset = sum(sizes[:i])
    size = sizes[i]
    if 2 <= i <= 13:
        size //= L
        offset += layer * size
    return offset, size


def shard_offset(elements, rank, N, zero):
    """multi_gpu_get_shard_offset(elements, config, shard_at_stage=1)."""
    if zero >= 1:
        if elements % N != 0:
            raise ValueError(f"llm.c exits: {elements} elements are not a multiple of {N} processes")
        return rank * (elements // N), elements // N
    return 0, elements


def slots(sizes, L, rank, N, zero):
    """(params, state): for every parameter element rank `rank` of N updates, its index in the flat
    parameter vector and its index in that rank's m / v / master weights, as gpt2_update launches
    adamw_kernel3: per tensor, rows = layers, element j of row y at param_ptr + y * tensor.size + j and
    at the state's opt_state_offset + y * shard.size + j."""
    params, state = [], []
    for i in range(16):
        rows = 1 if (i < 2 or i > 13) else L
        t_off, t_size = tensor_at_layer(sizes, L, 0, i)      # layer 0's slice: the launch's base
        s_off, s_size = shard_offset(t_size, rank, N, zero)
        full = t_off + s_off
        opt = full if zero < 1 else t_off // N
        j = np.arange(s_size, dtype=np.int64)
        for y in range(rows):
            params.append(full + y * t_size + j)
            state.append(opt + y * s_size + j)
    return np.concatenate(params), np.concatenate(state)


def state_size(sizes, N, zero):
    """multi_gpu_config.shard_num_parameters: all of them under ZeRO-0, 1/N under ZeRO-1."""
    total = sum(sizes)
    return total // N if zero >= 1 else total


# ---- model files

def read_model(path):
    """(header int32[256], params as float32) per gpt2_build_from_checkpoint (bf16 widened exactly)."""
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_INTS * 4), "<i4").copy()
        body = f.read()
    assert header[0] == MODEL_MAGIC, f"{path}: bad magic {header[0]}"
    if header[1] == 3:
        return header, np.frombuffer(body, "<f4").copy()
    assert header[1] == 5, f"{path}: version {header[1]} is neither fp32 (3) nor bf16 (5)"
    bits = np.frombuffer(body, "<u2").astype(np.uint32) << np.uint32(16)
    return header, bits.view(np.float32)


def model_sizes(header):
    """param_sizes from a model header: [2] maxT [3] V [4] L [5] NH [6] C [7] Vp."""
    maxT, V, L, NH, C, Vp = (int(x) for x in header[2:8])
    return param_sizes(maxT, V, Vp, L, NH, C), L


# ---- state files

def read_state(path, n_state):
    """save_state's fields: a dict of the header's (num_processes, rank, use_master_weights, should_shuffle,
    step, rng_state, rng_state_last_update, current_shard_idx, current_sample_idx), m, v, master (or None)
    of n_state floats each, and `loader`: the bytes after them (shard permutation ... mt19937 state)."""
    with open(path, "rb") as f:
        data = f.read()
    h = np.frombuffer(data[:HEADER_INTS * 4], "<i4")
    assert h[0] == STATE_MAGIC and h[1] == 1, f"{path}: not an llm.c state file (magic {h[0]}, version {h[1]})"
    u64 = lambda slot: int(np.frombuffer(data, "<u8", 1, slot * 4)[0])   # noqa: E731
    st = dict(num_processes=int(h[2]), rank=int(h[3]), use_master_weights=int(h[4]), should_shuffle=int(h[5]),
              step=int(h[10]), rng_state=u64(20), rng_state_last_update=u64(22), current_shard_idx=u64(30),
              current_sample_idx=u64(32))
    at = HEADER_INTS * 4
    arrays = []
    for _ in range(3 if st["use_master_weights"] else 2):
        arrays.append(np.frombuffer(data, "<f4", n_state, at).copy())
        at += 4 * n_state
    st["m"], st["v"] = arrays[:2]
    st["master"] = arrays[2] if st["use_master_weights"] else None
    st["loader"] = data[at:]
    if not st["should_shuffle"]:
        assert not st["loader"], f"{path}: {len(st['loader'])} bytes left after the optimizer state"
    return st


def write_state(path, st):
    """save_state: the header's fields in their slots (everything else 0, as llm.c's memset), then m, v,
    master weights when use_master_weights, then the loader's bytes as read."""
    h = np.zeros(HEADER_INTS, "<i4")
    h[0], h[1] = STATE_MAGIC, 1
    h[2], h[3], h[4], h[5] = st["num_processes"], st["rank"], st["master"] is not None, st["should_shuffle"]
    h[10] = st["step"]
    wide = h.view("<u8")
    wide[10], wide[11] = st["rng_state"], st["rng_state_last_update"]
    wide[15], wide[16] = st["current_shard_idx"], st["current_sample_idx"]
    parts = [h.tobytes(), np.asarray(st["m"], "<f4").tobytes(), np.asarray(st["v"], "<f4").tobytes()]
    if st["master"] is not None:
        parts.append(np.asarray(st["master"], "<f4").tobytes())
    parts.append(st["loader"])
    with open(path, "wb") as f:
        f.write(b"".join(parts))


def gather_ranks(states, sizes, L, zero, field):
    """The whole parameter vector's `field` (m, v or master) from every rank's state: each rank's slots put
    at their parameters; under ZeRO-0 every rank holds all of it, rank 0's is returned. Returns (values,
    count): count says how many ranks gave each parameter (1 everywhere under ZeRO-1)."""
    N = len(states)
    total = sum(sizes)
    values, count = np.zeros(total, np.float32), np.zeros(total, np.int32)
    for rank, st in enumerate(states):
        p, s = slots(sizes, L, rank, N, zero)
        values[p] = st[field][s]
        count[p] += 1
        if zero < 1:
            break
    return values, count


def scatter_ranks(values, sizes, L, rank, N, zero):
    """One rank's `field` laid out as its state file holds it, from the whole parameter vector."""
    out = np.zeros(state_size(sizes, N, zero), np.float32)
    p, s = slots(sizes, L, rank, N, zero)
    out[s] = values[p]
    return out
