"""dev/eval/summarize_eval.py on result files this test writes in both layouts the harness has used (llm.c's
pinned b281b09 and lm-eval 0.4), with the scores computed here by hand; dev/eval/run_eval.sh's one-line stops;
and, where lm-eval is installed (it is optional: not in CI), run_eval.sh itself on a tiny export and a
multiple-choice task whose data this test writes (no network), its accuracy checked against our own
scoring of the same questions."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, run_script

import summarize_eval

# llm.c's six evals as this test's harness "scored" them: {file: (results, the score llm.c's table shows)}
OLD = {   # b281b09's layout: one entry per task, metrics by name; MMLU as 3 subjects (of 57)
    "arc_challenge_25shot.json": ({"arc_challenge": {"acc": 0.2, "acc_norm": 0.25}}, 25.0),
    "gsm8k_5shot.json": ({"gsm8k": {"acc": 0.01}}, 1.0),
    "hellaswag_10shot.json": ({"hellaswag": {"acc": 0.3, "acc_norm": 0.375}}, 37.5),
    "mmlu_5shot.json": ({"hendrycksTest-anatomy": {"acc": 0.2}, "hendrycksTest-virology": {"acc": 0.3},
                         "hendrycksTest-marketing": {"acc": 0.4}}, 30.0),
    "truthfulqa_0shot.json": ({"truthfulqa_mc": {"mc1": 0.2, "mc2": 0.45}}, 45.0),
    "winogrande_5shot.json": ({"winogrande": {"acc": 0.5}}, 50.0),
}
OLD_AVERAGE = (25.0 + 1.0 + 37.5 + 30.0 + 45.0 + 50.0) / 6


def write_json(path, results, **extra):
    with open(path, "w") as f:
        json.dump({"results": results, **extra}, f)


def table(out):
    """{name: value or 'missing'} and the average line's text, from summarize_eval's output."""
    rows = {}
    for line in out.splitlines():
        if " : " in line:
            name, value = (part.strip() for part in line.split(" : "))
            rows[name] = value
    return rows


def summarize(capsys, *argv):
    code = summarize_eval.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_llmc_harness_layout(capsys, tmp_path):
    for name, (results, _) in OLD.items():
        write_json(tmp_path / name, results, versions={})
    code, out, err = summarize(capsys, tmp_path)
    assert code == 0, err
    rows = table(out)
    for name, (_, want) in OLD.items():
        assert rows[name] == f"{want:.4f}"
    assert rows["Average Score"] == f"{OLD_AVERAGE:.4f}"


def test_lm_eval_04_layout(capsys, tmp_path):
    """0.4: dated names (the newest counts), "metric,filter" keys, GSM8K's exact_match and TruthfulQA mc2's
    acc, and MMLU's group entries left out of the subjects' mean."""
    write_json(tmp_path / "arc_challenge_25shot_2026-01-01T00-00-00.json",
               {"arc_challenge": {"acc_norm,none": 0.9}})                    # older: not read
    write_json(tmp_path / "arc_challenge_25shot_2026-02-01T00-00-00.json",
               {"arc_challenge": {"alias": "arc_challenge", "acc,none": 0.2, "acc_norm,none": 0.25}})
    write_json(tmp_path / "gsm8k_5shot_2026-02-01T00-00-00.json",
               {"gsm8k": {"exact_match,strict-match": 0.02, "exact_match,flexible-extract": 0.05}})
    write_json(tmp_path / "hellaswag_10shot_2026-02-01T00-00-00.json", {"hellaswag": {"acc_norm,none": 0.375}})
    write_json(tmp_path / "mmlu_5shot_2026-02-01T00-00-00.json",
               {"mmlu": {"acc,none": 0.9}, "mmlu_stem": {"acc,none": 0.8}, "mmlu_humanities": {"acc,none": 0.7},
                "mmlu_anatomy": {"acc,none": 0.2}, "mmlu_virology": {"acc,none": 0.3},
                "mmlu_formal_logic": {"acc,none": 0.4}},
               groups={"mmlu": {}, "mmlu_stem": {}, "mmlu_humanities": {}},
               group_subtasks={"mmlu": ["mmlu_stem", "mmlu_humanities"], "mmlu_stem": ["mmlu_anatomy", "mmlu_virology"],
                               "mmlu_humanities": ["mmlu_formal_logic"], "mmlu_anatomy": []})
    write_json(tmp_path / "truthfulqa_0shot_2026-02-01T00-00-00.json", {"truthfulqa_mc2": {"acc,none": 0.45}})
    code, out, err = summarize(capsys, tmp_path)
    assert code == 0, err
    rows = table(out)
    assert rows["arc_challenge_25shot.json"] == "25.0000"
    assert rows["gsm8k_5shot.json"] == "2.0000"
    assert rows["mmlu_5shot.json"] == "30.0000"
    assert rows["truthfulqa_0shot.json"] == "45.0000"
    assert rows["winogrande_5shot.json"] == "missing"
    assert rows["Average Score"] == f"{(25 + 2 + 37.5 + 30 + 45) / 5:.4f}   (over 5 of 6: the others are missing)"


def test_other_evals(capsys, tmp_path):
    write_json(tmp_path / "tiny_mc_0shot_2026-02-01.json", {"tiny_mc": {"acc,none": 0.5, "acc_norm,none": 0.75}})
    code, out, _ = summarize(capsys, tmp_path, "--evals", "tiny_mc_0shot:acc_norm")
    assert code == 0
    assert table(out) == {"tiny_mc_0shot.json": "75.0000", "Average Score": "75.0000"}


@pytest.mark.parametrize("content, line", [
    ("{not json", "error: {f}: not a harness result file (JSONDecodeError"),
    ('{"results": {"hellaswag": {"acc,none": 0.3}}}', "error: {f}: no acc_norm for hellaswag"),
    ('{"config": {}}', "error: {f}: not a harness result file (KeyError"),
])
def test_bad_result_file_is_one_line(capsys, tmp_path, content, line):
    f = tmp_path / "hellaswag_10shot.json"
    f.write_text(content)
    code, _, err = summarize(capsys, tmp_path)
    assert code == 1
    assert err.strip().startswith(line.format(f=f)), err
    assert len(err.strip().splitlines()) == 1


def test_no_results_is_one_line(capsys, tmp_path):
    code, _, err = summarize(capsys, tmp_path / "nope")
    assert (code, err.strip()) == (1, f"error: {tmp_path / 'nope'}: no such folder; dev/eval/run_eval.sh writes "
                                      f"the results there")
    code, _, err = summarize(capsys, tmp_path)
    assert code == 1 and err.startswith(f"error: {tmp_path} holds none of arc_challenge_25shot.json, ")


def run_eval(*args, env=None, cwd=REPO):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(["bash", os.path.join(REPO, "dev", "eval", "run_eval.sh"), *map(str, args)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=600)


def test_run_eval_stops(tmp_path):
    r = run_eval()
    assert r.returncode == 1 and r.stdout.startswith("usage: bash dev/eval/run_eval.sh MODEL RESULT")
    if shutil.which("lm_eval") is None:
        r = run_eval(tmp_path, "x")
        assert r.returncode == 1
        assert r.stdout.strip() == ('error: lm_eval not found: pip install "lm-eval[hf]" (an optional dependency, '
                                    'see the README)')
    else:
        r = run_eval(tmp_path, "x")
        assert r.returncode == 1
        assert r.stdout.strip().startswith(f"error: {tmp_path} is not a Hugging Face export (no config.json)")


TINY_MC = [("The sky is", ["blue", "green", "loud", "wet"], 0), ("Two plus two is", ["four", "five", "six", "ten"], 0),
           ("Cats say", ["meow", "moo", "woof", "quack"], 0), ("Fire is", ["hot", "cold", "blue", "soft"], 0),
           ("Water is", ["wet", "dry", "red", "tall"], 1),
           ("The sun rises in the", ["east", "west", "north", "south"], 2)]


def write_task(folder):
    """A multiple-choice task of the harness's kind on a jsonl of TINY_MC: its YAML and data in `folder`."""
    import json
    os.makedirs(folder)
    data = os.path.join(folder, "tiny_mc.jsonl")
    with open(data, "w") as f:
        for question, choices, label in TINY_MC:
            f.write(json.dumps({"question": question, "choices": choices, "label": label}) + "\n")
    with open(os.path.join(folder, "tiny_mc.yaml"), "w") as f:
        f.write(f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
                "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\nmetric_list:\n  - metric: acc\n")


