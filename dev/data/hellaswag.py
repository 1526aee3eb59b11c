"""
HellaSwag -> llm.c's eval file, dev/data/hellaswag/hellaswag_val.bin, the file the trainers read with
-h 1; optionally scores a model on it in PyTorch, as llm.c's dev/data/hellaswag.py does.

  python dev/data/hellaswag.py                          # download hellaswag_val.jsonl, write the .bin
  python dev/data/hellaswag.py --input PATH.jsonl       # offline: a local copy of the jsonl
  python dev/data/hellaswag.py -m gpt2 -d cuda          # also score OpenAI's GPT-2 124M (transformers):
                                                        #   10042 acc: 0.2859 acc_norm: 0.2955 (llm.c's numbers)
  python dev/data/hellaswag.py -m gpt2_124M.bin -d cpu  # ... or an llm.c model file (train_gpt2_torch.py's GPT)

Each line of the jsonl is one example (https://github.com/rowanz/hellaswag): "ctx", the context, "label",
the index of the right ending, "endings", 4 endings (other fields are ignored). The context is tokenized
with GPT-2's tokenizer, and every ending with a space in front (" " + ending), as llm.c does. The file
layout is in llmc/hellaswag.py; it is byte-identical to llm.c's for the same jsonl.

Scoring (completion style): each ending's mean cross-entropy over its own tokens given the context; the
lowest is the prediction (acc_norm); acc uses the sum instead of the mean. llm.c's default evaluates
gpt2 on cuda every time; here the model is scored only when -m is given.

A re-run replaces its own .bin (an llm.c eval file); a file of another kind under that name stops the
run in one line before it downloads or writes anything. A failed write (a full disk) is one line and
leaves no half file.
"""

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from llmc.hellaswag import EVAL_MAGIC, NUM_COMPLETIONS, write_evalfile  # noqa: E402
from llmc.tokenizer import gpt2_encoding  # noqa: E402
from llmc.utils import has_magic, one_line_errors, refuse_foreign_files  # noqa: E402

DATA_CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag")
HELLASWAGS = {
    "train": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_train.jsonl",
    "val": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
}


def fetch(split, data_dir, url, local_copy):
    """The path of hellaswag_<split>.jsonl: `local_copy` as it is, else the file in data_dir, downloaded
    unless it is there."""
    if local_copy:
        if not os.path.isfile(local_copy):
            raise SystemExit(f"--input {local_copy}: no such file")
        return local_copy
    from llmc.download import download_once
    return download_once(url, os.path.join(data_dir, f"hellaswag_{split}.jsonl"),
                         "python dev/data/hellaswag.py --input PATH/hellaswag_val.jsonl")


def read_examples(path):
    """The jsonl's examples as (ctx, label, endings), each line checked: one line of error naming it."""
    examples = []
    with open(path, "r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
                ctx, label, endings = ex["ctx"], ex["label"], ex["endings"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SystemExit(f"{path}:{n}: not a HellaSwag example ({type(e).__name__}: {e}); "
                                 f"each line needs ctx, label, endings") from None
            label = int(label) if isinstance(label, str) and label.isdigit() else label
            if not isinstance(ctx, str) or not isinstance(endings, list) or len(endings) != NUM_COMPLETIONS \
                    or not all(isinstance(e, str) for e in endings) or label not in range(NUM_COMPLETIONS):
                raise SystemExit(f"{path}:{n}: expected a string ctx, {NUM_COMPLETIONS} string endings and a "
                                 f"label in 0..{NUM_COMPLETIONS - 1}")
            examples.append((ctx, label, endings))
    if not examples:
        raise SystemExit(f"{path}: no examples")
    return examples


def render_example(enc, ctx, label, endings):
    """(label, context tokens, [the 4 endings' tokens]); an ending is encoded with a space in front,
    as it follows the context in running text (GPT-2's tokens carry the space before a word)."""
    # encode_ordinary: text is text ("<|endoftext|>" in a context would be tokens, not the EOT id)
    return label, enc.encode_ordinary(ctx), [enc.encode_ordinary(" " + e) for e in endings]


# ----------------------------------------------------------------------------
# the PyTorch scorer (llm.c's evaluate), for -m

def load_model(name, device):
    import train_gpt2_torch as ref
    if name in ref.PRETRAINED:
        model = ref.GPT.from_pretrained(name)
    elif os.path.isfile(name):
        model = ref.model_from_file(name)
    else:
        raise SystemExit(f"-m {name}: neither a model file nor one of {', '.join(ref.PRETRAINED)}")
    return model.to(device).eval()


def score_example(model, ctx_tokens, ending_tokens, device):
    """The 4 endings' (sum, mean) cross-entropy over their own tokens, as float64 numpy arrays."""
    import numpy as np
    import torch
    from torch.nn import functional as F
    rows = [ctx_tokens + e for e in ending_tokens]
    N = max(len(r) for r in rows)
    tokens = torch.zeros((len(rows), N), dtype=torch.long)
    mask = torch.zeros((len(rows), N), dtype=torch.long)
    for i, (row, e) in enumerate(zip(rows, ending_tokens)):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(ctx_tokens):len(row)] = 1                         # the ending's positions
    tokens, mask = tokens.to(device), mask.to(device)
    with torch.no_grad():
        logits, _ = model(tokens, targets=tokens)                     # targets: so it returns every position
    # position t predicts token t+1: shift the mask too, so the last context token scores the first ending token
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1),
                             reduction="none").view(len(rows), N - 1)  # (4, N-1)
    shift_mask = mask[:, 1:]
    total = (losses * shift_mask).sum(dim=1)
    mean = total / shift_mask.sum(dim=1)
    return np.asarray(total.cpu(), dtype=np.float64), np.asarray(mean.cpu(), dtype=np.float64)


