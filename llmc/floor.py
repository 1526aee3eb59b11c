"""The floor of a CPU training step: the least time this machine could take for the work the step does.

A step is matrix products and memory traffic. The products cannot beat the BLAS's own sgemm on their shapes;
everything else (the elementwise and row-wise layers, AdamW, zeroing the gradients) streams arrays through
memory and cannot beat the machine's memory bandwidth. So

    floor = sum over the products of (their time at the measured sgemm rate)
          + (the bytes every other layer, AdamW and the zeroing must read and write) / (measured bandwidth)

Bytes are counted as STREAM counts them: an array read once is its size, an array written once its size,
an array a layer adds into (`+=`) twice its size; write-allocate reads are not counted. Arrays that stay in
the cache can beat the floor (a tiny model's AdamW does); a d12 step's 0.5 GB arrays cannot. dev/bench_cpu.py writes the bytes of each layer as a
formula in B, T, C, ...; here they are counted from the arrays a call is given (call_bytes), which is what
--profile 1 (llmc/profiler.py) uses, and what the formulas are tested against.

  ACCESS              how each layer touches its array arguments
  call_bytes          the bytes one call of a layer or optimizer phase moves
  call_products       the matrix products (M, K, N) one matmul call does
  memory_bandwidth    NumPy copy and triad on the trainer's threads, in bytes/s
  product_times       the best times of one product at NumPy's sgemm, OpenBLAS threaded and on one thread
  product_seconds     the floor of one product: the faster of the two (one thread's time / the threads)
  phase_of            which phase of the floor a profiled function belongs to
"""

import math
import time

import numpy as np

from llmc import cpu

# For each layer function, one letter per argument, in order:
#   r  read whole            w  written whole          a  added into (+=): read and written
#   g  read, only the rows that the int array (the token ids) picks     G  the same, added into
#   t  read, only the first T rows (wpe[:T])                            P  added into, the first T rows
#   e  read, one element per token id (probs[b, t, target])             .  not an array, or not counted
# The matmul layers are not here: they are products, timed at the sgemm rate (their bias add rides on the
# product's output while it is in cache; the bias gradient's one read of dout costs well under 1% of the product).
ACCESS = {
    "encoder_forward": "wrgt",                  # out, inp, wte, wpe
    "encoder_backward": "GPrr",                 # dwte, dwpe, dout, inp
    "layernorm_forward": "wwwrrr",              # out, mean, rstd, inp, weight, bias
    "layernorm_backward": "aaarrrrr",           # dinp, dweight, dbias, dout, inp, weight, mean, rstd
    "attention_forward": "wwwr",                # out, preatt, att, inp
    "attention_backward": "aaarrr",             # dinp, dpreatt, datt, dout, inp, att
    "gelu_forward": "wr",                       # out, inp
    "gelu_backward": "arr",                     # dinp, inp, dout
    "residual_forward": "wrr",                  # out, inp1, inp2
    "residual_backward": "aar",                 # dinp1, dinp2, dout
    "softmax_forward": "wr",                    # probs, logits
    "crossentropy_forward": "wer",              # losses, probs, targets
    "crossentropy_softmax_backward": "arrr",    # dlogits, dlosses, probs, targets
}
TIMES = {"r": 1, "w": 1, "a": 2, "g": 1, "G": 2, "t": 1, "P": 2, "e": 1, ".": 0}
ADAMW_ARRAYS = 7       # AdamW reads p, g, m, v and writes p, m, v: 7 floats per parameter
PRODUCTS = ("matmul_forward", "matmul_backward")


def call_bytes(name, args, kwargs=None):
    """The bytes one call of `name` with these arguments reads and writes: a layer of ACCESS, or one of
    the optimizer phases (optimizer_bytes); 0 for anything else. Counted before the call runs."""
    if name.startswith("gpt2_"):
        return optimizer_bytes(name, args, kwargs or {})
    access = ACCESS.get(name)
    if access is None:
        return 0
    ids = next((x for x in args if isinstance(x, np.ndarray) and x.dtype.kind in "iu"), None)   # the token ids
    T = args[-2] if name.startswith("encoder") else None                 # (..., B, T, C)
    total = 0
    for letter, x in zip(access, args):
        if not isinstance(x, np.ndarray):
            continue
        row = x.nbytes // max(1, x.shape[0])
        size = (ids.size * row if letter in "gG" else T * row if letter in "tP"
                else ids.size * x.itemsize if letter == "e" else x.nbytes)
        total += TIMES[letter] * size
    return total


