"""
Check a trainer against PyTorch, end to end: llm.c's test_gpt2.c, done properly.

  python train_gpt2_torch.py --model d12          # writes gpt2_d12.bin and gpt2_d12_debug_state.bin
  python test_gpt2.py                             # the NumPy trainer (train_gpt2.py)
  python test_gpt2.py --trainer cuda              # the CuPy trainer (train_gpt2_cuda.py); LLMC_EMULATE=1 on a CPU
  python test_gpt2.py --checkpoint gpt2_L2H2C32T32.bin --steps 3   # any shape; only the first 3 steps

The debug state holds what PyTorch computed for one batch (x, y): the logits, the loss, and the
gradients of all 16 parameter tensors, plus the loss before each of its recorded AdamW steps and
the optimizer settings it used. We load the same checkpoint into our trainer and compare:
  1. the forward pass: logits (the first V of Vp columns) and the mean loss;
  2. the backward pass: all 16 gradients by name (wte on its Vp rows, padding included);
  3. training: the recorded number of AdamW steps on the same batch (zero grads, forward, compare
     the loss, backward, clip by the global norm, update), each loss against PyTorch's.
Every comparison is elementwise |ours - ref| <= atol + rtol * |ref|. The defaults (1e-4, 1e-4) are
100x tighter than test_gpt2.c's 1e-2. Unlike test_gpt2.c, a failure exits with status 1.

Precision (--precision bf16|fp32, -w/--master_weights 0|1). The NumPy trainer is fp32 only. The CUDA
trainer runs in bf16 by default where the GPU has it (SM >= 80; the emulator counts as one), else in
fp32; the model is built with its gpt2_build_from_checkpoint(path, precision=..., master_weights=...).

  LLMC_EMULATE=1 python test_gpt2.py --trainer cuda --checkpoint gpt2_L2H2C32T32.bin   # bf16 on a CPU
  python test_gpt2.py --trainer cuda --precision fp32                                  # the fp32 check above
  python test_gpt2.py --trainer cuda --precision bf16 --target 0.5                     # exit by the target

In bf16 the model is our own bf16 forward and backward on the checkpoint's weights rounded to bf16 at load
(from a v3 file the fp32 values are kept as master weights with -w 1), and it is judged against the same
fp32 reference PyTorch computed from the fp32 weights, as llm.c's test_gpt2.cu judges its bf16 build. The
tolerances are test_gpt2.cu's bf16 ones:
  logits (first V columns)     |ours - ref| <= 25, absolute only (no relative term, as test_gpt2.cu)
  loss, each training loss     |ours - ref| <= 0.05
  the 16 gradients             |ours - ref| <= threshold + 0.079 |ref| (test_gpt2.cu's "bf16 epsilon"),
                               threshold per tensor: BF16_GRAD_THRESHOLDS below
(test_gpt2.cu reads the reference loss but never compares it; we compare it with the 0.05 of the training
losses.) Each tensor gets a ratio, the largest over its elements of |ours - ref| / tolerance (test_gpt2.cu
prints it as a percentage, "% of maximum error"), printed with the tensor and again in a summary at the end. A tensor passes test_gpt2.cu's check when its ratio <= 1.
The summary says whether all ratios are <= 1 ("llm.c thresholds: pass") and whether all are <= 0.5
("target (every ratio <= 0.5): met": our target, twice as tight as llm.c). The per-tensor OK/NOT OK,
"overall okay" and the exit status use --target R (default 1, test_gpt2.cu's thresholds): every ratio must be
<= R, so --target 0.5 makes the exit status follow that target. --atol/--rtol are the fp32 check's
and --target the bf16 check's: giving one in the other mode is an error.

The CUDA trainer's run settings pass through: -fa/--flash 1|0 (flash attention, its default: 1 where the
kernel runs, bf16 at head size 64 or 128; elsewhere the materialized path runs and [State] says why; 0 the
materialized path) and -ge/--gelu_fusion 0|1|2 (GELU in cuBLASLt's epilogues; default 0, as the trainer's).
[State] names the attention path that ran, so two runs (-fa 1, -fa 0) report each path's ratios.
"""