def evaluate(model, rendered, device):
    """Score every example; returns (acc, acc_norm, per-example predictions of acc_norm)."""
    from tqdm import tqdm
    correct = correct_norm = 0
    preds = []
    bar = tqdm(rendered, desc="HellaSwag", unit="ex", disable=len(rendered) < 100)
    for n, (label, ctx, endings) in enumerate(bar, 1):
        total, mean = score_example(model, ctx, endings, device)
        pred, pred_norm = int(total.argmin()), int(mean.argmin())
        correct += pred == label
        correct_norm += pred_norm == label
        preds.append(pred_norm)
        bar.set_postfix(acc_norm=f"{correct_norm / n:.4f}")
    n = len(rendered)
    print(f"{n} acc: {correct / n:.4f} acc_norm: {correct_norm}/{n}={correct_norm / n:.4f}")
    return correct / n, correct_norm / n, preds


# ----------------------------------------------------------------------------
# what the eval-file scripts share (this one and dev/data/mmlu.py)

def add_scoring_flags(parser):
    """-m and -d: score a model on the examples after writing them."""
    parser.add_argument("-m", "--model_type", default="", help="also score this model: gpt2, gpt2-medium, ... or a .bin")
    parser.add_argument("-d", "--device", default="", help="device for -m (default: cuda if there is one, else cpu)")


def refuse_other_file(out):
    """Stop in one line, before any download, when `out` is there and is not an llm.c eval file."""
    refuse_foreign_files([out], lambda path: has_magic(path, EVAL_MAGIC), f"an llm.c eval file (magic {EVAL_MAGIC})",
                         "move it away, or choose another --data_dir")


def write_and_score(out, rendered, source, args):
    """Write the rendered examples (read from `source`) to `out`, then score args.model_type on them if given."""
    try:
        nbytes = write_evalfile(out, rendered)
    except ValueError as e:
        raise SystemExit(f"{source}: {e}") from None
    print(f"writing {len(rendered):,} examples to {out} ({nbytes:,} bytes)")
    if args.model_type:
        import torch
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        evaluate(load_model(args.model_type, device), rendered, device)


@one_line_errors
def main(argv=None):
    p = argparse.ArgumentParser(description="HellaSwag jsonl -> llm.c's eval file (and an optional PyTorch score)")
    p.add_argument("--input", default="", help="a local copy of the HellaSwag jsonl (no download)")
    p.add_argument("-s", "--split", default="val", choices=sorted(HELLASWAGS), help="which split to download")
    p.add_argument("--data_dir", default=DATA_CACHE_DIR, help="where the jsonl and the .bin go")
    p.add_argument("--url", default="", help="where to download the jsonl from (default: rowanz/hellaswag's)")
    add_scoring_flags(p)
    args = p.parse_args(argv)

    out = os.path.join(args.data_dir, f"hellaswag_{args.split}.bin")
    refuse_other_file(out)
    jsonl = fetch(args.split, args.data_dir, args.url or HELLASWAGS[args.split], args.input)
    examples = read_examples(jsonl)
    enc = gpt2_encoding()
    rendered = [render_example(enc, *ex) for ex in examples]
    write_and_score(out, rendered, jsonl, args)


if __name__ == "__main__":
    sys.exit(main())