def our_accuracy(model_file):
    """acc as the harness defines it (the choice of largest summed log-likelihood after the question and a
    space), from our own PyTorch model and dev/data/hellaswag.py's scorer."""
    import tiktoken
    from hellaswag import load_model, score_example
    enc = tiktoken.get_encoding("gpt2")
    model = load_model(model_file, "cpu")
    right = 0
    for question, choices, label in TINY_MC:
        total, _ = score_example(model, enc.encode(question), [enc.encode(" " + c) for c in choices], "cpu")
        right += int(total.argmin()) == label
    return 100.0 * right / len(TINY_MC)


def test_run_eval_with_lm_eval(tmp_path, tiny_export):
    """run_eval.sh end to end where lm-eval is installed (it is optional, and not in CI): a tiny export, a
    task whose data is written here, offline; the table's accuracy is ours for the same questions."""
    pytest.importorskip("lm_eval")
    r = run_script("dev/eval/export_hf.py", "-i", tiny_export.model, "-o", tmp_path / "hf", "-d", "float32",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    write_task(str(tmp_path / "tasks"))
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")   # lm_eval beside python
    r = run_eval(tmp_path / "hf", "tiny", env={"PATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                               "EVALS": "tiny_mc:0", "INCLUDE_PATH": str(tmp_path / "tasks"),
                                               "DEVICE": "cpu", "RESULTS_DIR": str(tmp_path / "results")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert [p for p in os.listdir(tmp_path / "results" / "tiny") if p.startswith("tiny_mc_0shot_")]
    rows = table(r.stdout.split("-" * 40, 1)[1])
    assert rows["tiny_mc_0shot.json"] == f"{our_accuracy(tiny_export.model):.4f}"
