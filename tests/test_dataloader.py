"""The data loader (llm.c's dataloader.h), its Mersenne Twister, the tokenizer and the sampler.

Reference values come from outside this code: rand.h's documented outputs for seed 137, the
C++ std::mt19937(42) stream, NumPy's legacy RandomState (init_genrand MT19937), and a small C
program (MT19937 + llm.c's Fisher-Yates + xorshift) whose printed outputs are pasted below."""

import numpy as np
import pytest

from llmc import dataloader, formats, rand, sampler, tokenizer, utils

# --- the random number generators ------------------------------------------------------------

def test_mt19937_known_outputs():
    r = rand.MT19937(137)           # rand.h's header comment (= torch.manual_seed(137) + randint)
    assert [r.randint32() for _ in range(5)] == [4053805790, 2173880614, 380293709, 1237255315, 2986595568]
    r = rand.MT19937(42)            # std::mt19937(42)
    assert [r.randint32() for _ in range(5)] == [1608637542, 3421126067, 4083286876, 787846414, 3143890026]
    for _ in range(995):
        r.randint32()
    assert r.randint32() == 2998581749        # the 1001st output, across the first twists (C reference)


def test_mt19937_equals_numpy_legacy_stream():
    """normal_ draws its bulk uniforms from RandomState(seed): check it is this very generator."""
    ours = rand.MT19937(42 + 1)
    raw = np.random.RandomState(43).randint(0, 1 << 32, size=1500, dtype=np.uint32)
    assert [ours.randint32() for _ in range(1500)] == raw.tolist()


def test_random_permutation_matches_c():
    d = list(range(10))
    rand.random_permutation(d, rand.MT19937(42))
    assert d == [1, 3, 9, 7, 6, 0, 8, 4, 5, 2]


def test_xorshift_sampler_matches_c():
    state = [1337]
    assert [sampler.random_u32(state) for _ in range(4)] == [989205090, 818269915, 1335155955, 3876892996]
    coins = [sampler.random_f32(state) for _ in range(3)]
    assert all(c.dtype == np.float32 for c in coins)
    np.testing.assert_array_equal(coins, np.array([0.684917867, 0.307830393, 0.285618961], dtype=np.float32))


def test_sample_mult():
    p = np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)
    assert sampler.sample_mult(p, 0.0) == 0
    assert sampler.sample_mult(p, 0.09) == 0
    assert sampler.sample_mult(p, 0.1) == 1          # coin < cdf is strict: 0.1 is not below 0.1
    assert sampler.sample_mult(p, 0.59) == 2
    assert sampler.sample_mult(p, 0.99) == 3
    short = np.array([0.2, 0.2], dtype=np.float32)
    assert sampler.sample_mult(short, 0.9) == 1      # rounding leaves the total below the coin: last index


# --- the data loader --------------------------------------------------------------------------

def shard(path, tokens):
    formats.write_data_shard(str(path), np.asarray(tokens) % 65536)
    return str(path)


def test_sequential_walks_shards_and_wraps(tmp_path):
    shard(tmp_path / "d_000.bin", np.arange(0, 100))
    shard(tmp_path / "d_001.bin", np.arange(1000, 1060))
    B, T = 2, 5
    loader = dataloader.DataLoader(str(tmp_path / "d_*.bin"), B, T)
    assert loader.num_tokens == 160
    starts = []
    for _ in range(9 + 5 + 2):                 # (100-1)//10 = 9 samples, then (60-1)//10 = 5, then wrap
        x, y = loader.next_batch()
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == np.int32
        np.testing.assert_array_equal(y.ravel(), x.ravel() + 1)  # targets are the inputs shifted by one
        np.testing.assert_array_equal(x.ravel(), x.ravel()[0] + np.arange(10))
        starts.append(int(x[0, 0]))
    assert starts == [0, 10, 20, 30, 40, 50, 60, 70, 80, 1000, 1010, 1020, 1030, 1040, 0, 10]
    loader.reset()
    assert loader.next_batch()[0][0, 0] == 0


def test_sequential_two_processes(tmp_path):
    shard(tmp_path / "d.bin", np.arange(0, 200))
    r0 = dataloader.DataLoader(str(tmp_path / "d.bin"), 2, 5, process_rank=0, num_processes=2)
    r1 = dataloader.DataLoader(str(tmp_path / "d.bin"), 2, 5, process_rank=1, num_processes=2)
    assert [int(r0.next_batch()[0][0, 0]) for _ in range(3)] == [0, 20, 40]
    assert [int(r1.next_batch()[0][0, 0]) for _ in range(3)] == [10, 30, 50]


def test_shuffled_matches_c_reference(tmp_path):
    shard(tmp_path / "d_000.bin", np.arange(0, 100))
    shard(tmp_path / "d_001.bin", np.arange(1000, 1100))
    loader = dataloader.DataLoader(str(tmp_path / "d_*.bin"), 2, 5, should_shuffle=True)
    first = [int(loader.next_batch()[0][0, 0]) for _ in range(9)]
    # C reference (seed 42): shard order [1, 0], then shard 1's samples in order 1 3 2 7 6 0 8 4 5
    assert first == [1000 + 10 * i for i in (1, 3, 2, 7, 6, 0, 8, 4, 5)]
    second = [int(loader.next_batch()[0][0, 0]) for _ in range(9)]
    assert sorted(second) == list(range(0, 90, 10))          # then all of shard 0, once each
    again = dataloader.DataLoader(str(tmp_path / "d_*.bin"), 2, 5, should_shuffle=True)
    assert [int(again.next_batch()[0][0, 0]) for _ in range(18)] == first + second   # deterministic
    # two processes: each sample is 20 tokens wide; rank r reads 10 of them at offset 10*r and
    # shuffles with its own generator, seeded 42 + r
    ranks = [dataloader.DataLoader(str(tmp_path / "d_*.bin"), 2, 5, process_rank=r, num_processes=2, should_shuffle=True)
             for r in (0, 1)]
    orders = [[int(ld.next_batch()[0][0, 0]) for _ in range(8)] for ld in ranks]
    assert all(v % 20 == 0 for v in orders[0]) and all(v % 20 == 10 for v in orders[1])
    assert [v - 10 for v in orders[1]] != orders[0]
    with pytest.raises(utils.ConfigError, match="process_rank 2 must be below num_processes 2"):
        dataloader.DataLoader(str(tmp_path / "d_*.bin"), 2, 5, process_rank=2, num_processes=2)


