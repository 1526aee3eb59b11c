"""
llm.c's table of the Eleuther harness's scores (dev/eval/summarize_eval.py): one line per eval, in percent,
and their mean, from the result files dev/eval/run_eval.sh leaves in a folder.

  python dev/eval/summarize_eval.py eval_results/my_run
  python dev/eval/summarize_eval.py eval_results/my_run --evals hellaswag_10shot:acc_norm,winogrande_5shot:acc

llm.c's six evals (the Open LLM Leaderboard's of 2024): ARC-Challenge 25-shot (acc_norm), GSM8K 5-shot (acc),
HellaSwag 10-shot (acc_norm), MMLU 5-shot (acc, the mean over its 57 subjects), TruthfulQA 0-shot (mc2) and
Winogrande 5-shot (acc). Each eval's result is <name>.json in the folder (llm.c's harness, b281b09, wrote
that name) or <name>_<date>.json (lm-eval 0.4, which adds the date; the newest counts). Both layouts of
"results" are read: llm.c's harness keys a metric by its name ("acc_norm"), lm-eval 0.4 by its name and
filter ("acc_norm,none"); 0.4 names GSM8K's score exact_match (strict-match) and TruthfulQA mc2's acc, which
ALIASES maps. A task made of others (MMLU) scores as the mean over its subjects, as llm.c averages them:
0.4's group entries ("mmlu", "mmlu_humanities") are left out of that mean, the leaves counted once each.
An eval with no result file is listed as missing, and the mean then covers only the others, which the
last line says.
"""

import argparse
import glob
import json
import os
import sys

LLMC_EVALS = (("arc_challenge_25shot", "acc_norm"), ("gsm8k_5shot", "acc"), ("hellaswag_10shot", "acc_norm"),
              ("mmlu_5shot", "acc"), ("truthfulqa_0shot", "mc2"), ("winogrande_5shot", "acc"))
# lm-eval 0.4's names for llm.c's metrics, tried after the metric's own name
ALIASES = {"acc": ("exact_match,strict-match",), "mc2": ("acc",)}


class Unreadable(Exception):
    """A result file that is not the harness's JSON, or lacks the metric: one line, exit status 1."""


def result_file(folder, name):
    """<name>.json, else the newest <name>_<date>.json, else None."""
    exact = os.path.join(folder, f"{name}.json")
    if os.path.isfile(exact):
        return exact
    dated = sorted(glob.glob(os.path.join(glob.escape(folder), f"{name}_*.json")))
    return dated[-1] if dated else None


def metric_of(scores, metric):
    """A task's value of `metric` (llm.c's name) from its scores dict, or None."""
    for key in (metric, *ALIASES.get(metric, ())):
        for spelled in (key, f"{key},none") if "," not in key else (key,):
            if isinstance(scores.get(spelled), (int, float)):
                return float(scores[spelled])
    return None


def leaf_tasks(data):
    """The task names of a result file that are not groups of others (lm-eval 0.4's group_subtasks names
    the groups; llm.c's harness has none)."""
    groups = {name for name, members in data.get("group_subtasks", {}).items() if members}
    groups |= set(data.get("groups", {}))
    return [name for name in data["results"] if name not in groups]


def score(path, metric):
    """The eval's score in percent: the mean of `metric` over the file's leaf tasks."""
    try:
        with open(path) as f:
            data = json.load(f)
        tasks = leaf_tasks(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise Unreadable(f"{path}: not a harness result file ({type(e).__name__}: {e})") from None
    values = [metric_of(data["results"][task], metric) for task in tasks]
    missing = [task for task, v in zip(tasks, values) if v is None]
    if not tasks or missing:
        raise Unreadable(f"{path}: no {metric} for {', '.join(missing) or 'any task'}")
    return 100.0 * sum(values) / len(values)


def parse_evals(text):
    try:
        pairs = [item.split(":") for item in text.split(",")]
        return tuple((name, metric) for name, metric in pairs)
    except ValueError:
        raise SystemExit(f"error: --evals {text}: give name:metric pairs separated by commas, "
                         f"e.g. hellaswag_10shot:acc_norm") from None


def summarize(folder, evals=LLMC_EVALS):
    """Print llm.c's table; returns the lines' scores {name: percent or None}."""
    found = {}
    print("-" * 40)
    for name, metric in evals:
        path = result_file(folder, name)
        found[name] = None if path is None else score(path, metric)
        shown = "missing" if found[name] is None else f"{found[name]:.4f}"
        print(f"{name + '.json':<30} : {shown}")
    print("-" * 40)
    present = [v for v in found.values() if v is not None]
    average = sum(present) / len(present)
    note = "" if len(present) == len(evals) else f"   (over {len(present)} of {len(evals)}: the others are missing)"
    print(f"{'Average Score':<30} : {average:.4f}{note}")
    return found


def main(argv=None):
    p = argparse.ArgumentParser(description="llm.c's table of Eleuther harness results")
    p.add_argument("folder", help="the folder run_eval.sh wrote the result files into")
    p.add_argument("--evals", default="", help="name:metric pairs instead of llm.c's six, comma-separated")
    args = p.parse_args(argv)
    evals = parse_evals(args.evals) if args.evals else LLMC_EVALS
    if not os.path.isdir(args.folder):
        print(f"error: {args.folder}: no such folder; dev/eval/run_eval.sh writes the results there", file=sys.stderr)
        return 1
    if all(result_file(args.folder, name) is None for name, _ in evals):
        names = ", ".join(f"{name}.json" for name, _ in evals)
        print(f"error: {args.folder} holds none of {names}: run dev/eval/run_eval.sh first", file=sys.stderr)
        return 1
    try:
        summarize(args.folder, evals)
    except Unreadable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
