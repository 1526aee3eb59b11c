"""
MMLU (Hendrycks et al., https://github.com/hendrycks/test) -> llm.c's eval file, dev/data/mmlu/mmlu_test.bin:
the format dev/data/hellaswag.py writes (llmc/hellaswag.py), so the trainers' eval loader reads it as it
reads HellaSwag's. Optionally scores a model on it in PyTorch, as llm.c's dev/data/mmlu.py does.

  python dev/data/mmlu.py                         # download data.tar (166 MB), write the .bin from data/test/
  python dev/data/mmlu.py --input data.tar        # offline: a local copy of the tar
  python dev/data/mmlu.py --input data/test       # ... or a folder of its csv files
  python dev/data/mmlu.py -m gpt2 -d cuda         # also score OpenAI's GPT-2 124M:
                                                  #   14042 acc: 0.2557 acc_norm: 0.2721 (llm.c's numbers)

Each csv file is one subject (57 of them; the test split holds 14,042 questions); each row, with no header,
is question, the answers A, B, C, D, and the letter of the right one. llm.c renders a question as the
context "Question: <question>\\n\\nAnswer:" and each answer with a space in front (" " + answer) as its
completion, scored like a HellaSwag ending; we do the same. llm.c's script only scores; the file it would
write with data_common.py's write_evalfile from that rendering is what this one writes, byte for byte
(tests/test_mmlu.py builds the expected bytes from the format's description), with two choices made
where llm.c leaves them to chance or to pandas:
  - the subjects in sorted file-name order (llm.c takes os.listdir's order, which varies between machines);
  - every cell as the text in the csv (pandas' read_csv turns an answer column of numbers into numbers and
    "None", "NA" or an empty cell into NaN, which llm.c's str() then writes as "nan").
MMLU's longest questions (professional law) run past 1,000 tokens: the loader needs -t longer than the
longest example, and says so in one line.
"""

import argparse
import csv
import io
import os
import sys
import tarfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from hellaswag import add_scoring_flags, refuse_other_file, write_and_score  # noqa: E402  (dev/data/hellaswag.py)
from llmc.tokenizer import gpt2_encoding  # noqa: E402
from llmc.utils import one_line_errors  # noqa: E402

DATA_CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mmlu")
DATA_URL = "https://people.eecs.berkeley.edu/~hendrycks/data.tar"
LETTERS = "ABCD"


def fetch(data_dir, url, local_copy):
    """The path of MMLU's data: `local_copy` as it is (a tar or a folder of csv files), else data.tar in
    data_dir, downloaded unless it is there."""
    if local_copy:
        if not os.path.exists(local_copy):
            raise SystemExit(f"--input {local_copy}: no such file or folder")
        return local_copy
    from llmc.download import download_once
    return download_once(url, os.path.join(data_dir, "data.tar"), "python dev/data/mmlu.py --input PATH/data.tar")


def csv_texts(path, split):
    """[(name, text)] of the split's csv files, sorted by name: from a folder, or from the tar's data/<split>/."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith(".csv"))
        texts = [(n, open(os.path.join(path, n), encoding="utf-8", newline="").read()) for n in names]
    else:
        try:
            with tarfile.open(path) as tar:
                members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".csv")
                                  and os.path.basename(os.path.dirname(m.name)) == split), key=lambda m: m.name)
                texts = [(m.name, tar.extractfile(m).read().decode("utf-8")) for m in members]
        except tarfile.TarError as e:
            raise SystemExit(f"{path}: not a tar file ({e}); give MMLU's data.tar or a folder of its csv files")
    if not texts:
        raise SystemExit(f"{path}: no csv files (of the {split} split) in it")
    return texts


def read_examples(path, split="test"):
    """Every question as (question, [4 answers], label 0..3), subject after subject; a bad row is one line
    naming its file and row."""
    examples = []
    for name, text in csv_texts(path, split):
        for n, row in enumerate(csv.reader(io.StringIO(text, newline="")), 1):
            if len(row) != 6 or row[5].strip() not in tuple(LETTERS):
                raise SystemExit(f"{name}:{n}: expected 6 cells (question, answers A-D, the right letter), "
                                 f"got {len(row)} ending in {row[-1:]}")
            examples.append((row[0], row[1:5], LETTERS.index(row[5].strip())))
    return examples


def render_example(enc, question, answers, label):
    """(label, context tokens, [4 completions' tokens]) as llm.c's render_example lays the question out."""
    ctx = f"Question: {question}\n\nAnswer:"
    return label, enc.encode_ordinary(ctx), [enc.encode_ordinary(" " + a) for a in answers]


@one_line_errors
def main(argv=None):
    p = argparse.ArgumentParser(description="MMLU's csv files -> llm.c's eval file (and an optional PyTorch score)")
    p.add_argument("--input", default="", help="a local data.tar, or a folder of MMLU csv files (no download)")
    p.add_argument("-s", "--split", default="test", choices=("test", "val", "dev"), help="which split of the tar")
    p.add_argument("--data_dir", default=DATA_CACHE_DIR, help="where data.tar and the .bin go")
    p.add_argument("--url", default=DATA_URL, help="where to download data.tar from")
    add_scoring_flags(p)
    args = p.parse_args(argv)

    out = os.path.join(args.data_dir, f"mmlu_{args.split}.bin")
    refuse_other_file(out)
    source = fetch(args.data_dir, args.url, args.input)
    enc = gpt2_encoding()
    rendered = [render_example(enc, *example) for example in read_examples(source, args.split)]
    os.makedirs(args.data_dir, exist_ok=True)
    write_and_score(out, rendered, source, args)


if __name__ == "__main__":
    sys.exit(main())
