"""
Plot training runs from their main.log files (ours or llm.c's: the same lines, llmc/logger.py) into a PNG,
as llm.c's dev/vislog.ipynb: train and val loss against steps on the left, HellaSwag accuracy on the right.

  python dev/vislog.py log124M/main.log                          # -> vislog.png
  python dev/vislog.py ours/main.log llmc/main.log --labels ours,llm.c -o compare.png
  python dev/vislog.py log124M/main.log --baseline 124M          # OpenAI GPT-2 124M's val loss and HellaSwag,
                                                                 # and GPT-3 124M's HellaSwag (vislog's numbers)
  python dev/vislog.py log124M/main.log --baseline 0.2955        # one HellaSwag line at this accuracy

The lines read, one event each (anything else is an error):
  s:<step> trl:<train loss> lr:<learning rate> norm:<grad norm>
  s:<step> tel:<val loss>
  s:<step> eval:<HellaSwag acc_norm>
A run that crashed and resumed logs some steps twice: the later line wins, as in vislog.ipynb.
Needs matplotlib (pip install matplotlib).

-o replaces a PNG (an earlier plot); any other file there, or a folder, is refused in one line and left
as it was. The PNG is drawn in memory and written through a temporary name, so a failed write (a full
disk: one line) leaves no half file.
"""

import argparse
import io
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llmc.utils import file_starts_with, one_line_errors, refuse_foreign_files, write_atomic  # noqa: E402

# vislog.ipynb's reference points, by model size: OpenAI GPT-2's checkpoint val loss (on FineWeb's val
# split) and HellaSwag accuracy (llm.c's eval), and GPT-3's HellaSwag from its paper
GPT2_VAL_LOSS = {"124M": 3.424958, "350M": 3.083089, "774M": 3.000580, "1558M": 2.831273}
GPT2_HELLASWAG = {"124M": 0.294463, "350M": 0.375224, "774M": 0.431986, "1558M": 0.488946}
GPT3_HELLASWAG = {"124M": 0.337, "350M": 0.436, "774M": 0.510, "1558M": 0.547}
# one colour per run (train solid, val dashed with dots), none of them the baselines' red and green
RUN_COLORS = ("C0", "C1", "C4", "C5", "C6", "C7", "C8", "C9")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class LogError(ValueError):
    """A file that is not a main.log; the message is one line."""


def parse_logfile(path):
    """main.log -> {stream: (steps, values)} with steps sorted, one value per step (the last logged).
    Streams: trl, lr, norm (the train lines), tel (val loss), eval (HellaSwag)."""
    streams = {}                                          # stream -> {step: value}
    with open(path, "r") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                key, step = parts[0].split(":")
                if key != "s" or len(parts) < 2:
                    raise ValueError
                step = int(step)
                pairs = [p.split(":") for p in parts[1:]]
                values = {k: float(v) for k, v in pairs}
            except ValueError:
                raise LogError(f"{path}:{n}: not a main.log line (s:<step> trl:|tel:|eval:...): {line.strip()[:60]}") \
                    from None
            for k, v in values.items():
                streams.setdefault(k, {})[step] = v
    if "trl" not in streams:
        raise LogError(f"{path}: no train loss lines (s:<step> trl:...); is it a trainer's main.log (-o dir)?")
    return {k: tuple(np.array(x) for x in zip(*sorted(d.items()))) for k, d in streams.items()}


