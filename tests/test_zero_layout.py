"""ZeRO-1 in llm.c's layout, AdamW's stochastic rounding at llm.c's positions, the fp32 state fields.

llm.c (train_gpt2.cu's gpt2_update with llmc/zero.cuh's multi_gpu_get_shard_offset) gives rank r the r-th
1/N of every layer slice of every parameter tensor, and keeps its m, v and master weights compactly at
tensor offset / N (collectives.ShardLayout). Its adamw_kernel3 runs per tensor on a grid with one row per
layer, so an element's random draw depends on (its place in the layer, the layer); its load_state rebuilds
the bf16 weights from the master weights with the generator as it was before the last update
(init_from_master), which must give the model file's weights back bit for bit.
"""

import contextlib
import io

import numpy as np
import pytest

from conftest import emulated_cuda_trainer
from llmc import checkpoint
from llmc.model import GPT2Config, param_shapes
from llmc.collectives import ShardLayout
from llmc.formats import bf16_to_f32, f32_to_bf16
from llmc.sampler import random_u32
from llmc.utils import ConfigError
from test_cuda_trainer import CONFIG, random_params
from test_data_parallel import BASE, P, TINY, launch, needs_gloo, steps, workdir  # noqa: F401 (fixture)

B, T = 2, 8


def test_layout_is_llmc_shard_offsets():
    shapes = param_shapes(TINY)
    for world in (2, 4):
        seen = np.zeros(P, np.int32)
        for rank in range(world):
            layout = ShardLayout(shapes, rank, world)
            assert layout.num_state == P // world
            expected, offset = [], 0
            for name, shape in shapes:                    # llm.c's gpt2_get_tensor_at_layer + get_shard_offset
                count = int(np.prod(shape))
                layers = 1 if name in ("wte", "wpe", "lnfw", "lnfb") else TINY.num_layers
                size = count // layers
                for layer in range(layers):
                    expected.append((offset + layer * size + rank * (size // world),
                                     offset // world + layer * (size // world), size // world))
                offset += count
            assert [(s, st, n) for _, _, s, st, n in layout.pieces] == expected
            for start, _, n in expected:
                seen[start:start + n] += 1
            states = [st for _, st, _ in expected]        # compact: each piece right after the one before
            assert states == list(np.cumsum([0] + [n for _, _, n in expected[:-1]]))
            flat = np.arange(P, dtype=np.float32)
            assert np.array_equal(layout.gather(flat), np.concatenate([flat[s:s + n] for s, _, n in expected]))
        assert (seen == 1).all()                          # every parameter on exactly one rank


def test_layout_names_the_tensor_that_does_not_divide():
    config = GPT2Config(max_seq_len=6, vocab_size=300, padded_vocab_size=384, num_layers=2,
                        num_heads=2, channels=8)
    # wte 384*8 and wpe 6*8 divide by 3, ln1w's 8 per layer does not
    with pytest.raises(ConfigError, match=r"^-z 1 gives each of the 3 processes 1/3 of every layer of every "
                                          r"parameter tensor \(llm.c's ZeRO-1\), but ln1w's 8 parameters per "
                                          r"layer do not divide by 3; use -z 0$"):
        ShardLayout(param_shapes(config), 0, 3)
    ShardLayout(param_shapes(config), 1, 2)       # 2 divides every slice


# ---- the CUDA trainer on the emulator: the rounding's positions, init_from_master, the fp32 fields

@pytest.fixture(scope="module")
def cu():
    return emulated_cuda_trainer("train_gpt2_cuda_zero_layout")


def noise_hash(position, seed):
    """common.cuh's noise_hash (SquirrelNoise5) on uint32 arrays, wrapping as the GPU's."""
    h = position * np.uint32(0xD2A80A3F) + np.uint32(seed)
    h ^= h >> np.uint32(9)
    h = h + np.uint32(0xA884F197)
    h ^= h >> np.uint32(11)
    h = h * np.uint32(0x6C736F4B)
    h ^= h >> np.uint32(13)
    h = h + np.uint32(0xB79F3ABB)
    h ^= h >> np.uint32(15)
    h = h * np.uint32(0x1B56C4F5)
    h ^= h >> np.uint32(17)
    return h


def llmc_rounding(values, layer, seed):
    """llm.c's stochastic_rounding of one row (layer) of adamw_kernel3's grid, 512 threads a block: the draw
    at Get2dNoiseUint(threadIdx.x, blockIdx.x * blockDim.x + blockIdx.y, seed)."""
    i = np.arange(values.size, dtype=np.uint32)
    x, y = i % np.uint32(512), (i // np.uint32(512)) * np.uint32(512) + np.uint32(layer)
    threshold = noise_hash(x + np.uint32(198491317) * y, seed) & np.uint32(0xFFFF)
    bits = values.astype(np.float32).view(np.uint32)
    bits = np.where((bits & np.uint32(0xFFFF)) > threshold, bits | np.uint32(0xFFFF), bits & ~np.uint32(0xFFFF))
    return f32_to_bf16(bits.view(np.float32))


def trained(cu, precision, layout, steps=2, master_weights=True):
    """A CONFIG model after `steps` AdamW updates of its rank's pieces (the gradients of one process)."""
    rng = np.random.default_rng(3)
    model = cu.GPT2(CONFIG, random_params(CONFIG, rng), 1, precision, master_weights, 0)
    with contextlib.redirect_stdout(io.StringIO()):
        cu.gpt2_allocate_state(model, B, T, layout)
        for step in range(steps):
            x = rng.integers(0, CONFIG.vocab_size, size=(B, T))
            cu.gpt2_zero_grad(model)
            cu.gpt2_forward(model, x, np.roll(x, -1, axis=1), B, T)
            cu.gpt2_backward(model)
            cu.gpt2_update(model, 1e-2, cu.BETA1, cu.BETA2, cu.ADAM_EPS, 0.1, step + 1, shard=layout)
    return model


@pytest.mark.parametrize("rank,world", [(0, 1), (0, 2), (1, 2)])
def test_bf16_update_rounds_at_llmc_positions_and_rebuilds_bit_for_bit(cu, rank, world):
    shapes = param_shapes(CONFIG)
    layout = ShardLayout(shapes, rank, world) if world > 1 else None
    model = trained(cu, "bf16", layout)
    params, master = np.array(model.params_memory), np.array(model.master_memory)
    generator = [model.rng_state_last_update]
    seeds = [random_u32(generator) for _ in shapes]       # one per tensor, in order, as llm.c's gpt2_update
    rows = 0
    for index, layer, start, state, n in model.shard.pieces:
        expect = llmc_rounding(master[state:state + n], layer, seeds[index])
        assert np.array_equal(params[start:start + n], expect), (shapes[index][0], layer)
        rows += layer > 0
    assert rows > 0                                       # layers >= 1 were checked: where a 1-D grid differs
    # init_from_master (gpt2_rebuild_from_master launches "init_from_master_kernel"): from the master weights and
    # rng_state_last_update, the same bits (as the model file's)
    model.params_memory[...] = 0
    assert cu.gpt2_rebuild_from_master(model) > 0         # it wrote this rank's pieces
    assert np.array_equal(model.shard.gather(np.array(model.params_memory)), model.shard.gather(params))
    assert cu.gpt2_rebuild_from_master(model) == 0        # and again: nothing changes
    model.rng_state_last_update += 1                      # another generator state: other draws
    assert cu.gpt2_rebuild_from_master(model) > 0


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_resume_rebuilds_the_model_files_weights(cu, rank, world):
    """-y 1's path: a model from the written weights (the model file's bf16 values) given the state's master
    weights and generator rebuilds its pieces from them (llm.c's load_state) and gets the same bits back."""
    layout = ShardLayout(param_shapes(CONFIG), rank, world) if world > 1 else None
    model = trained(cu, "bf16", layout)
    written = np.array(model.params_memory)
    master, rng_state, last = cu.gpt2_master_state(model)
    resumed = cu.GPT2(CONFIG, bf16_to_f32(written), 1, "bf16", True, 0)
    with contextlib.redirect_stdout(io.StringIO()):
        cu.gpt2_allocate_state(resumed, B, T, layout)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cu.gpt2_load_master_state(resumed, master, rng_state, last)
    assert out.getvalue() == ""                           # the rebuild changed nothing: no line about it
    assert np.array_equal(np.array(resumed.params_memory), written)
    assert (resumed.rng_state[0], resumed.rng_state_last_update) == (rng_state, last)
    # master weights that do not belong to the weights (the fp32 init, as before any update): a line, and the
    # model file's weights kept
    with contextlib.redirect_stdout(out):
        cu.gpt2_load_master_state(resumed, master * np.float32(1.001), rng_state, last)
    assert "the master weights round to" in out.getvalue() and "the model file's kept" in out.getvalue()
    assert np.array_equal(np.array(resumed.params_memory), written)


def test_fp32_state_has_the_generator_and_master_weights(cu):
    """llm.c's fp32 build keeps master weights under -w 1 (its default) and still draws its seeds: the state
    holds both; its master weights are the fp32 parameters, bit for bit (llm.c's copy is the same)."""
    layout = ShardLayout(param_shapes(CONFIG), 1, 2)
    model = trained(cu, "fp32", layout)
    master, rng_state, last = cu.gpt2_master_state(model)
    assert master.dtype == np.float32 and np.array_equal(master, layout.gather(np.array(model.params_memory)))
    seed = 13371337
    assert last != seed and rng_state != last              # two updates (16 seeds each) and encoder draws
    without = trained(cu, "fp32", None, steps=1, master_weights=False)
    assert cu.gpt2_master_state(without)[0] is None        # -w 0: none, as llm.c's fp32 build with -w 0


# ---- the NumPy trainer over 2 ranks (gloo): the state file's m is llm.c's pieces

@needs_gloo
def test_two_rank_zero1_state_holds_llmc_pieces(workdir):
    flags = [*BASE[:BASE.index("-x")], "-x", "5", *BASE[BASE.index("-x") + 2:], "-n", "5"]
    runs = {}
    for zero in (0, 1):
        out = workdir / f"layout{zero}"
        steps(launch(workdir, 2, *flags, "-z", zero, "-o", out.name))
        runs[zero] = [checkpoint.read_state_file(checkpoint.state_path(str(out), 5, r), P // 2 if zero else P, 2, r)
                      for r in range(2)]
    whole = runs[0][0].m                                  # ZeRO-0: every rank holds all of m
    assert np.abs(whole).max() > 1e-3
    for rank in range(2):
        layout = ShardLayout(param_shapes(TINY), rank, 2)
        mine = runs[1][rank].m
        np.testing.assert_allclose(mine, layout.gather(whole), rtol=1e-4, atol=1e-7)
        contiguous = whole[rank * (P // 2):(rank + 1) * (P // 2)]
        assert np.abs(mine - contiguous).max() > 1e-3    # not the old contiguous half


# ---- the collectives by the layout: NCCL (the stand-in communicator of test_collectives_nccl.py)

@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_nccl_reduce_scatter_and_all_gather_move_the_layout_pieces(bf16):
    from test_collectives_nccl import narrow, on_two_ranks, rank_values, widen
    shapes, code = param_shapes(TINY), 9 if bf16 else 7
    total = narrow(sum(widen(np.asarray(rank_values(r, P, bf16)), code) for r in (0, 1)), code)

    def job(world):
        layout = ShardLayout(shapes, world.rank, 2)
        x = rank_values(world.rank, P, bf16)
        world.reduce_scatter_sum(x, layout)
        scattered = np.array(x)
        world.all_gather(x, layout)
        return layout, scattered, np.array(x)

    for layout, scattered, gathered in on_two_ranks(job):
        mine = np.zeros(P, bool)
        for _, _, start, _, n in layout.pieces:
            mine[start:start + n] = True
        assert mine.sum() == P // 2
        assert np.array_equal(scattered[mine], total[mine])                     # its pieces: the sums
        assert np.array_equal(scattered[~mine], np.asarray(rank_values(layout.rank, P, bf16))[~mine])  # the rest
        assert np.array_equal(gathered, total)                                  # then every piece everywhere
