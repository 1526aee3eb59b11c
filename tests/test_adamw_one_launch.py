"""gpt2_update's one launch (adamw_multi_tensor_kernel over a table of the tensors) against llm.c's
per-tensor launches (gpt2_update_per_tensor, adamw_kernel 16 times): the same bits in the parameters, the
master weights, m and v, for fp32 and bf16, with and without master weights, without ZeRO and for each rank
of a ZeRO-1 shard of 2, in the emulator's three thread orders under its race checker. And ZeRO-1's gradient
norm from device-side partial sums with one host read (gpt2_pieces_sum_squares) against the per-piece sums.
"""
import contextlib
import io
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import emulated_cuda_trainer  # noqa: E402
from llmc import formats  # noqa: E402
from llmc.collectives import ShardLayout  # noqa: E402
from test_cuda_trainer import CONFIG, random_params  # noqa: E402

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


CASES = [(p, w, rank, world) for p in ("fp32", "bf16") for w in (True, False) for rank, world in ((0, 1), (0, 2), (1, 2))]


@pytest.mark.parametrize("precision, master_weights, rank, world", CASES)
def test_one_launch_is_the_per_tensor_update_bit_for_bit(cu, precision, master_weights, rank, world):
    layout = ShardLayout(formats.param_shapes(CONFIG), rank, world) if world > 1 else None
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
        other = [(s, n) for s, n in ShardLayout(formats.param_shapes(CONFIG), 1 - rank, world).pieces_of(1 - rank)]
        for start, n in other:
            assert np.array_equal(np.asarray(one.params_memory)[start:start + n],
                                  np.asarray(before.params_memory)[start:start + n])


@pytest.mark.parametrize("order", ["forward", "reverse", "warps"])
@pytest.mark.parametrize("precision, master_weights, rank, world", [("bf16", True, 1, 2), ("bf16", False, 0, 1),
                                                                    ("fp32", False, 0, 2)])
def test_one_launch_has_no_race_in_any_order(cu, monkeypatch, order, precision, master_weights, rank, world):
    layout = ShardLayout(formats.param_shapes(CONFIG), rank, world) if world > 1 else None
    one, per_tensor = (with_gradients(cu, precision, master_weights, layout) for _ in range(2))
    cu.gpt2_update_per_tensor(per_tensor, 1e-2, cu.BETA1, cu.BETA2, cu.ADAM_EPS, 0.1, 1, shard=layout)
    monkeypatch.setenv("LLMC_EMULATOR_ORDER", order)
    monkeypatch.setenv("LLMC_EMULATOR_RACECHECK", "1")   # a race raises
    cu.gpt2_update(one, 1e-2, cu.BETA1, cu.BETA2, cu.ADAM_EPS, 0.1, 1, shard=layout)
    assert state_bytes(one) == state_bytes(per_tensor)


def test_one_launch_table(cu):
    """The table's blocks: each tensor's rows of ceil(part / 512) blocks end to end; 16 tensors, 16 rows."""
    model = with_gradients(cu, "fp32", False, None)
    layout = ShardLayout(formats.param_shapes(CONFIG), 1, 2)
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
    layout = ShardLayout(formats.param_shapes(CONFIG), rank, world)
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