import argparse
import importlib
import os
import re
import sys
import time

import numpy as np

from llmc import formats  # llm.c's file formats and the [GPT-2] config block
from llmc.model import param_shapes, print_config

N_SHOW = 5  # values printed side by side per tensor

# llm.c's own expected losses (test_gpt2.cu), for a debug state written by llm.c's train_gpt2.py, which records
# none: GPT-2 124M weights, the first batch of tiny_shakespeare_val.bin, AdamW lr 1e-4, betas (0.9, 0.95),
# eps 1e-8, no weight decay, gradient clipping at 1.0.
LLMC_124M_LOSSES = [5.270009, 4.060681, 3.320085, 2.717550, 2.181066,
                    1.653923, 1.168050, 0.736873, 0.401021, 0.187493]
LLMC_124M_OPTIMIZER = dict(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0)
HF_NAMES = {"124M": "gpt2", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}

# test_gpt2.cu's bf16 tolerances: absolute thresholds (set by hand in llm.c from the errors it saw), plus, for
# the gradients only, a relative term of 0.079 |ref|
BF16_LOGITS_THRESHOLD = 25.0
BF16_LOSS_THRESHOLD = 0.05
BF16_GRAD_THRESHOLDS = dict(wte=5e-1, wpe=4e-3, ln1w=1e-1, ln1b=4e-2, qkvw=5e-2, qkvb=3.5e-2,
                            attprojw=2e-2, attprojb=3e-2, ln2w=5e-2, ln2b=3e-2, fcw=3e-2, fcb=3e-2,
                            fcprojw=2e-2, fcprojb=1e-2, lnfw=1e-1, lnfb=2e-2)
BF16_GRAD_REL = 0.079
BF16_TARGET = 0.5  # our target ratio: every tensor within half of test_gpt2.cu's tolerance


def export_command(checkpoint):
    """The exporter command that writes `checkpoint` (guessed from its llm.c-style name)."""
    name = os.path.basename(checkpoint)
    m = re.fullmatch(r"gpt2_(.+?)(_bf16)?(_debug_state)?\.bin", name)
    size = m.group(1) if m else "d12"
    if size in HF_NAMES:
        return f"python train_gpt2_torch.py --model {HF_NAMES[size]}"
    m = re.fullmatch(r"L(\d+)H(\d+)C(\d+)T(\d+)(?:V(\d+))?", size)
    if m:
        flags = f"--n_layer {m[1]} --n_head {m[2]} --n_embd {m[3]} --block_size {m[4]}"
        return f"python train_gpt2_torch.py {flags}" + (f" --vocab_size {m[5]}" if m[5] else "")
    return "python train_gpt2_torch.py --model " + (size if re.fullmatch(r"d\d+", size) else "d12")


def default_debug_state(checkpoint):
    """gpt2_d12.bin -> gpt2_d12_debug_state.bin (a bf16 checkpoint shares its fp32 twin's state)."""
    stem = re.sub(r"(_bf16)?\.bin$", "", checkpoint)
    return stem + "_debug_state.bin"


def check_tensor(name, ours, ref, atol, rtol):
    """Print the first values of `ours` and `ref` side by side and their errors; return True if
    |ours - ref| <= atol + rtol * |ref| everywhere (NaN or inf in ours fails)."""
    ours = np.asarray(ours, dtype=np.float32).ravel()
    ref = np.asarray(ref, dtype=np.float32).ravel()
    assert ours.size == ref.size, f"{name}: {ours.size} values, reference has {ref.size}"
    err = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    tol = atol + rtol * np.abs(ref.astype(np.float64))
    ok = bool(np.all(err <= tol))  # False on NaN
    big = np.abs(ref) > atol       # relative error is only meaningful away from zero
    max_abs = float(err.max()) if err.size else 0.0
    max_rel = float((err[big] / np.abs(ref[big])).max()) if big.any() else 0.0
    worst = float((err / tol).max()) if err.size else 0.0
    print(f"{name:<40} {'ours':>12} {'ref':>12}")
    for a, b in zip(ours[:N_SHOW], ref[:N_SHOW]):
        print(f"{'':<40} {a: 12.8f} {b: 12.8f}")
    bad = int(np.count_nonzero(~(err <= tol)))
    verdict = "OK" if ok else f"NOT OK ({bad} of {err.size} values out of tolerance)"
    print(f"  max abs err {max_abs:.3e}  max rel err {max_rel:.3e} (|ref| > atol)  err/tol {worst:.3f}  {verdict}")
    return ok


