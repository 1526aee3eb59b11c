"""gpt2_update's one launch (adamw_multi_tensor_kernel over a table of the tensors) against llm.c's
per-tensor launches (gpt2_update_per_tensor, adamw_kernel 16 times): the same bits in the parameters, the
master weights, m and v, for fp32 and bf16, with and without master weights, without ZeRO and for each rank
of a ZeRO-1 shard of 2, in the emulator's three thread orders under its race checker. And ZeRO-1's gradient
norm from device-side partial sums with one host read (gpt2_pieces_sum_squares) against the per-piece sums.
"""

import contextlib
import io

import numpy as np
import pytest

from conftest import emulated_cuda_trainer
from llmc.model import param_shapes
from llmc.collectives import ShardLayout
from test_cuda_trainer import CONFIG, random_params

B, T = 2, 8


@pytest.fixture(scope="module")
def cu():
    return emulated_cuda_trainer("train_gpt2_cuda_adamw_one_launch")


def with_gradients(cu, precision, master_weights, layout):
    """A CONFIG model with this rank's state allocated and one backward's gradients (the same every call)."""
    rng = np.random.default_rng(5)
    model = cu.GPT2(CONFIG, random_params(CONFIG, rng), 1, precision, master_weights, 0)
    x = rng.integers(0, CONFIG.vocab_size, size=(B, T))
    with contextlib.redirect_stdout(io.StringIO()):
        cu.gpt2_allocate_state(model, B, T, layout)
        cu.gpt2_zero_grad(model)
        cu.gpt2_forward(model, x, np.roll(x, -1, axis=1), B, T)
        cu.gpt2_backward(model)
    return model


def state_bytes(model):
    master = b"" if model.master_memory is None else np.asarray(model.master_memory).tobytes()
    return (np.asarray(model.params_memory).tobytes(), master, np.asarray(model.m_memory).tobytes(),
            np.asarray(model.v_memory).tobytes(), model.rng_state[0], model.rng_state_last_update)


CASES = [(p, w, rank, world) for p in ("fp32", "bf16") for w in (True, False)
         for rank, world in ((0, 1), (0, 2), (1, 2))]


@pytest.mark.parametrize("precision, master_weights, rank, world", CASES)
def test_one_launch_is_the_per_tensor_update_bit_for_bit(cu, precision, master_weights, rank, world):
    layout = ShardLayout(param_shapes(CONFIG), rank, world) if world > 1 else None
    one, per_tensor = (with_gradients(cu, precision, master_weights, layout) for _ in range(2))
    assert state_bytes(one) == state_bytes(per_tensor)
    for step in (1, 2):                                   # the second step: nonzero m and v going in
        cu.gpt2_update(one, 1e-2, cu.BETA1, cu.BETA2, cu.ADAM_EPS, 0.1, step, grad_scale=0.7, shard=layout)
        cu.gpt2_update_per_tensor(per_tensor, 1e-2, cu.BETA1, cu.BETA2, cu.ADAM_EPS, 0.1, step, grad_scale=0.7,
                                  shard=layout)
        assert state_bytes(one) == state_bytes(per_tensor), step
    before = with_gradients(cu, precision, master_weights, layout)
    assert np.asarray(one.params_memory).tobytes() != np.asarray(before.params_memory).tobytes()   # it moved
    if world > 1:                                         # only this rank's pieces moved
        other = [(s, n) for s, n in ShardLayout(param_shapes(CONFIG), 1 - rank, world).pieces_of(1 - rank)]
        for start, n in other:
            assert np.array_equal(np.asarray(one.params_memory)[start:start + n],
                                  np.asarray(before.params_memory)[start:start + n])


@pytest.mark.parametrize("order", ["forward", "reverse", "warps"])
@pytest.mark.parametrize("precision, master_weights, rank, world", [("bf16", True, 1, 2), ("bf16", False, 0, 1),
                                                                    ("fp32", False, 0, 2)])
def test_one_launch_has_no_race_in_any_order(cu, monkeypatch, order, precision, master_weights, rank, world):
    layout = ShardLayout(param_shapes(CONFIG), rank, world) if world > 1 else None
    one, per_tensor = (with_gradients(cu, precision, master_weights, layout) for _ in range(2))
    cu.gpt2_update_per_tensor(per_tensor, 1e-2, cu.BETA1, cu.BETA2, cu.ADAM_EPS, 0.1, 1, shard=layout)
    monkeypatch.setenv("LLMC_EMULATOR_ORDER", order)
    monkeypatch.setenv("LLMC_EMULATOR_RACECHECK", "1")   # a race raises
    cu.gpt2_update(one, 1e-2, cu.BETA1, cu.BETA2, cu.ADAM_EPS, 0.1, 1, shard=layout)
    assert state_bytes(one) == state_bytes(per_tensor)


