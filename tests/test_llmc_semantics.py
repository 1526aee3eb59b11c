"""Our checkpoints read as llm.c reads them, by tests/llmc_state.py (written from llm.c's train_gpt2.cu and
llmc/zero.cuh, not from llmc/checkpoint.py): every rank's m, v and master weights belong to the parameters
llm.c's gpt2_update would pair them with; a 2-rank state written by that reader's writer resumes our runs
bit for bit; -nk as llm.c's rule would keep checkpoints, and where ours differs.

The runs: TINY (test_data_parallel.py), one update (-x 1 -n 1) unless said. After one update m = (1-beta1) g
and v = (1-beta2) g^2 of the same (clipped, averaged) gradient g, so m^2 / v = (1-beta1)^2 / (1-beta2) pairs
m with v; ZeRO-0 keeps m at the parameter's own index (llm.c: opt_state_offset = the tensor's offset), so a
ZeRO-1 state gathered by llm.c's layout must give the ZeRO-0 run's m (bit for bit over 2 ranks: the same
sums a + b); master weights pair with the model file's parameters (fp32: equal; bf16: the parameter is the
master weight stochastically rounded, one of its two bf16 neighbours).
"""

import os
import shutil

import numpy as np
import pytest

import llmc_state as llmc
import test_data_parallel as dp
import test_data_parallel_cuda as dpc
from test_data_parallel import BASE, needs_gloo, steps, workdir  # noqa: F401 (fixture)

BETAS = {"numpy": (0.9, 0.999), "cuda": (0.9, 0.95)}   # train_gpt2.c's and train_gpt2.cu's (BETA1, BETA2)
ONE_STEP = [*BASE[:BASE.index("-x")], "-x", "1", *BASE[BASE.index("-x") + 2:], "-n", "1"]


def llmc_states(out, step, nproc, zero):
    """Every rank's state in `out` at `step`, read per load_state, with the model file's sizes."""
    header, params = llmc.read_model(os.path.join(out, f"model_{step:08d}.bin"))
    sizes, L = llmc.model_sizes(header)
    N = max(nproc, 1)
    n_state = llmc.state_size(sizes, N, zero)
    states = [llmc.read_state(os.path.join(out, f"state_{step:08d}_{r:05d}.bin"), n_state) for r in range(N)]
    for r, st in enumerate(states):
        assert (st["num_processes"], st["rank"], st["step"]) == (N, r, step)
    return header, params, sizes, L, states


def whole(states, sizes, L, zero, field):
    values, count = llmc.gather_ranks(states, sizes, L, zero, field)
    assert (count == 1).all()                             # every parameter from exactly one rank
    return values


def check_m_pairs_with_v(m, v, trainer):
    beta1, beta2 = BETAS[trainer]
    g = np.abs(m) > 1e-6
    assert g.mean() > 0.5
    np.testing.assert_allclose(m[g] ** 2 / v[g], (1 - beta1) ** 2 / (1 - beta2), rtol=1e-3)


def check_master_pairs_with_params(master, params, version):
    if version == 3:                                      # fp32: llm.c's master weights are the parameters
        assert np.array_equal(master, params)
        return
    low = master.view(np.uint32) >> np.uint32(16)         # the bf16 truncation of the master weight
    bits = params.view(np.uint32) >> np.uint32(16)
    assert ((bits == low) | (bits == low + 1)).all()      # it, or the next bf16 away from zero
    assert (bits == low + 1).mean() > 0.2                 # (some rounded up: the check sees the pairing)


def run_numpy(workdir, name, nproc, *extra):
    steps(dp.launch(workdir, nproc, *ONE_STEP, *extra, "-o", name))
    return str(workdir / name)


def run_cuda(workdir, name, nproc, precision, *extra):
    steps(dpc.launch(workdir, nproc, *ONE_STEP, "-p", precision, *extra, "-o", name))
    return str(workdir / name)