def bf16_ratio(name, ours, ref, threshold, rel, limit):
    """test_gpt2.cu's bf16 check of one tensor: print the first values side by side, the largest error and
    the ratio max |ours - ref| / (threshold + rel |ref|) (NaN or inf in ours: ratio inf); return the ratio.
    OK when ratio <= limit (1 = test_gpt2.cu's own verdict)."""
    ours = np.asarray(ours, dtype=np.float32).ravel()
    ref = np.asarray(ref, dtype=np.float32).ravel()
    assert ours.size == ref.size, f"{name}: {ours.size} values, reference has {ref.size}"
    err = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    tol = threshold + rel * np.abs(ref.astype(np.float64))
    ratios = np.where(np.isfinite(err), err / tol, np.inf)
    ratio = float(ratios.max()) if ratios.size else 0.0
    max_abs = float(err.max()) if err.size else 0.0
    print(f"{name:<40} {'ours':>12} {'ref':>12}")
    for a, b in zip(ours[:N_SHOW], ref[:N_SHOW]):
        print(f"{'':<40} {a: 12.8f} {b: 12.8f}")
    rule = f"{threshold:g}" + (f" + {rel:g}|ref|" if rel else "")
    bad = int(np.count_nonzero(~(ratios <= limit)))
    verdict = "OK" if ratio <= limit else f"NOT OK ({bad} of {err.size} values over {limit:g}x the tolerance)"
    print(f"  max abs err {max_abs:.3e}  tolerance {rule}  ratio {ratio:.4f}  {verdict}")
    return ratio


def choose_precision(args, trainer):
    """--precision, or its default: fp32 for the NumPy trainer; for the CUDA one the trainer's own default,
    bf16 where the GPU has it (SM >= 80, the emulator included), else fp32."""
    if args.trainer == "numpy":
        return args.precision or "fp32"
    trainer.require_gpu()  # without a GPU: its one line (SystemExit), before asking the GPU anything
    return args.precision or ("bf16" if trainer.compute_capability() >= 80 else "fp32")


def no_gpu(e):
    """train_gpt2_cuda.py without a GPU: its one line, plus the CPU way."""
    print(f"{e}; or, for a tiny model, on the kernel emulator: LLMC_EMULATE=1 python test_gpt2.py --trainer cuda "
          f"--checkpoint ...", file=sys.stderr)
    return 1


