"""The sampler, llm.c's llmc/sampler.h: a xorshift generator and sampling from the probabilities.

The generator state is a one-element list holding a uint64, so the functions can advance it.
"""

import numpy as np

MASK64 = (1 << 64) - 1


def random_u32(state):
    """xorshift*: state = [uint64], advanced in place; returns a uint32."""
    x = state[0]
    x ^= x >> 12
    x ^= (x << 25) & MASK64
    x ^= x >> 27
    state[0] = x
    return ((x * 0x2545F4914F6CDD1D) & MASK64) >> 32


def random_f32(state):
    """A float32 uniform in [0, 1) from the top 24 bits of random_u32."""
    return np.float32((random_u32(state) >> 8) / 16777216.0)


def sample_mult(probabilities, coin):
    """Index of the first float32 running sum of `probabilities` that exceeds coin (in [0, 1));
    the last index if rounding leaves the total below the coin."""
    cdf = np.cumsum(probabilities, dtype=np.float32)     # sequential float32 sums, as the C loop
    i = int(np.searchsorted(cdf, np.float32(coin), side="right"))
    return min(i, len(probabilities) - 1)
