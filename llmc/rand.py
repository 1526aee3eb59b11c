"""Random numbers as llm.c's llmc/rand.h makes them, which is how PyTorch's CPU generator makes them.

A Mersenne Twister (MT19937) seeded with init_genrand, as llm.c and torch.manual_seed seed it. The
data loader shuffles with it (seed 42 + rank) and from-scratch weights are drawn from it (seed 42)
in PyTorch's order and with PyTorch's Box-Muller, so `-e d12` starts where PyTorch's from-scratch
GPT-2 starts.
"""

import math

import numpy as np

MASK32 = 0xFFFFFFFF

# llm.c's mt19937_state struct as it lies in memory (x86-64, little-endian), which is how a
# checkpoint's state file stores the loader's generator: seed_ (u64, never set by llm.c's
# manual_seed; we write the seed), left_ (int), next_ (uint), state_[624], MATRIX_A[2] = {0, 0x9908b0df}.
# 8 + 4 + 4 + 2496 + 8 = 2520 bytes, a multiple of the struct's 8-byte alignment: no padding.
MT_STATE_DTYPE = np.dtype([("seed", "<u8"), ("left", "<i4"), ("next", "<u4"), ("state", "<u4", (624,)),
                           ("matrix_a", "<u4", (2,))])
assert MT_STATE_DTYPE.itemsize == 2520


class MT19937:
    N, M = 624, 397
    MATRIX_A = 0x9908B0DF

    def __init__(self, seed):
        self.seed = seed
        s = [seed & MASK32]
        for j in range(1, self.N):
            s.append((1812433253 * (s[j - 1] ^ (s[j - 1] >> 30)) + j) & MASK32)
        self.state, self.left, self.next = s, 1, 0

    def state_bytes(self):
        """The generator as llm.c's mt19937_state struct: MT_STATE_DTYPE, 2520 bytes."""
        out = np.zeros(1, dtype=MT_STATE_DTYPE)
        out["seed"], out["left"], out["next"] = self.seed, self.left, self.next
        out["state"][0] = self.state
        out["matrix_a"][0] = (0, self.MATRIX_A)
        return out.tobytes()

    @classmethod
    def from_state_bytes(cls, data):
        """The generator that state_bytes wrote (or llm.c's fwrite of its struct), ready to go on.
        Raises ValueError when the bytes are not such a struct."""
        if len(data) != MT_STATE_DTYPE.itemsize:
            raise ValueError(f"{len(data)} bytes, not the {MT_STATE_DTYPE.itemsize} of an mt19937_state")
        st = np.frombuffer(data, dtype=MT_STATE_DTYPE)[0]
        if tuple(st["matrix_a"]) != (0, cls.MATRIX_A) or not 1 <= st["left"] <= cls.N or st["next"] > cls.N:
            raise ValueError("not an mt19937_state (MATRIX_A, left_ or next_ out of place)")
        rng = cls.__new__(cls)
        rng.seed, rng.left, rng.next = int(st["seed"]), int(st["left"]), int(st["next"])
        rng.state = [int(x) for x in st["state"]]
        return rng

    def _twist(self):
        s, N, M = self.state, self.N, self.M
        for j in range(N):
            y = (s[j] & 0x80000000) | (s[(j + 1) % N] & 0x7FFFFFFF)
            s[j] = s[(j + M) % N] ^ (y >> 1) ^ (self.MATRIX_A if y & 1 else 0)
        self.left, self.next = N, 0

    def randint32(self):
        self.left -= 1
        if self.left <= 0:
            self._twist()
        y = self.state[self.next]
        self.next += 1
        y ^= y >> 11                                 # tempering
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        y ^= y >> 18
        return y


def random_permutation(data, rng):
    """Fisher-Yates in place, as llm.c: j = randint32 % (i + 1) for i = n-1 down to 1."""
    for i in range(len(data) - 1, 0, -1):
        j = rng.randint32() % (i + 1)
        data[i], data[j] = data[j], data[i]


def normal_(out, std, rng, chunk=1 << 20):
    """Fill `out` (float32, at least 16 elements) with N(0, std^2) as torch.normal_ does on the CPU:
    first one uniform u = (x & 0xFFFFFF) / 2^24 per element, then per block of 16 a Box-Muller on
    the pairs (u[i], u[i+8]); when the size is no multiple of 16, the last 16 are redrawn.
    `rng` is NumPy's legacy RandomState(seed): it is init_genrand MT19937, and its randint over
    the full uint32 range returns the raw 32-bit outputs (tests/test_dataloader.py checks both
    against MT19937 above). It is used here only because 124M draws in pure Python are too slow."""
    flat = out.reshape(-1)
    n = flat.size
    assert n >= 16, "torch draws tensors of fewer than 16 elements differently"

    def box_muller(dst, count):
        u = (rng.randint(0, 1 << 32, size=count, dtype=np.uint32) & np.uint32(0xFFFFFF)).astype(np.float32)
        u *= np.float32(1.0 / (1 << 24))
        blocks = u.reshape(-1, 2, 8)                             # (count/16, 2, 8): u1 | u2 halves
        radius = np.sqrt(np.float32(-2) * np.log(np.float32(1) - blocks[:, 0] + np.float32(1e-12)))
        theta = np.float32(2 * math.pi) * blocks[:, 1]
        pairs = dst.reshape(-1, 2, 8)
        pairs[:, 0] = radius * np.cos(theta) * np.float32(std)
        pairs[:, 1] = radius * np.sin(theta) * np.float32(std)

    whole = n // 16 * 16
    for start in range(0, whole, chunk):                         # chunk is a multiple of 16
        stop = min(start + chunk, whole)
        box_muller(flat[start:stop], stop - start)
    if n % 16:
        rng.randint(0, 1 << 32, size=n - whole, dtype=np.uint32)  # the leftover uniforms, unused
        box_muller(flat[n - 16:], 16)
