"""
A run's train losses against expected ones, each within a tolerance in percent, as llm.c's
dev/loss_checker_ci.py does in its GPU CI (the exit status is the verdict: 0 all within, 1 not, 2 a file
that cannot be checked).

  python dev/loss_checker_ci.py -f log/main.log -a 5                # against llm.c's table (below)
  python dev/loss_checker_ci.py -f run.txt -a 1 --reference ref/main.log   # against another run's losses
  python dev/loss_checker_ci.py -f log/main.log -a 0.5 --expected 10.85,10.84,10.82

-f reads a main.log (the `s:<step> trl:<loss>` lines; where a resumed run logged a step twice, the later
line counts) or a trainer's captured output, whose step lines it finds by their words, not by columns as
llm.c's -s/-e do: ours (`step    1/10: train loss 5.270009`), train_gpt2_torch.py's (`step    1/10 | train
loss ...`) and llm.c's (`step    1/10 | loss 5.270009 ...`). Its first N losses are compared with the N
expected ones: by default llm.c's (test_gpt2.cu's ten losses for GPT-2 124M on the first batch of tiny
shakespeare's val split, AdamW lr 1e-4, betas (0.9, 0.95), clipping at 1.0: what llm.c's GPU CI checks
`train_gpt2cu -b 1 -t 64 -d 256 -l 0.0001 -a 1 -x 10 -r 0 -f 0 -e gpt2_124M.bin` against, at -a 5);
--expected gives them on the command line, --reference takes them from another run's file.
"""

import argparse
import math
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from test_gpt2 import LLMC_124M_LOSSES  # noqa: E402  (llm.c's table, kept once, where test_gpt2.py checks it)

MAIN_LOG_LINE = re.compile(r"^s:(\d+) trl:(\S+)")
STEP_LINE = re.compile(r"^step\s+(\d+)/\d+\s*[:|]\s*(?:train )?loss\s+(\S+)")


class Unreadable(Exception):
    """A file with no losses to check, or one that says nothing: one line, exit status 2."""


def read_losses(path):
    """The train losses of a main.log or a trainer's output, in step order (1-based steps in the output,
    0-based s: in main.log; a step logged twice keeps its later value)."""
    if not os.path.isfile(path):
        raise Unreadable(f"{path}: no such file")
    by_step = {}
    with open(path, errors="replace") as f:
        for line in f:
            found = MAIN_LOG_LINE.match(line) or STEP_LINE.match(line.strip())
            if found:
                by_step[int(found[1])] = to_float(found[2], path, line)
    if not by_step:
        raise Unreadable(f"{path}: no train losses in it (neither main.log's 's:N trl:X' lines nor "
                         f"'step N/M: train loss X' lines)")
    return [by_step[step] for step in sorted(by_step)]


def to_float(text, path, line):
    try:
        return float(text)
    except ValueError:
        raise Unreadable(f"{path}: cannot read a loss in '{line.strip()}'") from None


def compare(losses, expected, percent):
    """Print a line per step; returns how many steps are off by more than `percent` (a NaN always is)."""
    bad = 0
    print(f"{'step':>4s} {'expected':>10s} {'read':>10s} {'diff %':>8s}")
    for step, (ours, want) in enumerate(zip(losses, expected), 1):
        diff = 100.0 * (ours - want) / abs(want) if want else (0.0 if ours == 0 else math.inf)
        off = not abs(diff) <= percent
        bad += off
        print(f"{step:4d} {want:10.6f} {ours:10.6f} {diff:+8.3f}{'  > ' + str(percent) + '%' if off else ''}")
    return bad


def main(argv=None):
    p = argparse.ArgumentParser(description="a run's train losses against expected ones, within a tolerance")
    p.add_argument("-f", "--file", required=True, help="main.log, or a trainer's captured output")
    p.add_argument("-a", "--percent_accuracy", type=float, default=5.0,
                   help="allowed difference from each expected loss, in percent (llm.c's CI: 5)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--expected", default="", help="the expected losses, comma-separated")
    source.add_argument("--reference", default="", help="a main.log or output whose losses are the expected ones")
    args = p.parse_args(argv)
    if not args.percent_accuracy >= 0:
        p.error(f"-a {args.percent_accuracy}: give a tolerance of 0 percent or more")
    try:
        expected = expected_losses(args, p)
        losses = read_losses(args.file)
    except Unreadable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(losses) < len(expected):
        print(f"error: {args.file} has {len(losses)} train losses, fewer than the {len(expected)} expected: "
              f"did the run stop early?", file=sys.stderr)
        return 2
    bad = compare(losses, expected, args.percent_accuracy)
    if bad:
        print(f"FAIL: {bad} of {len(expected)} losses differ from the expected by more than {args.percent_accuracy}%")
        return 1
    print(f"OK: all {len(expected)} losses within {args.percent_accuracy}% of the expected")
    return 0


def expected_losses(args, parser):
    if args.reference:
        return read_losses(args.reference)
    if not args.expected:
        return LLMC_124M_LOSSES
    try:
        return [float(v) for v in args.expected.split(",")]
    except ValueError:
        parser.error(f"--expected {args.expected}: give numbers separated by commas")


if __name__ == "__main__":
    sys.exit(main())