def main(argv=None):
    parser = argparse.ArgumentParser(description="Compare a trainer with PyTorch's debug state.")
    parser.add_argument("--checkpoint", default=None,
                        help="model file (v3 fp32 or v5 bf16); default gpt2_d12.bin "
                             "(gpt2_124M.bin if only it is there)")
    parser.add_argument("--debug_state", default=None, help="default: the checkpoint's name + _debug_state.bin")
    parser.add_argument("--trainer", default="numpy", choices=["numpy", "cuda"],
                        help="numpy = train_gpt2.py, cuda = train_gpt2_cuda.py (LLMC_EMULATE=1 runs it on a CPU)")
    parser.add_argument("--precision", default=None, choices=["bf16", "fp32"],
                        help="default: fp32 for --trainer numpy; for --trainer cuda bf16 where the GPU has it "
                             "(SM >= 80, and the emulator), else fp32")
    parser.add_argument("-w", "--master_weights", type=int, default=1, choices=[0, 1],
                        help="bf16: keep fp32 master weights for AdamW (1, default) or update the bf16 weights (0)")
    parser.add_argument("--atol", type=float, default=None, help="fp32 check: default 1e-4")
    parser.add_argument("--rtol", type=float, default=None, help="fp32 check: default 1e-4")
    parser.add_argument("--target", type=float, default=None,
                        help="bf16 check: the largest ratio |ours - ref| / tolerance that passes, for the verdicts and "
                             "the exit status (default 1 = test_gpt2.cu's thresholds; 0.5 = our target, twice as tight)")
    parser.add_argument("--steps", type=int, default=-1, help="training steps to check (-1 = all recorded)")
    parser.add_argument("-fa", "--flash", type=int, default=None, choices=[0, 1],
                        help="--trainer cuda: attention, as train_gpt2_cuda.py's -fa: 1 flash where it runs (bf16, "
                             "head size 64 or 128; the default), 0 the materialized (B,NH,T,T) path")
    parser.add_argument("-ge", "--gelu_fusion", type=int, default=None, choices=[0, 1, 2],
                        help="--trainer cuda: GELU fused into the fc GEMMs by cuBLASLt, as train_gpt2_cuda.py's -ge "
                             "(default 0)")
    args = parser.parse_args(argv)
    if args.trainer == "numpy" and args.precision == "bf16":
        parser.error("--precision bf16 needs --trainer cuda (the NumPy trainer is fp32 only)")
    if args.trainer == "numpy" and (args.flash is not None or args.gelu_fusion is not None):
        parser.error("-fa and -ge are the CUDA trainer's settings: add --trainer cuda (the NumPy trainer has one "
                     "attention path and no GELU fusion)")
    if args.target is not None and args.target <= 0:
        parser.error(f"--target must be > 0, got {args.target:g}")
    if args.checkpoint is None:  # llm.c's files (python train_gpt2_torch.py --model gpt2) work too
        only_124m = not os.path.exists("gpt2_d12.bin") and os.path.exists("gpt2_124M.bin")
        args.checkpoint = "gpt2_124M.bin" if only_124m else "gpt2_d12.bin"
    state_path = args.debug_state or default_debug_state(args.checkpoint)
    for path in (args.checkpoint, state_path):
        if not os.path.exists(path):
            print(f"test_gpt2.py: {path}: no such file; create it with {export_command(path)}", file=sys.stderr)
            return 1

    module_name = "train_gpt2" if args.trainer == "numpy" else "train_gpt2_cuda"
    try:
        trainer = importlib.import_module(module_name)
    except ImportError as e:  # e.g. no CuPy and LLMC_EMULATE unset
        print(f"test_gpt2.py: cannot import {module_name}: {e}", file=sys.stderr)
        return 1
    to_numpy = getattr(trainer, "to_numpy", np.asarray)

    try:
        precision = choose_precision(args, trainer)
    except SystemExit as e:
        return no_gpu(e)
    bf16 = precision == "bf16"
    if bf16 and (args.atol is not None or args.rtol is not None):
        parser.error("--atol/--rtol set the fp32 check; bf16 uses test_gpt2.cu's thresholds (scale them with --target)")
    if not bf16 and args.target is not None:
        parser.error("--target is the bf16 check's; the fp32 check takes --atol/--rtol")
    if bf16 and trainer.compute_capability() < 80:
        print(f"test_gpt2.py: --precision bf16 needs a GPU with bf16 (SM >= 80); {trainer.device_name()} is "
              f"sm_{trainer.compute_capability()}: use --precision fp32", file=sys.stderr)
        return 1
    atol = 1e-4 if args.atol is None else args.atol
    rtol = 1e-4 if args.rtol is None else args.rtol
    limit = 1.0 if args.target is None else args.target  # bf16: the largest ratio that passes

    flash = 1 if args.flash is None else args.flash           # the trainer's default: flash where it runs
    gelu_fusion = args.gelu_fusion or 0
    if args.trainer == "cuda" and gelu_fusion:
        why_not = trainer.cublaslt_available()                 # as the trainer's device_setup: say so, run -ge 0
        if why_not is not None:
            print(f"-ge {gelu_fusion}: cuBLASLt cannot be loaded ({why_not}): running -ge 0 (no GELU fusion)")
            gelu_fusion = 0
    try:
        if args.trainer == "cuda":  # bf16 from a v3 file: the weights rounded at load, fp32 masters kept (-w 1)
            model = trainer.gpt2_build_from_checkpoint(args.checkpoint, precision=precision,
                                                       master_weights=bool(args.master_weights),
                                                       gelu_fusion=gelu_fusion, flash_attention=flash)
        else:
            model = trainer.gpt2_build_from_checkpoint(args.checkpoint)
        config = model.config
        state = formats.read_debug_state(state_path, config)
    except (formats.FormatError, FileNotFoundError) as e:
        print(f"test_gpt2.py: {e}", file=sys.stderr)
        return 1
    except SystemExit as e:
        return no_gpu(e)
    B, T = state.x.shape
    V, Vp = config.vocab_size, config.padded_vocab_size
    if T > config.max_seq_len:
        print(f"test_gpt2.py: {state_path}: T={T} exceeds the model's max_seq_len {config.max_seq_len}; "
              f"re-run {export_command(args.checkpoint)}", file=sys.stderr)
        return 1

    losses, optimizer = state.losses, state.optimizer
    source = "PyTorch's, recorded in the state"
    # a state written by llm.c's own train_gpt2.py records no losses; if it is llm.c's test setup (GPT-2 124M
    # weights, tiny shakespeare val's first batch: its step-0 loss says so), llm.c's table stands in
    llmc_setup = (config.num_layers, config.channels, V, B, T) == (12, 768, 50257, 4, 64) \
        and abs(state.loss - LLMC_124M_LOSSES[0]) < 1e-3
    if losses.size == 0 and llmc_setup:
        losses, optimizer = np.array(LLMC_124M_LOSSES, dtype=np.float32), LLMC_124M_OPTIMIZER
        source = "llm.c's test_gpt2.cu table (state records none)"
    nsteps = losses.size if args.steps < 0 else min(args.steps, losses.size)

    print_config(config)  # [GPT-2]: the model's shape and parameter count, as the trainers print it
    print("[State]")
    print(f"checkpoint: {args.checkpoint}")
    print(f"debug_state: {state_path}")
    print(f"trainer: {module_name}")
    if args.trainer == "cuda":
        print(model.attention_line)
        print(f"gelu fusion: -ge {gelu_fusion}")
    print(f"batch_size: {B}")
    print(f"seq_len: {T}")
    print(f"steps: {nsteps} (losses: {source})" if nsteps else "steps: 0 (the state records no losses)")
    if nsteps:
        print("optimizer: " + " ".join(f"{k} {v:g}" for k, v in optimizer.items()))
    if bf16:
        print(f"precision: bf16, {'fp32 master weights (-w 1)' if args.master_weights else 'no master weights (-w 0)'}"
              f"; the reference is PyTorch's fp32")
        print(f"tolerance: test_gpt2.cu's bf16 ones: logits {BF16_LOGITS_THRESHOLD:g}, losses {BF16_LOSS_THRESHOLD:g}, "
              f"gradients threshold + {BF16_GRAD_REL:g}|ref|; ratio = max |ours - ref| / tolerance, OK when <= {limit:g}")
    else:
        print(f"tolerance: |ours - ref| <= {atol:g} + {rtol:g} * |ref|")
    if formats.read_header(args.checkpoint, formats.MODEL_MAGIC, (3, 5))[0][1] == 5:
        print("note: a bf16 checkpoint; the state was computed from fp32 weights, so expect differences of bf16 size")

    def check(name, ours, ref, threshold, rel=0.0):
        """One tensor: fp32, atol + rtol |ref| (True if it passes); bf16, test_gpt2.cu's rule (the ratio
        goes into `ratios`, True if it is <= limit)."""
        if not bf16:
            return check_tensor(name, ours, ref, atol, rtol)
        ratios[name.split(" ")[0]] = bf16_ratio(name, ours, ref, threshold, rel, limit)
        return ratios[name.split(" ")[0]] <= limit

    ratios = {}       # bf16: tensor name -> its ratio
    step_ratios = []  # bf16: each training step's loss ratio
    allok = True
    x, y = state.x, state.y
    shapes = param_shapes(config)
    # step 0 checks the forward and backward passes; every step checks the loss, then updates
    for step in range(max(nsteps, 1)):
        t0 = time.perf_counter()
        trainer.gpt2_zero_grad(model)
        trainer.gpt2_forward(model, x, y, B, T)
        loss = float(model.mean_loss)
        if step == 0:
            print("\n[forward]")
            logits = to_numpy(model.acts.logits).reshape(B, T, Vp)[:, :, :V]  # (B,T,Vp) -> (B,T,V)
            allok &= check(f"logits (B,T,V)={state.logits.shape}", logits, state.logits, BF16_LOGITS_THRESHOLD)
            allok &= check("loss", [loss], [state.loss], BF16_LOSS_THRESHOLD)
        trainer.gpt2_backward(model)
        if step == 0:
            print("\n[backward]")
            grads = to_numpy(model.grads_memory)
            offset = 0
            for name, shape in shapes:
                n = int(np.prod(shape))
                label = f"d{name} {shape}"
                allok &= check(label, grads[offset:offset + n], state.grads[offset:offset + n],
                               BF16_GRAD_THRESHOLDS[name], BF16_GRAD_REL)
                offset += n
            if nsteps:
                print("\n[training]")
        if nsteps == 0:
            break
        norm = trainer.gpt2_calculate_grad_norm(model)
        scale = trainer.grad_clip_scale(norm, optimizer["grad_clip"])
        trainer.gpt2_update(model, optimizer["learning_rate"], optimizer["beta1"], optimizer["beta2"],
                            optimizer["eps"], optimizer["weight_decay"], step + 1, grad_scale=scale)
        took = (time.perf_counter() - t0) * 1000
        ref = float(losses[step])
        err = abs(loss - ref)
        if bf16:
            ratio = err / BF16_LOSS_THRESHOLD if np.isfinite(loss) else np.inf
            step_ratios.append(ratio)
            ok = ratio <= limit
            allok &= ok
            print(f"step {step}: loss {loss:.6f} expected {ref:.6f} err {err:.2e} norm {norm:.4f} ratio {ratio:.4f} "
                  f"{'OK' if ok else 'NOT OK'} (took {took:.0f} ms)")
            continue
        ok = err <= atol + rtol * abs(ref)
        allok &= ok
        print(f"step {step}: loss {loss:.6f} expected {ref:.6f} err {err:.2e} norm {norm:.4f} "
              f"{'OK' if ok else 'NOT OK'} (took {took:.0f} ms)")

    if bf16:
        if step_ratios:
            ratios[f"losses ({len(step_ratios)} steps, worst)"] = max(step_ratios)
        worst = max(ratios, key=ratios.get)
        print("\n[bf16 summary] ratio = max |ours - ref| / (threshold + rel |ref|), per tensor")
        for name, ratio in ratios.items():
            print(f"ratio {name:<28} {ratio:.4f}")
        llmc_ok = all(r <= 1.0 for r in ratios.values())
        target_ok = all(r <= BF16_TARGET for r in ratios.values())
        print(f"worst: {worst} {ratios[worst]:.4f}")
        print(f"llm.c thresholds (every ratio <= 1): {'pass' if llmc_ok else 'FAIL'}")
        print(f"target (every ratio <= {BF16_TARGET:g}): {'met' if target_ok else 'NOT met'}")
        if limit not in (1.0, BF16_TARGET):
            print(f"--target (every ratio <= {limit:g}): {'met' if allok else 'NOT met'}")
    print(f"overall okay: {int(allok)}")
    return 0 if allok else 1


if __name__ == "__main__":
    sys.exit(main())
