"""--profile 1: the wall time of every layer and optimizer phase, per training step.

enable(module) replaces the trainer module's layer functions (<layer>_forward / <layer>_backward)
and its gpt2_zero_grad / gpt2_calculate_grad_norm / gpt2_update by timed wrappers; gpt2_forward
looks its layers up by name at call time, so nothing else changes. Times are kept only while
ACTIVE[0] is true (the training loop switches it on around the steps it wants counted). Matrix
multiplies are told apart by their shapes: "matmul_forward 768->50304" is the classifier.
"""

import time

PROFILE = {}           # name -> [seconds, calls]
ACTIVE = [False]       # the training loop switches it on around the steps to count (not eval, sampling)
LAYERS = ("encoder", "layernorm", "matmul", "attention", "gelu", "residual", "softmax", "crossentropy",
          "crossentropy_softmax")
PHASES = ("gpt2_zero_grad", "gpt2_calculate_grad_norm", "gpt2_update")


def _timed(fn, name):
    """fn with its time added to PROFILE[key] while ACTIVE; a matmul's key carries its C->OC."""
    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        if ACTIVE[0]:
            key = f"{name} {args[-2]}->{args[-1]}" if name.startswith("matmul") else name
            entry = PROFILE.setdefault(key, [0.0, 0])
            entry[0] += time.perf_counter() - t0
            entry[1] += 1
        return result
    timed.__wrapped__ = fn
    return timed


def enable(module):
    """Wrap the layers and optimizer phases of a trainer module (once; a second call does nothing)."""
    names = [f"{layer}_{direction}" for layer in LAYERS for direction in ("forward", "backward")] + list(PHASES)
    for name in names:
        fn = getattr(module, name, None)
        if fn is not None and not hasattr(fn, "__wrapped__"):
            setattr(module, name, _timed(fn, name))


def report(steps):
    """The PROFILE table, slowest first, in ms per training step."""
    total = sum(v[0] for v in PROFILE.values())
    lines = [f"{'profile (ms per step)':40s} {'ms':>9s} {'calls':>7s} {'%':>6s}"]
    for key, (seconds, calls) in sorted(PROFILE.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"{key:40s} {1e3 * seconds / steps:9.2f} {calls // steps:7d} {100 * seconds / total:6.1f}")
    lines.append(f"{'total':40s} {1e3 * total / steps:9.2f}")
    return "\n".join(lines)
