"""--profile 1: the wall time of every layer and optimizer phase, per training step.

enable(module) replaces the trainer module's layer functions (<layer>_forward / <layer>_backward)
and its gpt2_zero_grad / gpt2_calculate_grad_norm / gpt2_update by timed wrappers; gpt2_forward
looks its layers up by name at call time, so nothing else changes. disable(module) puts the
originals back. Times are kept only while ACTIVE[0] is true (the training loop switches it on
around the steps it wants counted); otherwise a wrapper only calls through. Matrix multiplies are
told apart by their shapes: "matmul_forward 768->50304" is the classifier.

The timed path is two perf_counter calls and one dict update, on the calling thread: no locks,
no synchronisation, nothing that waits for the thread pool beyond what the layer itself does.
"""

from time import perf_counter

PROFILE = {}           # key -> [seconds, calls]; key is the name, or (name, C, OC) for a matmul
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


def _label(key):
    return f"{key[0]} {key[1]}->{key[2]}" if isinstance(key, tuple) else key


def report(steps):
    """The PROFILE table, slowest first, in ms per training step."""
    total = sum(v[0] for v in PROFILE.values())
    lines = [f"{'profile (ms per step)':40s} {'ms':>9s} {'calls':>7s} {'%':>6s}"]
    for key, (seconds, calls) in sorted(PROFILE.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"{_label(key):40s} {1e3 * seconds / steps:9.2f} {calls // steps:7d} {100 * seconds / total:6.1f}")
    lines.append(f"{'total':40s} {1e3 * total / steps:9.2f}")
    return "\n".join(lines)
