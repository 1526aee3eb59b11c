"""Run the CUDA kernels of kernels/*.cu on the CPU, behind the interface of cupy.RawModule.

    from emulator import RawModule
    from llmc.cuda_common import ceil_div, kernel_source
    mod = RawModule(code=kernel_source("gelu"), options=("--std=c++17",))
    gelu = mod.get_function("gelu_forward_kernel")
    gelu((ceil_div(N, 256),), (256,), (out, inp, np.int32(N)))        # out, inp: float32 NumPy arrays

The source is compiled by g++ with emulator.h force-included (it supplies threadIdx, __syncthreads,
warp shuffles, shared memory, atomics, ...; see its header for the execution model and what it cannot
express) into a shared library cached under emulator/build/ (or $LLMC_EMULATOR_CACHE), keyed by a hash
of the source, the header and the flags. Each extern "C" __global__ kernel gets a generated entry
point that reports the kernel's parameter types, so every launch checks its arguments: a NumPy array
of the right dtype for each pointer, and a NumPy scalar of exactly the right type for each scalar
(np.int32 for int, np.float32 for float, np.int64 for long long; for __nv_bfloat16* a uint16 array of
bf16 bits or an ml_dtypes.bfloat16 array, for a __nv_bfloat16 np.uint16 bits). A Python int or float, or an
np.float64 passed for a float, is the classic silent CuPy bug; here it is a TypeError.

Environment: LLMC_EMULATOR_THREADS (OS threads running blocks; default one per core),
LLMC_EMULATOR_ORDER (forward | reverse | warps: how the threads of a block take turns; a kernel
with a race between its threads gives different results in different orders),
LLMC_EMULATOR_CACHE (where the compiled libraries go; default emulator/build/).

`with count_traffic() as launches:` counts the bytes each launch inside reads and writes in global
memory (a second build of each module, with g++ -fsanitize=thread; see count_traffic and emulator.h).

The source must be one self-contained text, as NVRTC takes it: g++ sees no -I of kernels/, so a
`#include "common.cuh"` must already be expanded (llmc.cuda_common.kernel_source does that). g++ does
see emulator/include/, whose empty cuda_bf16.h lets `#include <cuda_bf16.h>` stand (emulator.h
defines the bf16 types).
"""

import collections
import contextlib
import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
import threading

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "emulator.h")
INCLUDE_DIR = os.path.join(HERE, "include")    # stand-ins for CUDA headers a kernel #includes (cuda_bf16.h)
MAX_DYNAMIC_SHARED_DEFAULT = 48 * 1024  # CUDA's limit unless a kernel opts in to more
THREAD_ORDERS = ("forward", "reverse", "warps")  # emulator.h's ThreadOrder, in its order
GUARD_BYTES = 65536                             # canary on each side of an array with guard=True