def test_slots_give_each_rank_each_parameter_once():
    sizes = llmc.param_sizes(32, 101, 128, 2, 2, 32)
    total = sum(sizes)
    for N, zero in ((1, 0), (2, 0), (2, 1), (4, 1)):
        seen = np.zeros(total, np.int32)
        for rank in range(N):
            p, s = llmc.slots(sizes, 2, rank, N, zero)
            assert np.array_equal(np.sort(s), np.arange(llmc.state_size(sizes, N, zero)))   # compact
            seen[p] += 1
        assert (seen == (N if zero == 0 else 1)).all()
    p, s = llmc.slots(sizes, 2, 1, 2, 1)                  # rank 1's first piece: wte's second half
    assert (p[0], s[0]) == (128 * 32 // 2, 0)
    ln1w = sum(sizes[:2])                                 # ln1w: layer 0's second half, then layer 1's
    at = sizes[0] // 2 + sizes[1] // 2
    assert list(p[at:at + 2]) == [ln1w + 16, ln1w + 17] and list(p[at + 16:at + 18]) == [ln1w + 48, ln1w + 49]


@needs_gloo
def test_numpy_trainer_states_read_by_llmc(workdir):
    runs = {(n, z): run_numpy(workdir, f"np_{n}_{z}", n, "-z", z) for n, z in ((0, 0), (2, 0), (2, 1))}
    got = {}
    for (n, z), out in runs.items():
        _, params, sizes, L, states = llmc_states(out, 1, n, z)
        assert all(st["use_master_weights"] == 0 for st in states)   # the NumPy trainer keeps none
        got[n, z] = whole(states, sizes, L, z, "m"), whole(states, sizes, L, z, "v")
        check_m_pairs_with_v(*got[n, z], "numpy")
    assert np.array_equal(got[2, 1][0], got[2, 0][0]) and np.array_equal(got[2, 1][1], got[2, 0][1])
    np.testing.assert_allclose(got[0, 0][0], got[2, 0][0], rtol=1e-3, atol=1e-7)   # 1 vs 2 ranks: sum order


@needs_gloo
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_cuda_trainer_states_read_by_llmc(workdir, precision):
    version = 5 if precision == "bf16" else 3
    got = {}
    for n, z, w in ((2, 1, 1), (2, 1, 0), (2, 0, 1), (0, 0, 0)):
        out = run_cuda(workdir, f"cu_{precision}_{n}_{z}_{w}", n, precision, "-z", z, "-w", w)
        header, params, sizes, L, states = llmc_states(out, 1, n, z)
        assert header[1] == version
        assert all(st["use_master_weights"] == w for st in states)
        m, v = whole(states, sizes, L, z, "m"), whole(states, sizes, L, z, "v")
        check_m_pairs_with_v(m, v, "cuda")
        if w:
            check_master_pairs_with_params(whole(states, sizes, L, z, "master"), params, version)
        got[n, z, w] = m
        if (n, z, w) == (2, 1, 1):
            contiguous = np.concatenate([st["m"] for st in states])   # rank r's state as the r-th 1/N of all
    for w in (1, 0):                                      # ZeRO-1 by llm.c's layout = ZeRO-0's own index
        check_same_gradients(got[2, 1, w], got[2, 0, 1], sizes)
    with pytest.raises(AssertionError):                   # the check tells llm.c's layout from a contiguous split
        check_same_gradients(contiguous, got[2, 0, 1], sizes)
    close = np.isclose(got[0, 0, 0], got[2, 0, 1], rtol=0.02, atol=1e-6)   # bf16 gradients summed in another order
    assert close.mean() > 0.99


def check_same_gradients(m1, m0, sizes):
    """The CUDA trainer's ZeRO-1 and ZeRO-0 m after one update: the same gradients, but the clipping's scale
    differs a little (its norm sums the ranks' shards; and in bf16 wte's and wpe's gradients are rounded
    stochastically with each rank's seed under ZeRO-1, rank 0's under ZeRO-0): inside the blocks one common
    ratio to 1e-5, wte and wpe within 2% (a bf16 step)."""
    outside = sizes[0] + sizes[1]
    inner, inner0 = m1[outside:], m0[outside:]
    g = np.abs(inner0) > 1e-6
    scale = np.median(inner[g] / inner0[g])
    assert abs(scale - 1) < 1e-3
    np.testing.assert_allclose(inner, scale * inner0, rtol=1e-5, atol=1e-9)
    assert np.isclose(m1[:outside], m0[:outside], rtol=0.02, atol=1e-6).mean() > 0.99


# ---- a state llm.c's layout writes, resumed by our trainers

def rewrite_as_llmc(src, dst, step, nproc, zero):
    """dst: src's checkpoint `step` with every rank's state rebuilt by llm.c's layout from the whole m, v and
    master vectors (save_state's fields only: our schedule slots stay 0, as in llm.c's own files)."""
    header, params, sizes, L, states = llmc_states(src, step, nproc, zero)
    os.makedirs(dst)
    shutil.copy(os.path.join(src, f"model_{step:08d}.bin"), dst)
    fields = ["m", "v"] + (["master"] if states[0]["master"] is not None else [])
    vectors = {f: whole(states, sizes, L, zero, f) for f in fields}
    for rank, st in enumerate(states):
        new = dict(st)
        for f in fields:
            new[f] = llmc.scatter_ranks(vectors[f], sizes, L, rank, nproc, zero)
        path = os.path.join(dst, f"state_{step:08d}_{rank:05d}.bin")
        llmc.write_state(path, new)
        with open(path, "rb") as a, open(os.path.join(src, os.path.basename(path)), "rb") as b:
            mine, ours = a.read(), b.read()
        assert mine[:64 * 4] == ours[:64 * 4] and mine[256 * 4:] == ours[256 * 4:]   # llm.c's fields: the same
    open(os.path.join(dst, f"DONE_{step:08d}"), "w").close()


@needs_gloo
@pytest.mark.parametrize("trainer", ["numpy", "cuda_bf16"])
def test_two_rank_zero1_state_written_by_llmc_layout_resumes_bit_exactly(workdir, trainer):
    launch = dp.launch if trainer == "numpy" else dpc.launch
    extra = [] if trainer == "numpy" else ["-p", "bf16"]
    flags = [*BASE[:BASE.index("-x")], "-x", "6", *BASE[BASE.index("-x") + 2:], *extra, "-z", "1", "-n", "3"]
    straight = steps(launch(workdir, 2, *flags, "-o", f"{trainer}_straight"))
    src, dst = str(workdir / f"{trainer}_straight"), str(workdir / f"{trainer}_llmc")
    rewrite_as_llmc(src, dst, 3, 2, 1)
    resumed = steps(launch(workdir, 2, *flags, "-o", f"{trainer}_llmc", "-y", "1"))
    assert resumed == straight[3:]                        # steps 4..6: the same losses and norms, bit for bit
    a = llmc.read_model(os.path.join(src, "model_00000006.bin"))[1]
    b = llmc.read_model(os.path.join(dst, "model_00000006.bin"))[1]
    assert np.array_equal(a, b)


# ---- -nk

def llmc_kept(max_steps, every, keep, major=0):
    """The checkpoints llm.c's main loop leaves: written at every `every`-th step and at the last; after each
    write it deletes only step - keep * every (if > 0 and not a major one)."""
    kept = set()
    for step in range(max_steps + 1):
        if (step > 0 and step % every == 0) or step == max_steps:
            kept.add(step)
            delete = step - keep * every
            if keep > 0 and delete > 0 and (major == 0 or delete % major != 0):
                kept.discard(delete)
    return sorted(kept)


def test_nk_keeps_the_newest_k_where_llmc_deletes_nk_times_n_steps_back(workdir):
    assert llmc_kept(8, 3, 1) == [6, 8]                   # llm.c: step 8 deletes 5, which never existed
    flags = [*BASE[:BASE.index("-x")], "-x", "8", *BASE[BASE.index("-x") + 2:], "-n", "3", "-nk", "1"]
    steps(dp.launch(workdir, 0, *flags, "-o", "nk"))
    done = sorted(int(f[5:]) for f in os.listdir(workdir / "nk") if f.startswith("DONE_"))
    assert done == [8]                                    # ours: the newest one
    assert llmc_kept(9, 3, 1) == [9] and llmc_kept(9, 3, 2) == [6, 9]   # where the last step is a multiple of
    #                                                       -n, the two rules keep the same checkpoints
