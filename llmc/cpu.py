"""CPU speed plumbing for train_gpt2.py: what makes the NumPy layers fast without changing their math.

train_gpt2.py's layers are whole-array NumPy formulas. This module is what runs them fast on a
multi-core CPU, kept out of the layers so that each reads as its math:

  keep_freed_memory   glibc keeps freed blocks for reuse, so a step's big temporaries are not
                      faulted in page by page every step
  openblas_library    NumPy's own OpenBLAS through ctypes, and its sgemm/dgemm (gemm_functions),
                      which write into views (a block of columns) where np.matmul cannot
  thread_pool         one pool of NUM_THREADS threads for everything; NumPy releases the GIL inside
  parallel_rows       its ufuncs and ctypes around the BLAS calls, so the threads run at once
  set_threads         another thread count (dev/bench_cpu.py --threads), clamped to the usable CPUs
  gemm, matmul        a matrix product as BLAS calls, one per thread on its block of the output
  row_blocks          the decorator that runs a layer over blocks of its rows in parallel
  in_chunks           an elementwise update (AdamW) over cache-sized chunks of flat arrays, in parallel
  scratch             a per-thread array an update writes its intermediates into (out=)
  zero                a big buffer zeroed by all the threads
  blas_info           which OpenBLAS kernels run, for the config block

OpenBLAS itself is set to one thread once the pool exists: its idle threads busy-wait for the next
call for a while and would take a core from every NumPy layer that follows a matmul.
"""

import ctypes
import functools
import glob
import inspect
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from types import SimpleNamespace

import numpy as np


def keep_freed_memory():
    """NumPy expressions make temporaries of megabytes (a (B, T, 4C) intermediate is 3 MiB, the
    wte gradient product 150 MiB). glibc hands such blocks back to the OS when they are freed and
    the next step faults them in again page by page, which costs more than the arithmetic (13 ms
    instead of 0.7 ms for GELU's backward). Asking it to keep freed memory for reuse removes that;
    the peak memory stays what it was. A no-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 256 << 20)    # blocks below 256 MiB come from the heap
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)      # and the heap is not trimmed below 1 GiB free
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------
# NumPy's OpenBLAS, called directly

@functools.cache
def openblas_library():
    """NumPy's own OpenBLAS as a ctypes library, with its symbol prefix/suffix and int type;
    None where NumPy uses another BLAS (then gemm falls back to np.matmul)."""
    roots = [os.path.dirname(np.__file__) + ".libs", os.path.join(os.path.dirname(np.__file__), ".dylibs")]
    for path in sorted(p for root in roots for p in glob.glob(os.path.join(root, "*openblas*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix, integer in (("scipy_", "64_", ctypes.c_int64), ("", "64_", ctypes.c_int64),
                                        ("", "", ctypes.c_int)):
            if hasattr(lib, f"{prefix}cblas_sgemm{suffix}"):
                return SimpleNamespace(lib=lib, prefix=prefix, suffix=suffix, integer=integer)
    return None


@functools.cache
def gemm_functions():
    """NumPy's OpenBLAS sgemm/dgemm by dtype, looked up at the first matmul; {} without OpenBLAS."""
    blas = openblas_library()
    if blas is None:
        return {}
    functions = {}
    for dtype, letter, scalar in ((np.float32, "s", ctypes.c_float), (np.float64, "d", ctypes.c_double)):
        fn = getattr(blas.lib, f"{blas.prefix}cblas_{letter}gemm{blas.suffix}")
        i, ptr = blas.integer, ctypes.c_void_p
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i, i, i, scalar, ptr, i, ptr, i, scalar, ptr, i]
        fn.restype = None
        functions[np.dtype(dtype)] = fn
    return functions