def _canary(dtype, nbytes):
    """Guard bytes: a signaling NaN for floats (reads give NaN, and any arithmetic on it quiets it, so
    a write of a computed value changes the bits), 0xFF bytes (-1) for everything else: for the
    uint16 (or ml_dtypes.bfloat16) arrays behind __nv_bfloat16* that is 0xFFFF, a NaN in bf16 that no
    conversion produces (they give 0x7FFF)."""
    if dtype == np.float32:
        return np.full(nbytes // 4, 0x7FA5A5A5, np.uint32).view(np.uint8)
    if dtype == np.float64:
        return np.full(nbytes // 8, 0x7FF4A5A5A5A5A5A5, np.uint64).view(np.uint8)
    return np.full(nbytes, 0xFF, np.uint8)

# C type names (as emulator.h's signature() spells them) -> NumPy dtypes
_DTYPES = {
    "float": np.float32, "double": np.float64, "int": np.int32, "unsigned int": np.uint32,
    "long long": np.int64, "unsigned long long": np.uint64, "long": np.int64, "unsigned long": np.uint64,
    "short": np.int16, "unsigned short": np.uint16, "char": np.int8, "signed char": np.int8,
    "unsigned char": np.uint8, "bool": np.bool_,
}
_VECTOR_ELEMENTS = {"float4": np.float32, "float2": np.float32, "int4": np.int32}  # float4* takes a float32 array
# bf16 (emulator.h's __nv_bfloat16, also behind a `typedef __nv_bfloat16 floatX`): arrays of its bit
# patterns as uint16, or of ml_dtypes.bfloat16 where that package is installed (CuPy's bfloat16);
# a scalar bf16 takes np.uint16 bits, a scalar __nv_bfloat162 np.uint32 (x in the low half)
_BF16_TYPES = ("__nv_bfloat16", "__nv_bfloat162")


def _is_bf16_dtype(dtype):
    return dtype == np.uint16 or (dtype.name == "bfloat16" and dtype.itemsize == 2)
_CTYPES = {
    np.float32: ctypes.c_float, np.float64: ctypes.c_double, np.int32: ctypes.c_int32, np.uint32: ctypes.c_uint32,
    np.int64: ctypes.c_int64, np.uint64: ctypes.c_uint64, np.int16: ctypes.c_int16, np.uint16: ctypes.c_uint16,
    np.int8: ctypes.c_int8, np.uint8: ctypes.c_uint8, np.bool_: ctypes.c_bool,
}

_KERNEL_RE = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(")
_EXTERN_SHARED_RE = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)?([A-Za-z_][\w\s]*?)\s+(\w+)\s*\[\s*\]\s*;")


class CompileError(RuntimeError):
    """g++ rejected the source (the message holds its output), like cupy's CompileException."""


def _rewrite(code, counted=False, raced=False):
    """CUDA source -> C++ for g++: dynamic shared memory as a pointer, plus one entry point per kernel
    (counted: the traffic counter's entry, which also takes the arrays to count and the counts' place;
    raced: the race checker's, which takes the arrays to check and the reports' place)."""
    src = _EXTERN_SHARED_RE.sub(lambda m: f"{m.group(1)}* {m.group(2)} = "
                                          f"reinterpret_cast<{m.group(1)}*>(emu::dynamic_smem());", code)
    names = sorted(set(_KERNEL_RE.findall(code)))
    entries = ["", "// ---- generated by emulator/rawmodule.py"]
    for name in names:
        entries.append(f'extern "C" const char* emu_sig__{name}() {{ return emu::signature({name}); }}')
        entries.append(f'extern "C" const char* emu_launch__{name}(const unsigned* grid, const unsigned* block, '
                       f'unsigned long long shared_mem, void** args, int order) '
                       f'{{ return emu::launch_kernel({name}, grid, block, shared_mem, args, order); }}')
        if counted:
            entries.append(f'extern "C" const char* emu_launch_counted__{name}(const unsigned* grid, '
                           f'const unsigned* block, unsigned long long shared_mem, void** args, int order, '
                           f'const unsigned long long* ranges, int nranges, unsigned long long* counts) '
                           f'{{ return emu::launch_kernel_counted({name}, grid, block, shared_mem, args, order, '
                           f'ranges, nranges, counts); }}')
        if raced:
            entries.append(f'extern "C" const char* emu_launch_raced__{name}(const unsigned* grid, '
                           f'const unsigned* block, unsigned long long shared_mem, void** args, int order, '
                           f'const unsigned long long* ranges, const int* ids, int nranges, '
                           f'unsigned long long* reports, int max_reports, unsigned long long* found) '
                           f'{{ return emu::launch_kernel_raced({name}, grid, block, shared_mem, args, order, '
                           f'ranges, ids, nranges, reports, max_reports, found); }}')
    return src + "\n".join(entries) + "\n", names


def _cache_dir():
    env = os.environ.get("LLMC_EMULATOR_CACHE")
    for d in ([env] if env else []) + [os.path.join(HERE, "build"), os.path.expanduser("~/.cache/llmc_emulator")]:
        try:
            os.makedirs(d, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            pass
    return tempfile.mkdtemp(prefix="llmc_emulator_")


def _gxx_flags(options):
    std = "c++17"
    flags = []
    for opt in options or ():
        m = re.fullmatch(r"-{1,2}std[= ]?(c\+\+\d\d)", opt)
        if m:
            std = max(std, m.group(1), key=lambda s: int(s[-2:]) if s[-2:] != "98" else 0)
        elif opt.startswith(("-D", "-I", "-U")):
            flags.append(opt)
        # everything else (-arch, --use_fast_math, -lineinfo, ...) is NVRTC's business
    return ["-std=" + std, "-O2", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing"] + flags + ["-I", INCLUDE_DIR]


_gxx_version = None
_libs = {}
_lock = threading.Lock()


# the traffic counter's library: TSan's compiler pass puts a call before every load and store, which
# emulator.h answers itself (so no libtsan: compile and link are two steps, and the link refuses an
# undefined symbol, e.g. a __tsan_ function emulator.h lacks)
COUNT_FLAGS = ["-DEMU_COUNT_TRAFFIC", "-fsanitize=thread"]
# the race checker's library: the same hooks, which record each access in a shadow of the checked memory
RACE_FLAGS = ["-DEMU_RACECHECK", "-fsanitize=thread"]


def _build(code, options, counted=False, raced=False):
    """Compile (or find in the cache) the library for this source; return (ctypes.CDLL, kernel names).
    counted: the traffic counter's variant (see count_traffic), raced: the race checker's (see
    Function.__call__'s racecheck), each cached under its own key."""
    global _gxx_version
    src, names = _rewrite(code, counted, raced)
    flags = _gxx_flags(options) + (COUNT_FLAGS if counted else []) + (RACE_FLAGS if raced else [])
    if _gxx_version is None:
        _gxx_version = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout
    header = b""
    for path in [HEADER] + sorted(os.path.join(INCLUDE_DIR, n) for n in os.listdir(INCLUDE_DIR)):
        with open(path, "rb") as f:
            header += f.read()
    key = hashlib.sha256(b"\0".join([src.encode(), header, " ".join(flags).encode(), _gxx_version.encode()]))
    path = os.path.join(_cache_dir(), key.hexdigest()[:24] + ".so")
    with _lock:
        if path in _libs:
            return _libs[path], names
    if not os.path.exists(path):
        fd, tmp_src = tempfile.mkstemp(suffix=".cu.cpp", dir=os.path.dirname(path))
        with os.fdopen(fd, "w") as f:
            f.write(src)
        tmp_so = tmp_src[:-len(".cu.cpp")] + ".so"
        tmp_o = tmp_src[:-len(".cu.cpp")] + ".o"
        try:
            if counted or raced:
                compile_flags = [f for f in flags if f != "-shared"]
                steps = [("compile", ["g++", "-x", "c++", "-include", HEADER] + compile_flags
                          + ["-c", tmp_src, "-o", tmp_o]),
                         ("link", ["g++", "-shared", "-pthread", tmp_o, "-o", tmp_so, "-Wl,--no-undefined"])]
            else:
                steps = [("compile", ["g++", "-x", "c++", "-include", HEADER] + flags + [tmp_src, "-o", tmp_so])]
            for what, cmd in steps:
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    raise CompileError(f"emulator: g++ could not {what} the kernel source:\n{res.stderr}")
            os.replace(tmp_so, path)  # atomic: a concurrent build of the same source is harmless
        finally:
            for p in (tmp_src, tmp_so, tmp_o):
                if os.path.exists(p):
                    os.remove(p)
    lib = ctypes.CDLL(path)
    with _lock:
        _libs.setdefault(path, lib)
        return _libs[path], names


def _dims(value, what):
    """grid/block as CuPy takes them: an int or a tuple of 1 to 3 ints -> [x, y, z]."""
    if isinstance(value, (int, np.integer)):
        value = (value,)
    dims = [int(v) for v in value]
    if not 1 <= len(dims) <= 3 or any(d < 1 for d in dims):
        raise ValueError(f"{what} must be 1 to 3 positive ints, got {value!r}")
    return dims + [1] * (3 - len(dims))


# ---- the traffic counter: bytes each launch reads and writes in global memory

# one launch's global-memory traffic: bytes and accesses (a 128-bit load is one read of 16 bytes)
Traffic = collections.namedtuple("Traffic", "kernel grid block bytes_read bytes_written reads writes")
_collectors = []   # the lists of the count_traffic() blocks now open


@contextlib.contextmanager
def count_traffic():
    """Count the global-memory traffic of every launch inside the block, of every module:

        with count_traffic() as launches:
            gelu((ceil_div(N, 256),), (256,), (out, inp, np.int32(N)))
        launches[0].bytes_read, launches[0].bytes_written      # 4N, 4N

    Each launch appends a Traffic(kernel, grid, block, bytes_read, bytes_written, reads, writes). Inside
    the block kernels run from a second build of their module, compiled with g++ -fsanitize=thread so
    that every load and store calls a counter (emulator.h, "the traffic counter"), built at the first
    counted launch and cached under its own key; outside it nothing is counted and nothing is slower.
    Global memory is the arrays passed as pointer arguments (without the guard bytes of guard=True):
    shared memory and locals do not count, and neither do caches (every access reaches memory)."""
    launches = []
    _collectors.append(launches)
    try:
        yield launches
    finally:
        _collectors.remove(launches)


# ---- the race checker: races between the threads of a launch (emulator.h, "the race checker")

class RaceError(RuntimeError):
    """The race checker found accesses of two threads to the same bytes, at least one a write, that no
    __syncthreads, warp operation or atomicity orders (a launch with racecheck=True)."""


RACE_REPORTS = 4                                 # races named in the message; the rest are counted
_RACE_KINDS = ("read-after-write", "write-after-write", "write-after-read")


def _racecheck_default():
    value = os.environ.get("LLMC_EMULATOR_RACECHECK", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"LLMC_EMULATOR_RACECHECK must be 0 or 1, got {value!r}")
    return value == "1"


def _param_names(code, name):
    """The parameter names of kernel `name` in the source, for the race checker's messages ([] if the
    declaration cannot be read)."""
    m = re.search(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?" + re.escape(name) + r"\s*\(", code)
    if not m:
        return []
    depth, i, start = 1, m.end(), m.end()
    while i < len(code) and depth:
        depth += {"(": 1, ")": -1}.get(code[i], 0)
        i += 1
    params = [p for p in code[start:i - 1].split(",") if p.strip()]
    names = [re.search(r"(\w+)\s*(?:\[[^\]]*\]\s*)?$", p.strip()) for p in params]
    return [n.group(1) if n else "" for n in names]


def _coords(linear, dims):
    x, y = dims[0], dims[1]
    return f"({linear % x},{linear // x % y},{linear // (x * y)})"


def _race_message(kernel, reports, found, names, grid, block):
    """One line per race: the kernel, the memory and byte offset, both threads (the earlier access first)."""
    lines = []
    for kind, rid, offset, e_block, e_thread, l_block, l_thread in reports:
        if rid >= 0:
            where = f"{names[rid]} (argument {rid})" if rid < len(names) and names[rid] else f"argument #{rid}"
        else:
            where = "shared memory" if rid == -1 else "static __shared__ memory"
        lines.append(f"racecheck: {kernel}: {_RACE_KINDS[kind]} race on {where} at byte offset {offset} between "
                     f"block {_coords(e_block, grid)} thread {_coords(e_thread, block)} and "
                     f"block {_coords(l_block, grid)} thread {_coords(l_thread, block)}")
    lines.append(f"racecheck: {kernel}: {found} racing accesses in all (missing __syncthreads / __syncwarp, "
                  f"or a plain store or += where atomicAdd is needed?)")
    return "\n".join(lines)


class Function:
    """One kernel: call it as fn(grid, block, args, shared_mem=0), like cupy.RawKernel."""

    def __init__(self, lib, name, module=None):
        self.name = name
        self._module = module          # for its counting library, built at the first counted launch
        self._launch_counted = None
        self._launch_raced = None
        self.max_dynamic_shared_size_bytes = MAX_DYNAMIC_SHARED_DEFAULT
        sig = getattr(lib, "emu_sig__" + name)
        sig.restype = ctypes.c_char_p
        self.param_types = [t for t in sig().decode().split(",") if t]
        self._launch = getattr(lib, "emu_launch__" + name)
        self._launch.restype = ctypes.c_char_p
        self._launch.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                                 ctypes.c_ulonglong, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]

    def _arg(self, i, ctype, arg):
        where = f"{self.name}: argument {i} ({ctype})"
        if ctype.endswith("*"):
            base = ctype[:-1].replace("const ", "").strip()
            if arg is None or (isinstance(arg, np.generic) and arg.dtype.kind in "iu" and arg.dtype.itemsize == 8
                               and arg == 0):
                return ctypes.c_void_p(None)          # NULL: None, or np.uint64(0) as passed to CuPy
            if not isinstance(arg, np.ndarray):
                raise TypeError(f"{where} expects a NumPy array or None (NULL), got {type(arg).__name__}")
            if base in _BF16_TYPES:
                if not _is_bf16_dtype(arg.dtype):
                    raise TypeError(f"{where} expects a uint16 array of bf16 bits (or ml_dtypes.bfloat16), "
                                    f"got {arg.dtype}")
                want = None
            else:
                want = _DTYPES.get(base) or _VECTOR_ELEMENTS.get(base)
            if want is not None and arg.dtype != want:
                raise TypeError(f"{where} expects a {np.dtype(want).name} array, got {arg.dtype}")
            if not arg.flags.c_contiguous:
                raise ValueError(f"{where}: the array is not C-contiguous (pass np.ascontiguousarray(...))")
            if not ctype.startswith("const") and not arg.flags.writeable:
                raise ValueError(f"{where}: the kernel may write through this pointer but the array is read-only")
            return ctypes.c_void_p(arg.ctypes.data)
        if ctype in _BF16_TYPES:
            want = np.uint16 if ctype == "__nv_bfloat16" else np.uint32
            if isinstance(arg, np.generic) and arg.dtype.name == "bfloat16" and ctype == "__nv_bfloat16":
                arg = arg.view(np.uint16)             # an ml_dtypes.bfloat16 scalar: its bits
            if not isinstance(arg, np.generic) or arg.dtype != want:
                got = f"np.{arg.dtype}" if isinstance(arg, np.generic) else f"Python {type(arg).__name__}"
                raise TypeError(f"{where} expects its bits as np.{np.dtype(want).name}, got {got}")
            return _CTYPES[want](arg.item())
        want = _DTYPES.get(ctype)
        if want is None:
            raise TypeError(f"{where}: the emulator does not know how to pass this type")
        if not isinstance(arg, np.generic):
            hint = f"; pass np.{np.dtype(want).name}(...)"
            raise TypeError(f"{where} expects np.{np.dtype(want).name}, got Python {type(arg).__name__}{hint}")
        if arg.dtype != want:
            raise TypeError(f"{where} expects np.{np.dtype(want).name}, got np.{arg.dtype}")
        return _CTYPES[want](arg.item())

    def __call__(self, grid, block, args, shared_mem=0, stream=None, order=None, guard=False, racecheck=None):
        """Launch. Three options CuPy does not have, for tests:
        order: how the threads of a block take turns: "forward", "reverse" (last to first) or "warps"
            (each warp runs ahead to __syncthreads in turn); a kernel whose threads race gives
            different results in different orders (see emulator.h). Default: $LLMC_EMULATOR_ORDER,
            or "forward".
        guard: run on copies of the arrays with GUARD_BYTES of canary on both sides (a signaling
            NaN for floats, -1 for ints, 0xFFFF for bf16): a write out of bounds is an error, a read
            out of bounds reads NaN. The copies start 256-byte aligned, as cudaMalloc's do. An array
            passed twice stays one array; distinct views of one buffer become distinct arrays.
        racecheck: run from the race checker's build of the module (emulator.h, "the race checker") and
            raise RaceError after the launch when two threads raced: same bytes of an array argument or
            of shared memory, at least one a write, not ordered by __syncthreads (same block), a warp
            operation (same warp) or both being atomics. Default: $LLMC_EMULATOR_RACECHECK == "1". A
            launch inside count_traffic() is counted, not checked."""
        if racecheck is None:
            racecheck = _racecheck_default()
        if order is None:
            order = os.environ.get("LLMC_EMULATOR_ORDER") or "forward"
        if order not in THREAD_ORDERS:
            raise ValueError(f"{self.name}: order must be one of {THREAD_ORDERS}, got {order!r}")
        g = _dims(grid, "grid")
        b = _dims(block, "block")
        if b[0] > 1024 or b[1] > 1024 or b[2] > 64 or b[0] * b[1] * b[2] > 1024:
            raise ValueError(f"{self.name}: block {tuple(b)} exceeds CUDA's limits (x, y <= 1024, z <= 64, "
                             f"x*y*z <= 1024 threads)")
        if g[0] > 2**31 - 1 or g[1] > 65535 or g[2] > 65535:
            raise ValueError(f"{self.name}: grid {tuple(g)} exceeds CUDA's limits (x < 2^31, y, z <= 65535)")
        shared_mem = int(shared_mem)
        if shared_mem > self.max_dynamic_shared_size_bytes:
            raise ValueError(f"{self.name}: {shared_mem} bytes of dynamic shared memory exceed the "
                             f"{self.max_dynamic_shared_size_bytes} allowed (set max_dynamic_shared_size_bytes)")
        args = tuple(args)
        if len(args) != len(self.param_types):
            raise TypeError(f"{self.name} takes {len(self.param_types)} arguments "
                            f"({', '.join(self.param_types)}), got {len(args)}")
        values = [self._arg(i, t, a) for i, (t, a) in enumerate(zip(self.param_types, args))]
        if guard:
            copies = {}                               # id(array) -> (first argument index, array, raw, inner)
            for i, a in enumerate(args):
                if isinstance(a, np.ndarray) and id(a) not in copies:
                    buf = np.empty(a.nbytes + 2 * GUARD_BYTES + 256, np.uint8)
                    start = -(buf.ctypes.data + GUARD_BYTES) % 256      # the array's data 256-byte aligned
                    raw = buf[start:start + a.nbytes + 2 * GUARD_BYTES]
                    raw[:GUARD_BYTES] = raw[-GUARD_BYTES:] = _canary(a.dtype, GUARD_BYTES)
                    inner = raw[GUARD_BYTES:GUARD_BYTES + a.nbytes].view(a.dtype).reshape(a.shape)
                    inner[...] = a
                    copies[id(a)] = (i, a, raw, inner)
            values = [ctypes.c_void_p(copies[id(a)][3].ctypes.data) if isinstance(a, np.ndarray) else v
                      for a, v in zip(args, values)]
        pointers = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.addressof(v) for v in values])
        launch_args = ((ctypes.c_uint * 3)(*g), (ctypes.c_uint * 3)(*b), shared_mem, pointers,
                       THREAD_ORDERS.index(order))
        counting = bool(_collectors)
        if counting:
            arrays = [(v.value, a.nbytes) for a, v in zip(args, values) if isinstance(a, np.ndarray) and v.value]
            ranges = (ctypes.c_ulonglong * max(2, 2 * len(arrays)))(*[x for r in arrays for x in r])
            counts = (ctypes.c_ulonglong * 4)()
            err = self._counted()(*launch_args, ranges, len(arrays), counts)
        elif racecheck:
            checked = [(i, v.value, a.nbytes, min(a.itemsize, 4).bit_length() - 1) for i, (a, v)
                       in enumerate(zip(args, values)) if isinstance(a, np.ndarray) and v.value and a.nbytes]
            ranges = (ctypes.c_ulonglong * max(3, 3 * len(checked)))(*[x for c in checked for x in c[1:]])
            ids = (ctypes.c_int * max(1, len(checked)))(*[c[0] for c in checked])
            reports = (ctypes.c_ulonglong * (7 * RACE_REPORTS))()
            found = ctypes.c_ulonglong(0)
            err = self._raced()(*launch_args, ranges, ids, len(checked), reports, RACE_REPORTS, ctypes.byref(found))
        else:
            err = self._launch(*launch_args)
        if err is not None:
            raise RuntimeError(f"{self.name}: {err.decode()}")
        if racecheck and not counting and found.value:
            shown = min(found.value, RACE_REPORTS)
            rows = [[int(x) for x in reports[7 * k:7 * k + 7]] for k in range(RACE_REPORTS)]
            rows = [r[:1] + [ctypes.c_longlong(r[1]).value] + r[2:] for r in rows if any(r)][:shown]
            names = self._module.param_names(self.name) if self._module is not None else []
            raise RaceError(_race_message(self.name, rows, found.value, names, g, b))
        if counting:
            record = Traffic(self.name, tuple(g), tuple(b), *[int(c) for c in counts])
            for launches in _collectors:
                launches.append(record)
        if guard:
            for i, a, raw, inner in copies.values():
                canary = _canary(a.dtype, GUARD_BYTES)
                before_ok = np.array_equal(raw[:GUARD_BYTES], canary)
                if not (before_ok and np.array_equal(raw[GUARD_BYTES + a.nbytes:], canary)):
                    side = "before the start" if not before_ok else "past the end"
                    raise RuntimeError(f"{self.name}: wrote {side} of argument {i} ({self.param_types[i]}, "
                                       f"{a.size} elements)")
                if a.flags.writeable and not self.param_types[i].startswith("const"):
                    a[...] = inner


    def _raced(self):
        """The launch entry of the race checker's library (emulator.h's launch_kernel_raced)."""
        if self._launch_raced is None:
            if self._module is None:
                raise RuntimeError(f"{self.name}: made without its RawModule, so it cannot check races")
            fn = getattr(self._module._racecheck_lib(), "emu_launch_raced__" + self.name)
            fn.restype = ctypes.c_char_p
            fn.argtypes = self._launch.argtypes + [ctypes.POINTER(ctypes.c_ulonglong), ctypes.POINTER(ctypes.c_int),
                                                   ctypes.c_int, ctypes.POINTER(ctypes.c_ulonglong), ctypes.c_int,
                                                   ctypes.POINTER(ctypes.c_ulonglong)]
            self._launch_raced = fn
        return self._launch_raced

    def _counted(self):
        """The launch entry of the counting library (emulator.h's launch_kernel_counted)."""
        if self._launch_counted is None:
            if self._module is None:
                raise RuntimeError(f"{self.name}: made without its RawModule, so it cannot count traffic")
            fn = getattr(self._module._counting_lib(), "emu_launch_counted__" + self.name)
            fn.restype = ctypes.c_char_p
            fn.argtypes = self._launch.argtypes + [ctypes.POINTER(ctypes.c_ulonglong), ctypes.c_int,
                                                   ctypes.POINTER(ctypes.c_ulonglong)]
            self._launch_counted = fn
        return self._launch_counted


class RawModule:
    """cupy.RawModule look-alike: RawModule(code=..., options=...).get_function(name)."""

    def __init__(self, code=None, *, path=None, options=(), name_expressions=None, **_ignored):
        if code is None:
            if path is None:
                raise ValueError("RawModule needs code= or path=")
            with open(path) as f:
                code = f.read()
        self._lib, self.kernel_names = _build(code, options)
        self._code, self._options, self._lib_counted, self._lib_raced = code, options, None, None
        self._functions = {}

    def _counting_lib(self):
        """The same source built to count traffic (count_traffic), on first use."""
        if self._lib_counted is None:
            self._lib_counted = _build(self._code, self._options, counted=True)[0]
        return self._lib_counted

    def _racecheck_lib(self):
        """The same source built to check races (Function.__call__'s racecheck), on first use."""
        if self._lib_raced is None:
            self._lib_raced = _build(self._code, self._options, raced=True)[0]
        return self._lib_raced

    def param_names(self, name):
        """Kernel `name`'s parameter names as the source spells them (for messages)."""
        return _param_names(self._code, name)

    def get_function(self, name):
        if name not in self._functions:
            if name not in self.kernel_names:
                raise AttributeError(f"no extern \"C\" __global__ kernel named {name!r} in this module "
                                     f"(it has: {', '.join(self.kernel_names)})")
            self._functions[name] = Function(self._lib, name, self)
        return self._functions[name]