def test_one_launch_table(cu):
    """The table's blocks: each tensor's rows of ceil(part / 512) blocks end to end; 16 tensors, 16 rows."""
    model = with_gradients(cu, "fp32", False, None)
    layout = ShardLayout(param_shapes(CONFIG), 1, 2)
    table, rows, blocks = cu._adamw_table(model, layout)
    table = np.asarray(table).reshape(rows, cu.ADAMW_FIELDS)
    launches = list(cu._update_launches(layout))
    assert rows == 16 == len(launches)
    assert blocks == sum(-(-part // 512) * layers for _, _, _, _, part, layers, _ in launches)
    assert list(table[:, 0]) == list(np.cumsum([0] + [-(-p // 512) * r for *_, p, r, _ in launches[:-1]]))
    assert [bool(d) for d in table[:, 6]] == [name in cu.host.DECAYED_PARAMS for _, name, *_ in launches]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("rank, world", [(0, 2), (1, 2), (0, 1)])
def test_pieces_sum_squares_is_the_per_piece_sum_with_one_read(cu, monkeypatch, precision, rank, world):
    """ZeRO-1's norm: every piece's float32 sum stays on the device and the host reads them once, then adds
    them in float64 in piece order: the bits of the per-piece calls (one host sync each) it replaces."""
    layout = ShardLayout(param_shapes(CONFIG), rank, world)
    model = with_gradients(cu, precision, True, layout if world > 1 else None)
    ranges = [(start, start + n) for _, _, start, _, n in layout.pieces]
    assert len(ranges) == 4 + 12 * CONFIG.num_layers      # wte, wpe, lnfw, lnfb and 12 tensors per layer
    want = sum(cu.gpt2_grad_sum_squares(model, lo, hi) for lo, hi in ranges)
    reads = []
    real = cu.to_numpy
    monkeypatch.setattr(cu, "to_numpy", lambda x: reads.append(np.shape(x)) or real(x))
    got = cu.gpt2_pieces_sum_squares(model, ranges)
    assert reads == [(len(ranges),)]                      # one read of all the pieces' sums
    assert got == want > 0                                # bit for bit
    whole = cu.gpt2_pieces_sum_squares(model, [(0, model.num_parameters)])
    assert whole == cu.gpt2_grad_sum_squares(model)
    with pytest.raises(ValueError, match=r"^gradient norm: range \[5, 5\) is empty or outside the \d+ gradients; "
                                         r"pass 0 <= lo < hi <= the parameter count$"):
        cu.gpt2_pieces_sum_squares(model, [(5, 5)])
    assert cu.gpt2_pieces_sum_squares(model, []) == 0.0


@pytest.mark.parametrize("order", ["forward", "reverse", "warps"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_kernel_over_a_padded_table_is_the_per_tensor_launches(order, precision):
    """The kernel itself on a hand-made table: 3 tensors (4 table rows, the last one padding), one of several
    blocks per layer row, one with a parameter row stride wider than its piece (a ZeRO-1 shard's), decay on one
    tensor only, against adamw_kernel launched per tensor; race-checked, in each thread order."""
    import emulator
    from check_kernel import recorded_launches, run_launches
    from llmc.cuda_common import ceil_div, kernel_source
    options = ("--std=c++17", "-DENABLE_BF16") if precision == "bf16" else ("--std=c++17",)
    mod = emulator.RawModule(code=kernel_source("adamw"), options=options)
    rng = np.random.default_rng(9)
    # (rows, part, row stride in the parameters, decay): the pieces start at rank 1's offset within each row
    tensors = [(2, 1100, 2200, 1), (1, 300, 600, 0), (3, 64, 128, 1)]
    n = sum(rows * stride for rows, _, stride, _ in tensors)
    state = sum(rows * part for rows, part, _, _ in tensors)
    x = rng.standard_normal(n).astype(np.float32)
    params = x if precision == "fp32" else (x.view(np.uint32) >> 16).astype(np.uint16)
    grads_f = rng.standard_normal(n).astype(np.float32)
    grads = grads_f if precision == "fp32" else (grads_f.view(np.uint32) >> 16).astype(np.uint16)
    master = rng.standard_normal(state).astype(np.float32)
    m = (0.1 * rng.standard_normal(state)).astype(np.float32)
    v = np.abs(0.1 * rng.standard_normal(state)).astype(np.float32)
    seeds = np.array([101, 202, 303], np.uint32)
    scalars = (1e-2, 0.9, 0.95, 0.19, 0.0975, 1e-8)    # lr, beta1, beta2, their corrections at t = 2, eps
    wd, scale = 0.1, 0.8

    ref = [a.copy() for a in (params, master, m, v)]
    table = np.zeros((4, 8), np.int64)
    table[:, 0] = np.iinfo(np.int64).max
    first = w = s = 0
    for t, (rows, part, stride, decay) in enumerate(tensors):
        per_row = ceil_div(part, 512)
        table[t, :7] = (first, per_row, part, w + part, stride, s, decay)   # rank 1's half of each row
        run_launches(mod, recorded_launches(lambda cu: cu.adamw_update(
            ref[0][w + part:], ref[1][s:], grads[w + part:], ref[2][s:], ref[3][s:], part, stride, rows, *scalars,
            wd if decay else 0.0, scale, seeds[t])))
        first, w, s = first + per_row * rows, w + rows * stride, s + rows * part
    got = [a.copy() for a in (params, master, m, v)]
    launches = recorded_launches(lambda cu: cu.adamw_multi_tensor(
        got[0], got[1], grads, got[2], got[3], table.reshape(-1), 4, first, seeds, *scalars, wd, scale))
    assert [lc.kernel for lc in launches] == ["adamw_multi_tensor_kernel"]
    run_launches(mod, launches, order=order, racecheck=True)
    for name, a, b in zip(("params", "master", "m", "v"), got, ref):
        assert a.tobytes() == b.tobytes(), name
    assert got[0].tobytes() != params.tobytes() and got[1].tobytes() != master.tobytes()