def blas_info(coretype_set_here):
    """Which OpenBLAS kernels NumPy runs (asked from the library itself), as one line.
    coretype_set_here: whether the program set OPENBLAS_CORETYPE itself before importing NumPy."""
    blas, corename = openblas_library(), None
    if blas is not None:
        fn = getattr(blas.lib, f"{blas.prefix}openblas_get_corename{blas.suffix}", None)
        if fn is not None:
            fn.restype = ctypes.c_char_p
            corename = fn().decode()
    env = os.environ.get("OPENBLAS_CORETYPE")
    how = ("set by llmc (the CPU has AVX-512)" if coretype_set_here
           else "from the environment" if env else "auto-detected")
    return f"OpenBLAS core {corename or 'unknown'} (OPENBLAS_CORETYPE={env or 'unset'}, {how})"


# ----------------------------------------------------------------------------
# the thread pool

def usable_cpus():
    """How many CPUs this process may run on (its affinity mask: a container's or taskset's limit)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


NUM_THREADS = max(1, min(8, usable_cpus()))
_pool = None
_inside = threading.local()       # .busy: this thread is running one of parallel_rows' slices


def clamp_threads(n):
    """(threads to use, a line saying why it is not n, or None): more threads than the CPUs this process may
    use would only take turns on the same cores, so n is clamped to usable_cpus()."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a whole number >= 1, got {n!r}: pass 1 or more")
    usable = usable_cpus()
    if n <= usable:
        return n, None
    return usable, f"threads: {n} asked, but this process may use {usable} CPUs (its affinity): using {usable}"


def set_threads(n):
    """Run everything on n threads from now on (before the first layer, or between steps: the pool is
    rebuilt at its next use), clamped as clamp_threads says; returns its line, or None when n was kept."""
    global NUM_THREADS, _pool
    n, note = clamp_threads(n)
    if n != NUM_THREADS:
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None
        NUM_THREADS = n
    set_blas_threads(1)       # the pool is the parallelism; on one thread, OpenBLAS must not add its own
    return note


def set_blas_threads(n):
    """OpenBLAS's own thread count (a no-op where NumPy has another BLAS)."""
    blas = openblas_library()
    if blas is not None:
        getattr(blas.lib, f"{blas.prefix}openblas_set_num_threads{blas.suffix}")(n)


def thread_pool():
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=NUM_THREADS)
        if NUM_THREADS > 1:                         # from now on the pool is the parallelism
            set_blas_threads(1)
    return _pool


def _run_slice(fn, rows):
    _inside.busy = True
    try:
        return fn(rows)
    finally:
        _inside.busy = False


