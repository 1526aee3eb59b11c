"""--profile 1: the wall time of every layer and optimizer phase, per training step.

enable(module) replaces the trainer module's layer functions (<layer>_forward / <layer>_backward)
and its gpt2_zero_grad / gpt2_calculate_grad_norm / gpt2_update by timed wrappers; gpt2_forward
looks its layers up by name at call time, so nothing else changes. disable(module) puts the
originals back. Times are kept only while ACTIVE[0] is true (the training loop switches it on
around the steps it wants counted); otherwise a wrapper only calls through. Matrix multiplies are
told apart by their shapes: "matmul_forward 768->50304" is the classifier.

The timed path is two perf_counter calls, two dict updates and a count of the bytes the call's
arrays hold, on the calling thread: no locks, no synchronisation, nothing that waits for the thread
pool beyond what the layer itself does.

The report ends with the step's floor per phase (llmc/floor.py): the matrix products at NumPy's sgemm
rate on their own shapes, everything else at the memory bandwidth, both measured when the report is
made (a second or two after a d12 run), and how much of each floor the step reached.
"""

from time import perf_counter

from llmc import floor

PROFILE = {}           # key -> [seconds, calls]; key is the name, or (name, C, OC) for a matmul
WORK = {}              # key -> [bytes moved, {(M, K, N, b transposed): products done}], summed over the calls
ACTIVE = [False]       # the training loop switches it on around the steps to count (not eval, sampling)
LAYERS = ("encoder", "layernorm", "matmul", "attention", "gelu", "residual", "softmax", "crossentropy",
          "crossentropy_softmax")
PHASES = ("gpt2_zero_grad", "gpt2_calculate_grad_norm", "gpt2_update")
NAMES = tuple(f"{layer}_{direction}" for layer in LAYERS for direction in ("forward", "backward")) + PHASES


def _timed(fn, name):
    """fn with its time added to PROFILE while ACTIVE; a matmul's key carries its C and OC (its last
    two arguments), formatted only when the table is printed."""
    by_shape = name.startswith("matmul")

    def timed(*args, **kwargs):
        if not ACTIVE[0]:
            return fn(*args, **kwargs)
        moved, products = floor.call_bytes(name, args, kwargs), floor.call_products(name, args)
        t0 = perf_counter()
        result = fn(*args, **kwargs)
        seconds = perf_counter() - t0
        key = (name, args[-2], args[-1]) if by_shape else name
        entry = PROFILE.get(key)
        if entry is None:
            PROFILE[key] = [seconds, 1]
        else:
            entry[0] += seconds
            entry[1] += 1
        work = WORK.setdefault(key, [0, {}])
        work[0] += moved
        for shape in products:
            work[1][shape] = work[1].get(shape, 0) + 1
        return result
    timed.__wrapped__ = fn
    return timed


def enable(module):
    """Wrap the layers and optimizer phases of a trainer module (once; a second call does nothing)."""
    for name in NAMES:
        fn = getattr(module, name, None)
        if fn is not None and not hasattr(fn, "__wrapped__"):
            setattr(module, name, _timed(fn, name))


def disable(module):
    """Put back the functions enable() wrapped (the collected times stay in PROFILE)."""
    for name in NAMES:
        fn = getattr(module, name, None)
        if fn is not None and hasattr(fn, "__wrapped__"):
            setattr(module, name, fn.__wrapped__)


def function_name(key):
    """The profiled function of a PROFILE or WORK key (a matmul's key also carries its C and OC)."""
    return key[0] if isinstance(key, tuple) else key


def _label(key):
    return f"{key[0]} {key[1]}->{key[2]}" if isinstance(key, tuple) else key


def report(steps, with_floor=True):
    """The PROFILE table, slowest first, in ms per training step; then the floor per phase (floor_report)."""
    total = sum(v[0] for v in PROFILE.values())
    lines = [f"{'profile (ms per step)':40s} {'ms':>9s} {'calls':>7s} {'%':>6s}"]
    for key, (seconds, calls) in sorted(PROFILE.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"{_label(key):40s} {1e3 * seconds / steps:9.2f} {calls // steps:7d} {100 * seconds / total:6.1f}")
    lines.append(f"{'total':40s} {1e3 * total / steps:9.2f}")
    return "\n".join(lines) + ("\n\n" + floor_report(steps) if with_floor else "")


def floor_report(steps):
    """The profiled time per phase of the floor (products, AdamW, zeroing, the rest) against that phase's
    floor on this machine, measured now: the products at the sgemm rate of each shape, the bytes every
    other call moved at the memory bandwidth."""
    bandwidth = max(floor.memory_bandwidth())
    shapes = {shape for _, products in WORK.values() for shape in products}
    product_time = {shape: floor.product_seconds(*shape, repeats=1) for shape in sorted(shapes)}
    measured, floors = dict.fromkeys(floor.PHASES, 0.0), dict.fromkeys(floor.PHASES, 0.0)
    flops = gemm_seconds = 0.0
    for key, (seconds, _) in PROFILE.items():
        phase = floor.phase_of(function_name(key))
        moved, products = WORK.get(key, (0, {}))
        measured[phase] += seconds
        floors[phase] += moved / bandwidth + sum(product_time[s] * n for s, n in products.items())
        flops += sum(2 * M * K * N * n for (M, K, N, _), n in products.items())
        gemm_seconds += sum(product_time[s] * n for s, n in products.items())
    rate = flops / gemm_seconds / 1e9 if gemm_seconds else 0.0
    lines = [f"floor per phase: {floor.floor_line(bandwidth, rate)}",
             f"{'phase':20s} {'ms':>9s} {'floor ms':>9s} {'reached':>8s}"]
    for phase in floor.PHASES + ("total",):
        ms = 1e3 * (sum(measured.values()) if phase == "total" else measured[phase]) / steps
        floor_ms = 1e3 * (sum(floors.values()) if phase == "total" else floors[phase]) / steps
        reached = f"{100 * floor_ms / ms:7.0f}%" if ms > 0 and floor_ms > 0 else f"{'-':>8s}"
        lines.append(f"{phase:20s} {ms:9.2f} {floor_ms:9.2f} {reached}")
    return "\n".join(lines)