def smooth_moving_average(signal, window_size):
    """vislog.ipynb's optional smoothing: a centred moving average, the ends padded with the edge values."""
    if window_size < 3 or signal.size < window_size:
        return signal
    s = np.pad(signal, (window_size // 2, window_size - 1 - window_size // 2), mode="edge")
    return np.convolve(s, np.ones(window_size) / window_size, mode="valid")


def plot(runs, baseline=None, smooth=1):
    """runs: [(label, streams from parse_logfile)]. baseline: a model size ("124M", ...) for vislog's
    reference lines, a float for one HellaSwag line, or None. Returns the matplotlib figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_eval = any("eval" in s for _, s in runs) or baseline is not None
    fig, axes = plt.subplots(1, 2 if has_eval else 1, figsize=(16 if has_eval else 8, 6), squeeze=False)
    ax = axes[0][0]
    for i, (label, s) in enumerate(runs):
        color = RUN_COLORS[i % len(RUN_COLORS)]
        xs, ys = s["trl"]
        ax.plot(xs, smooth_moving_average(ys, smooth), color=color, label=f"{label} train loss")
        if "tel" in s:
            ax.plot(*s["tel"], ".--", color=color, label=f"{label} val loss")
    if isinstance(baseline, str) and baseline in GPT2_VAL_LOSS:
        ax.axhline(y=GPT2_VAL_LOSS[baseline], color="r", linestyle="--",
                   label=f"OpenAI GPT-2 ({baseline}) checkpoint val loss")
    ax.set_xlabel("steps")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title("Loss")
    ax.legend()

    if has_eval:
        ax = axes[0][1]
        for i, (label, s) in enumerate(runs):
            if "eval" in s:
                ax.plot(*s["eval"], ".-", color=RUN_COLORS[i % len(RUN_COLORS)], label=label)
        if isinstance(baseline, str):
            ax.axhline(y=GPT2_HELLASWAG[baseline], color="r", linestyle="--", label=f"OpenAI GPT-2 ({baseline}) checkpoint")
            ax.axhline(y=GPT3_HELLASWAG[baseline], color="g", linestyle="--", label=f"OpenAI GPT-3 ({baseline}) checkpoint")
        elif baseline is not None:
            ax.axhline(y=baseline, color="r", linestyle="--", label=f"baseline {baseline:g}")
        ax.set_xlabel("steps")
        ax.set_ylabel("accuracy")
        ax.set_title("HellaSwag eval")
        ax.legend()
    fig.tight_layout()
    return fig


def parse_baseline(text):
    if not text:
        return None
    if text in GPT2_VAL_LOSS:
        return text
    try:
        return float(text)
    except ValueError:
        raise SystemExit(f"--baseline {text}: a model size ({', '.join(GPT2_VAL_LOSS)}) or an accuracy like 0.2955") \
            from None


def default_label(path):
    """The run's name: the folder main.log is in (log124M/main.log -> log124M), else the file name."""
    name = os.path.basename(path)
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return parent if name == "main.log" and parent else name


@one_line_errors
def main(argv=None):
    p = argparse.ArgumentParser(description="main.log files -> a PNG of train/val loss and HellaSwag vs steps")
    p.add_argument("logs", nargs="+", help="main.log files (ours or llm.c's)")
    p.add_argument("-o", "--output", default="vislog.png", help="the PNG to write")
    p.add_argument("--labels", default="", help="comma-separated names of the runs (default: each log's folder)")
    p.add_argument("--baseline", default="", help="124M/350M/774M/1558M (vislog's GPT-2/GPT-3 lines) or an accuracy")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window for the train loss (1 = off)")
    args = p.parse_args(argv)

    refuse_foreign_files([args.output], lambda path: file_starts_with(path, PNG_SIGNATURE), "a PNG",
                         "give -o another name")
    labels = args.labels.split(",") if args.labels else [default_label(path) for path in args.logs]
    if len(labels) != len(args.logs):
        raise SystemExit(f"--labels has {len(labels)} names for {len(args.logs)} logs")
    baseline = parse_baseline(args.baseline)
    runs = []
    for label, path in zip(labels, args.logs):
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: no such file")
        try:
            streams = parse_logfile(path)
        except LogError as e:
            raise SystemExit(str(e)) from None
        runs.append((label, streams))
        print(f"{label}: {len(streams['trl'][0])} train steps, min train loss {streams['trl'][1].min():.4f}"
              + (f", min val loss {streams['tel'][1].min():.4f}" if "tel" in streams else "")
              + (f", max HellaSwag {streams['eval'][1].max():.4f}" if "eval" in streams else ""))
    try:
        fig = plot(runs, baseline, args.smooth)
    except ImportError:
        raise SystemExit("matplotlib is not installed: pip install matplotlib") from None
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    write_atomic(args.output, [np.frombuffer(png.getbuffer(), dtype=np.uint8)])
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