def test_shuffled_epoch_covers_everything_then_reshuffles(tmp_path):
    for i in range(3):
        shard(tmp_path / f"d_{i:03d}.bin", np.arange(1000 * i, 1000 * i + 61))
    loader = dataloader.DataLoader(str(tmp_path / "d_*.bin"), 2, 5, should_shuffle=True)
    epoch1 = [int(loader.next_batch()[0][0, 0]) for _ in range(18)]
    epoch2 = [int(loader.next_batch()[0][0, 0]) for _ in range(18)]
    everything = sorted(1000 * i + 10 * s for i in range(3) for s in range(6))
    assert sorted(epoch1) == sorted(epoch2) == everything
    assert epoch1 != epoch2


def windows(paths, B, T, rank, nproc):
    """Every batch a loader may give, read from the files on their own: the uint16 tokens after the 1024-byte
    header (np.fromfile), sample s of a shard starting at token (s * nproc + rank) * B * T, B*T + 1 tokens."""
    out = []
    for path in paths:
        tokens = np.fromfile(path, dtype="<u2", offset=1024).astype(np.int32)
        for s in range((tokens.size - 1) // (nproc * B * T)):
            start = (s * nproc + rank) * B * T
            window = tokens[start:start + B * T + 1]
            out.append((window[:-1].reshape(B, T), window[1:].reshape(B, T)))
    return out


@pytest.mark.parametrize("nproc", [1, 2])
def test_whole_batches_equal_an_independent_reading_of_the_files(tmp_path, nproc):
    """Inputs and targets, every token of every batch: sequential batches are the windows in file order (then
    from the first again), a shuffled epoch is each window once. Random tokens over the whole uint16 range, so
    no batch matches another by chance; shard sizes that leave a ragged end."""
    rng = np.random.default_rng(11)
    paths = [shard(tmp_path / f"d_{i:03d}.bin", rng.integers(0, 65536, size=n)) for i, n in enumerate((150, 97, 203))]
    B, T = 3, 7
    for rank in range(nproc):
        want = windows(paths, B, T, rank, nproc)
        assert len(want) == sum((n - 1) // (nproc * B * T) for n in (150, 97, 203))
        loader = dataloader.DataLoader(str(tmp_path / "d_*.bin"), B, T, process_rank=rank, num_processes=nproc)
        for x_want, y_want in want + want[:3]:                   # one epoch, then it wraps to the start
            x, y = loader.next_batch()
            assert x.dtype == y.dtype == np.int32
            np.testing.assert_array_equal(x, x_want)
            np.testing.assert_array_equal(y, y_want)
        shuffled = dataloader.DataLoader(str(tmp_path / "d_*.bin"), B, T, process_rank=rank, num_processes=nproc,
                                         should_shuffle=True)
        got = [shuffled.next_batch() for _ in want]
        key = [(x.tobytes(), y.tobytes()) for x, y in got]
        assert sorted(key) == sorted((x.tobytes(), y.tobytes()) for x, y in want)   # each window once
        assert key != [(x.tobytes(), y.tobytes()) for x, y in want]                 # in another order


def test_errors(tmp_path):
    shard(tmp_path / "small.bin", np.arange(10))
    with pytest.raises(utils.ConfigError, match=r"small.bin: 10 tokens, fewer than the 11 one batch needs \(B=2, T=5\)"):
        dataloader.DataLoader(str(tmp_path / "small.bin"), 2, 5)
    shard(tmp_path / "exact.bin", np.arange(11))
    assert dataloader.DataLoader(str(tmp_path / "exact.bin"), 2, 5).next_batch()[1][-1, -1] == 10
    with pytest.raises(utils.ConfigError, match="no data files match"):
        dataloader.DataLoader(str(tmp_path / "nothing_*.bin"), 2, 5)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(np.zeros(300, np.int32).tobytes())
    with pytest.raises(utils.FormatError, match="bad magic 0"):
        dataloader.DataLoader(str(bad), 2, 5)


# --- the tokenizer ----------------------------------------------------------------------------

def test_tokenizer_decode(tmp_path, capsys):
    path = str(tmp_path / "tok.bin")
    formats.write_tokenizer_file(path, [b"Hello", b" w\xc3\xb6rld", b"\xc3", b"<|endoftext|>"], 3)
    tok = tokenizer.Tokenizer(path)
    assert tok.init_ok and tok.eot_token == 3
    assert tok.decode(0) == "Hello" and tok.decode(1) == " w\u00f6rld"
    assert tok.decode(2) == "\ufffd"                    # half a character on its own
    missing = tokenizer.Tokenizer(str(tmp_path / "nope.bin"))
    assert not missing.init_ok and "token ids" in capsys.readouterr().out
