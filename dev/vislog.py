"""
Plot training runs from their main.log files (ours or llm.c's: the same lines, llmc/logger.py) into a PNG,
as llm.c's dev/vislog.ipynb: train and val loss against steps on the left, HellaSwag accuracy on the right.

  python dev/vislog.py log124M/main.log                          # -> vislog.png
  python dev/vislog.py ours/main.log llmc/main.log --labels ours,llm.c -o compare.png
  python dev/vislog.py log124M/main.log --baseline 124M          # OpenAI GPT-2 124M's val loss and HellaSwag,
                                                                 # and GPT-3 124M's HellaSwag (vislog's numbers)
  python dev/vislog.py log124M/main.log --baseline 0.2955        # one HellaSwag line at this accuracy
  python dev/vislog.py --stats log124M/stats.jsonl -o stats.png  # -as N's statistics: heat maps over layers
                                                                 # and steps, a panel per tensor and statistic

The lines read, one event each (anything else is an error):
  s:<step> trl:<train loss> lr:<learning rate> norm:<grad norm>
  s:<step> tel:<val loss>
  s:<step> eval:<HellaSwag acc_norm>
A run that crashed and resumed logs some steps twice: the later line wins, as in vislog.ipynb.
--stats reads a run's stats.jsonl (-as N -o DIR, llmc/actstats.py) instead: one row of panels per tensor
(--tensors picks some), one panel per statistic, the layers up and the stats steps across; std and max_abs
are drawn as log10 (a spike or a collapse spans decades), a mean on a scale symmetric around 0 (not the
entropy's, which is never below 0), the bf16 fractions from 0 up.
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
from llmc.actstats import ENTROPY, read_stats  # noqa: E402
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


LOG_STATS = ("std", "max_abs")          # drawn as log10: they move by decades when something goes wrong


def stats_grid(records, tensor, stat):
    """{step: tensors} (read_stats) -> (steps, (layers, steps) array) of one statistic of one tensor, NaN at
    a step without it; log10 for LOG_STATS (a 0 there is NaN: no magnitude to draw)."""
    steps = [s for s, tensors in records.items() if tensor in tensors]
    layers = max(len(records[s][tensor][stat]) for s in steps)
    grid = np.full((layers, len(steps)), np.nan)
    for j, s in enumerate(steps):
        values = np.array(records[s][tensor][stat], dtype=np.float64)
        grid[:len(values), j] = values
    if stat in LOG_STATS:
        with np.errstate(divide="ignore", invalid="ignore"):
            grid = np.where(grid > 0, np.log10(grid), np.nan)
    return steps, grid


def stats_tensors(records, wanted=None):
    """The tensors to draw, in the file's order: all, or those named in `wanted` (one line for a name not there)."""
    present = list(dict.fromkeys(name for tensors in records.values() for name in tensors))
    if not wanted:
        return present
    missing = [name for name in wanted if name not in present]
    if missing:
        raise SystemExit(f"--tensors: {', '.join(missing)} not in the file; it has {', '.join(present)}")
    return wanted


def plot_stats(records, tensors):
    """Heat maps: a row of panels per tensor, one per statistic it has, layers up and steps across."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(records[s][t]) for s in records for t in tensors if t in records[s])
    fig, axes = plt.subplots(len(tensors), columns, figsize=(3.4 * columns, 1.8 * len(tensors) + 0.6), squeeze=False)
    for row, tensor in zip(axes, tensors):
        stats = next(list(records[s][tensor]) for s in records if tensor in records[s])
        for ax in row[len(stats):]:
            ax.axis("off")                                # att_entropy has no bf16 fractions
        for ax, stat in zip(row, stats):
            steps, grid = stats_grid(records, tensor, stat)
            finite = grid[np.isfinite(grid)]
            top = float(np.abs(finite).max()) if finite.size else 1.0
            signed = stat == "mean" and tensor != ENTROPY         # an entropy is never below 0
            style = dict(cmap="coolwarm", vmin=-top, vmax=top) if signed else \
                dict(cmap="magma", vmin=0, vmax=max(top, 1e-12)) if stat.startswith("bf16") else dict(cmap="viridis")
            image = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", **style)
            ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 5)).round().astype(int))
            ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
            ax.set_title(f"{tensor} {stat}" + (" (log10)" if stat in LOG_STATS else ""), fontsize=9)
            if grid.shape[0] > 1:
                ax.set_ylabel("layer")
            else:
                ax.set_yticks([])                          # a tensor outside the layers: one row
            ax.set_xlabel("step" if tensor == tensors[-1] else "")
            fig.colorbar(image, ax=ax)
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


def loss_figure(args):
    """The main.log plot: the runs' losses (and HellaSwag), a line of numbers per run printed."""
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
    return plot(runs, baseline, args.smooth)


def stats_figure(args):
    """--stats: the heat maps of a stats.jsonl, a line saying what they cover printed."""
    if args.logs:
        raise SystemExit("--stats draws one stats.jsonl; plot main.log files in a run of their own")
    if not os.path.isfile(args.stats):
        raise SystemExit(f"{args.stats}: no such file")
    try:
        records = read_stats(args.stats)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    tensors = stats_tensors(records, [t for t in args.tensors.split(",") if t])
    print(f"{args.stats}: {len(records)} stats steps ({min(records)}..{max(records)}), {len(tensors)} tensors")
    return plot_stats(records, tensors)


@one_line_errors
def main(argv=None):
    p = argparse.ArgumentParser(description="main.log files -> a PNG of train/val loss and HellaSwag vs steps; "
                                            "--stats: a stats.jsonl (-as) -> heat maps over layers and steps")
    p.add_argument("logs", nargs="*", help="main.log files (ours or llm.c's)")
    p.add_argument("-o", "--output", default="", help="the PNG to write (default vislog.png, with --stats stats.png)")
    p.add_argument("--labels", default="", help="comma-separated names of the runs (default: each log's folder)")
    p.add_argument("--baseline", default="", help="124M/350M/774M/1558M (vislog's GPT-2/GPT-3 lines) or an accuracy")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window for the train loss (1 = off)")
    p.add_argument("--stats", default="", help="a run's stats.jsonl (-as N -o DIR) to draw instead of main.log files")
    p.add_argument("--tensors", default="", help="--stats: comma-separated tensors to draw (default: all)")
    args = p.parse_args(argv)
    if not args.logs and not args.stats:
        raise SystemExit("give main.log files to plot, or --stats DIR/stats.jsonl")
    output = args.output or ("stats.png" if args.stats else "vislog.png")

    refuse_foreign_files([output], lambda path: file_starts_with(path, PNG_SIGNATURE), "a PNG",
                         "give -o another name")
    try:
        fig = stats_figure(args) if args.stats else loss_figure(args)
    except ImportError:
        raise SystemExit("matplotlib is not installed: pip install matplotlib") from None
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    write_atomic(output, [np.frombuffer(png.getbuffer(), dtype=np.uint8)])
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