def optimizer_bytes(name, args, kwargs):
    """The bytes of gpt2_zero_grad(model), gpt2_update(model, ..., shard=None) and
    gpt2_calculate_grad_norm(model) over the model's flat float32 arrays: zeroing writes every gradient
    (nothing when the last update already did: model.zeroed_grads); AdamW reads p, g, m, v and writes
    p, m, v of every parameter it moves (a ZeRO-1 rank: its shard), and zeroes the gradients in the same
    pass when it moves them all; the norm reads every gradient once."""
    model = args[0]
    n = getattr(model, "num_parameters", 0)
    if name == "gpt2_update":
        shard = kwargs.get("shard", args[8] if len(args) > 8 else None)
        return 4 * ADAMW_ARRAYS * (n if shard is None else shard.num_state) + (4 * n if shard is None else 0)
    if getattr(model, "grads_memory", None) is None:
        return 0
    if name == "gpt2_zero_grad":
        return 0 if getattr(model, "zeroed_grads", None) is model.grads_memory else 4 * n
    return 4 * n if name == "gpt2_calculate_grad_norm" else 0


def call_products(name, args):
    """[(M, K, N, b transposed)] of one matmul call (out (M, N) = a (M, K) @ b (K, N)), [] for other layers:
    the forward inp @ weight^T; the backward dinp = dout @ weight and dweight = dout^T @ inp."""
    if name not in PRODUCTS:
        return []
    B, T, C, OC = args[-4:]
    if name == "matmul_forward":
        return [(B * T, C, OC, True)]
    return [(B * T, OC, C, False), (OC, B * T, C, False)]


def phase_of(name):
    """The floor's phase of a profiled function: products, AdamW, zeroing, the rest."""
    if name.startswith("matmul"):
        return "products"
    return {"gpt2_update": "AdamW", "gpt2_zero_grad": "zeroing"}.get(name, "the rest")


PHASES = ("products", "AdamW", "zeroing", "the rest")


# ----------------------------------------------------------------------------
# measuring the machine

def best_of(fn, repeats):
    """The fastest of `repeats` timed calls of fn() (after one untimed call that pages everything in)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memory_bandwidth(floats=1 << 24, repeats=5):
    """(copy, triad) bandwidth in bytes/s, STREAM-counted, on cpu.NUM_THREADS threads sharing the arrays
    as the trainer's layers do: copy b -> a (2 arrays' bytes); triad a = b + s * c (3 arrays' bytes),
    computed over cache-sized chunks so each chunk goes through memory once. 64 MiB arrays: twice the
    largest last-level caches of the machines we run on, so the arrays do not stay in cache."""
    a, b, c = (np.full(floats, 1.0 + i, np.float32) for i in range(3))

    def copy():
        cpu.in_chunks(np.copyto, (a, b), 1 << 20)

    def triad_chunk(x, y, z):
        np.multiply(z, 3.0, out=x)
        x += y

    def triad():
        cpu.in_chunks(triad_chunk, (a, b, c), 1 << 17)

    return 2 * a.nbytes / best_of(copy, repeats), 3 * a.nbytes / best_of(triad, repeats)


def product_times(M, K, N, b_transposed, repeats=3):
    """(threaded, one thread): the best times of out (M, N) = a (M, K) @ b (K, N) at NumPy's sgemm with
    OpenBLAS on cpu.NUM_THREADS threads and on one (inf when NUM_THREADS is 1). b (K, N) is read
    transposed where the trainer's is (a weight stored (OC, C)). Leaves OpenBLAS on one thread, as the
    thread pool wants it."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((N, K) if b_transposed else (K, N), dtype=np.float32)
    b = b.T if b_transposed else b
    out = np.empty((M, N), dtype=np.float32)
    n = cpu.NUM_THREADS
    try:
        cpu.set_blas_threads(n)
        threaded = best_of(lambda: np.matmul(a, b, out=out), repeats)
        cpu.set_blas_threads(1)
        single = best_of(lambda: np.matmul(a, b, out=out), repeats) if n > 1 else math.inf
    finally:
        cpu.set_blas_threads(1)
    return threaded, single


def product_seconds(M, K, N, b_transposed, repeats=3):
    """The floor of one product: the faster of OpenBLAS threaded and one thread's time / NUM_THREADS
    (perfect scaling, which OpenBLAS's own threading misses on skinny shapes and on a busy machine),
    an upper bound on what the BLAS gives."""
    threaded, single = product_times(M, K, N, b_transposed, repeats)
    return min(threaded, single / cpu.NUM_THREADS)


def floor_line(bandwidth, gflops):
    """One line naming what the floor assumes."""
    return (f"this machine: memory {bandwidth / 1e9:.1f} GB/s (the better of NumPy copy and triad on "
            f"{cpu.NUM_THREADS} threads), products at NumPy's sgemm on their own shapes ({gflops:.1f} GFLOP/s)")