def parallel_rows(fn, n_rows, n_slices=None):
    """[fn(rows) for the contiguous slices `rows` of range(n_rows)], one slice per thread (or
    n_slices of them) at the same time; the calling thread takes the last slice. Called from
    inside such a slice, it runs fn on all rows at once (the pool is already busy)."""
    n = min(n_slices or NUM_THREADS, n_rows)
    if n <= 1 or getattr(_inside, "busy", False):
        return [fn(slice(0, n_rows))]
    cuts = [n_rows * i // n for i in range(n + 1)]
    futures = [thread_pool().submit(_run_slice, fn, slice(cuts[i], cuts[i + 1])) for i in range(n - 1)]
    try:
        last = _run_slice(fn, slice(cuts[-2], cuts[-1]))
    finally:
        wait(futures)                  # no slice keeps writing after we return, even on an error
    return [f.result() for f in futures] + [last]


# ----------------------------------------------------------------------------
# matrix products: one BLAS call per thread, each on its own block of the output

def _blas_layout(x):
    """(CblasNoTrans or CblasTrans, leading dimension) of a 2-D view BLAS reads in place, or None."""
    s0, s1 = (s // x.itemsize for s in x.strides)
    if s1 == 1 and s0 >= max(1, x.shape[1]):
        return 111, s0                                    # rows strided by s0
    if s0 == 1 and s1 >= max(1, x.shape[0]):
        return 112, s1                                    # the transpose of such a view
    return None


def gemm(c, a, b, accumulate):
    """c = a @ b, or c += a @ b with accumulate, for 2-D views (c's rows may be strided, as a block
    of columns is), as one BLAS call; plain NumPy where OpenBLAS is not there."""
    fn = gemm_functions().get(c.dtype)
    la, lb, lc = _blas_layout(a), _blas_layout(b), _blas_layout(c)
    if fn is None or not (a.dtype == b.dtype == c.dtype) or None in (la, lb) or lc is None or lc[0] != 111:
        if accumulate:
            c += a @ b
        else:
            np.matmul(a, b, out=c)
        return
    (M, K), N = a.shape, b.shape[1]
    if M == 0 or N == 0:
        return
    if K == 0:
        if not accumulate:
            c[...] = 0
        return
    fn(101, la[0], lb[0], M, N, K, 1.0, a.ctypes.data, la[1], b.ctypes.data, lb[1],
       1.0 if accumulate else 0.0, c.ctypes.data, lc[1])   # 101 = row-major


def matmul(out, a, b, accumulate=False, bias=None):
    """out = a @ b (+ bias), or out += a @ b with accumulate. a (..., K), b (K, N), out (..., N):
    the leading axes of a and out are taken as rows (out is reshaped without copying: a view that
    cannot be is an error, never a silent copy that would receive the result). The product is cut
    into one block per thread, each one single-threaded BLAS call: blocks of columns (each using
    the same columns of b), or blocks of rows where out is much taller than wide (measured faster).
    The bias is added to each block while it is still in cache."""
    out2 = out.reshape(-1, out.shape[-1], copy=False)
    a2 = a.reshape(-1, a.shape[-1])
    M, N = out2.shape

    def rows(r):
        gemm(out2[r], a2[r], b, accumulate)
        if bias is not None:
            out2[r] += bias

    def columns(r):
        gemm(out2[:, r], a2, b[:, r], accumulate)
        if bias is not None:
            out2[:, r] += bias[r]

    if M >= 4 * N:
        parallel_rows(rows, M)
    else:
        parallel_rows(columns, N)


def matmuls(*products, accumulate=False):
    """Several independent products [(out, a, b), ...] (see matmul). On two threads, two products
    run side by side, a whole one per thread (measured faster than cutting each one in two: each
    BLAS call gets the full size); otherwise one after the other, each cut over the threads."""
    if NUM_THREADS == 2 and len(products) == 2:
        parallel_rows(lambda r: matmul(*products[r.start], accumulate=accumulate), 2)
    else:
        for out, a, b in products:
            matmul(out, a, b, accumulate=accumulate)


# ----------------------------------------------------------------------------
# row_blocks: a whole-array layer run over blocks of its rows, the blocks in parallel

ROWS = {"B": ("B",), "BT": ("B", "T"), "N": ("N",)}


def row_blocks(*cut, summed=(), rows="B", block=None):
    """Decorator for a layer whose rows are independent: the layer's body is whole-array NumPy,
    and the call runs it on blocks of the rows, the blocks at the same time on the thread pool.

    cut      the array arguments that hold one entry per row; each call of the body gets its block
             of them (views, no copies)
    rows     what a row is, and which size arguments the body sees changed:
             "B"   a sequence: arrays are cut along their first axis, B becomes the block's count
             "BT"  a position (b, t): arrays whose first two axes are (B, T) are seen as (B*T, 1, ...)
                   and cut along B*T; the body gets B = the block's count of positions and T = 1
             "N"   an element: arrays are seen flat (N,) and cut; N becomes the block's count
    summed   gradient arguments every row adds into (dweight, dbias): each thread adds into its own
             zeroed copy, and the copies are added into the argument in thread order afterwards,
             so the float32 sums are the same on every run
    block    at most this many rows per call of the body (a thread runs its blocks one after the
             other), to keep the body's temporaries in cache; default: one block per thread

    Arrays that cannot be seen in that shape without a copy (a strided view), or a single block,
    run the layer as written, on all rows at once.
    """
    def decorate(layer):
        signature = inspect.signature(layer)
        names = list(signature.parameters)
        cut_at = [names.index(n) for n in cut]
        sum_at = [names.index(n) for n in summed]
        size_at = [names.index(n) for n in ROWS[rows]]

        def run(*args, **kwargs):
            if kwargs:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                args = bound.args
            args = list(args)
            n = 1
            for i in size_at:
                n *= args[i]
            if n <= 0:
                return layer(*args)
            per_block = block or -(-n // NUM_THREADS)
            n_threads = min(NUM_THREADS, -(-n // per_block)) if n > 0 else 1
            if n_threads <= 1 and per_block >= n:
                return layer(*args)
            try:
                arrays = {i: _as_rows(args[i], n, rows) for i in cut_at}
            except ValueError:                 # a view that would need a copy: all rows at once
                return layer(*args)

            def thread(r):                     # r: this thread's slice of the n rows
                own = list(args)
                for i in sum_at:
                    if args[i] is not None and n_threads > 1:
                        own[i] = np.zeros_like(args[i])
                for start in range(r.start, r.stop, per_block):
                    stop = min(start + per_block, r.stop)
                    for i, x in arrays.items():
                        own[i] = x[start:stop]
                    own[size_at[0]] = stop - start
                    if rows == "BT":
                        own[size_at[1]] = 1
                    layer(*own)
                return [own[i] for i in sum_at]

            parts = parallel_rows(thread, n, n_threads)
            if n_threads > 1:
                for part in parts:             # in thread order: a fixed summation order
                    for i, p in zip(sum_at, part):
                        if args[i] is not None:
                            args[i] += p

        run.__name__, run.__qualname__, run.__doc__ = layer.__name__, layer.__qualname__, layer.__doc__
        run.__module__, run.__signature__, run.layer = layer.__module__, signature, layer
        return run                             # (no __wrapped__: train_gpt2's profiler wraps it like any layer)
    return decorate


def _as_rows(x, n, rows):
    """x seen with its n rows along the first axis, a view (ValueError where that needs a copy)."""
    if rows == "N":
        return x.reshape(-1, copy=False)
    if rows == "BT":
        return x.reshape(n, 1, *x.shape[2:], copy=False)
    return x


# ----------------------------------------------------------------------------
# in_chunks: an elementwise update over cache-sized chunks of flat arrays

def in_chunks(fn, arrays, chunk, *args):
    """[fn(*pieces, *args)] for the matching pieces of at most `chunk` elements of the equally long
    flat `arrays`, in order. Each thread takes a contiguous share of the pieces. A whole-array
    update streams every array through memory once per NumPy operation; on pieces that stay in the
    CPU's last-level cache only the first and the last touch memory."""
    n = arrays[0].size
    starts = list(range(0, n, chunk))

    def thread(r):
        return [fn(*(x[a:a + chunk] for x in arrays), *args) for a in starts[r]]

    return [result for part in parallel_rows(thread, len(starts)) for result in part]


_scratch = threading.local()      # .arrays: this thread's scratch arrays, by slot


def scratch(n, slot=0, dtype=np.float32):
    """A scratch array of n elements owned by the calling thread (slot: a second one at the same time),
    reused by every call: an elementwise update written with out= into it makes no new temporary per
    operation (AdamW's chunks: 12 operations each, on ~950 chunks a step at d12). Its contents are
    whatever the last user left."""
    arrays = getattr(_scratch, "arrays", None)
    if arrays is None:
        arrays = _scratch.arrays = {}
    x = arrays.get((slot, np.dtype(dtype)))
    if x is None or x.size < n:
        x = arrays[(slot, np.dtype(dtype))] = np.empty(n, dtype=dtype)
    return x[:n]


def zero(array):
    """array[...] = 0 for a flat array, the threads each filling a share: one core cannot write
    memory as fast as two (d12's 124M-float gradient buffer: 62 ms on one core, 34 ms on two)."""
    in_chunks(np.ndarray.fill, (array,), 1 << 20, 0)
