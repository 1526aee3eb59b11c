#!/usr/bin/env bash
# The Eleuther harness (lm-evaluation-harness) on a Hugging Face export, llm.c's dev/eval/run_eval.sh:
# the six evals of the Open LLM Leaderboard (2024) that llm.c reports, then their table (summarize_eval.py).
#
#   pip install "lm-eval[hf]"                                   # optional: not in requirements.txt
#   python dev/eval/export_hf.py -i log_gpt2_124M/model_00018865.bin -o gpt2_124M_hf -d float32
#   bash dev/eval/run_eval.sh gpt2_124M_hf my_run               # results in eval_results/my_run/
#
# MODEL is an export's folder (or a Hub name such as openai-community/gpt2); RESULT names the folder under
# $RESULTS_DIR (eval_results) that gets one JSON per eval. llm.c pinned the harness at b281b09 (2023), whose
# command line and task names (hendrycksTest-*, truthfulqa_mc) lm-eval 0.4 replaced: this script speaks 0.4's
# (lm_eval --model hf; mmlu, truthfulqa_mc2), with llm.c's shots, batch size 1 and result names. The scores
# can differ a little from the old harness's. llm.c found bf16 exports scoring lower unless the model runs
# with flash attention 2: export with -d float32, or set DTYPE. Expect hours on a GPU (llm.c: 1-3 h for 774M).
#
# Settings (environment): DEVICE (cuda), DTYPE (float32), BATCH_SIZE (1), RESULTS_DIR (eval_results),
# EVALS: "task:shots ..." instead of llm.c's six (a task of your own: put its YAML in a folder and name it
# in INCLUDE_PATH; tests/test_eval.py runs one that way, offline).
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ $# -ne 2 ]; then
    echo "usage: bash dev/eval/run_eval.sh MODEL RESULT   (an HF export's folder or Hub name; the results' folder name)"
    exit 1
fi
model=$1
result=${RESULTS_DIR:-eval_results}/$2
if ! command -v lm_eval > /dev/null; then
    echo "error: lm_eval not found: pip install \"lm-eval[hf]\" (an optional dependency, see the README)"
    exit 1
fi
# a folder (or a path: ./x, /x) must be an export; anything else is a name on the Hugging Face Hub
if { [ -e "$model" ] || [[ "$model" == .* || "$model" == /* ]]; } && [ ! -f "$model/config.json" ]; then
    echo "error: $model is not a Hugging Face export (no config.json):" \
        "python dev/eval/export_hf.py -i MODEL.bin -o $model"
    exit 1
fi

# llm.c's evals: the harness's task name and its number of shots; the result file is <task>_<shots>shot.json,
# under the names llm.c's summarize_eval.py reads (truthfulqa_mc2 -> truthfulqa)
evals=${EVALS:-"truthfulqa_mc2:0 winogrande:5 arc_challenge:25 hellaswag:10 gsm8k:5 mmlu:5"}
include=()
[ -z "${INCLUDE_PATH:-}" ] || include=(--include_path "$INCLUDE_PATH")
echo "evaluating $model into $result"
names=()
for item in $evals; do
    task=${item%:*} shots=${item#*:}
    name="${task%_mc2}_${shots}shot"
    names+=("$name:$( [ "$task" = hellaswag ] || [ "$task" = arc_challenge ] && echo acc_norm || echo acc )")
    lm_eval --model hf --model_args "pretrained=$model,dtype=${DTYPE:-float32}" --tasks "$task" \
        --num_fewshot "$shots" --batch_size "${BATCH_SIZE:-1}" --device "${DEVICE:-cuda}" \
        --output_path "$result/$name.json" "${include[@]}"
done
if [ -z "${EVALS:-}" ]; then
    python3 dev/eval/summarize_eval.py "$result"
else
    python3 dev/eval/summarize_eval.py "$result" --evals "$(IFS=,; echo "${names[*]}")"
fi
