"""llm.c's outlier guard (llmc/outlier_detector.h): the z-score of each step's loss and gradient norm
against the last 128 of them. The step line prints both; `-sl` / `-sg` skip an update whose z-score is
above the value (outlier_skip_reason, called by train_gpt2.train)."""

import math

OUTLIER_DETECTOR_WINDOW_SIZE = 128


class OutlierDetector:
    """A rolling window of the last 128 values with a running sum and sum of squares (Python floats,
    i.e. float64 as llm.c's doubles: updated with += and -= at every step, they would drift in float32).

    update(x) has llm.c's exact semantics:
      - the first 128 calls only fill the window and return NaN (no z-score yet);
      - from the 129th on, x replaces the oldest value FIRST, and the z-score is x's against the window
        that now holds x (and the 127 values before it): (x - mean) / std;
      - std is the population one, sqrt(sum_sq / 128 - mean**2) (divides by N, not N - 1);
      - a window of equal values (std exactly 0) gives 0.0; a variance that rounds below zero gives NaN
        (C's sqrt of a negative number).
    """

    def __init__(self, window=OUTLIER_DETECTOR_WINDOW_SIZE):
        self.window = window
        self.buffer = [0.0] * window  # the last `window` values, a ring
        self.count = 0                # values seen, up to `window`
        self.index = 0                # once full: the slot of the oldest value, the next to go
        self.sum = 0.0
        self.sum_sq = 0.0

    def update(self, x):
        x = float(x)
        if self.count < self.window:  # still filling the window
            self.buffer[self.count] = x
            self.sum += x
            self.sum_sq += x * x
            self.count += 1
            return math.nan
        old = self.buffer[self.index]  # drop the oldest value, then add x in its slot
        self.sum -= old
        self.sum_sq -= old * old
        self.buffer[self.index] = x
        self.sum += x
        self.sum_sq += x * x
        self.index = (self.index + 1) % self.window
        mean = self.sum / self.window
        variance = self.sum_sq / self.window - mean * mean
        std = math.sqrt(variance) if variance >= 0 else math.nan
        if std == 0.0:
            return 0.0
        return (x - mean) / std


def outlier_skip_reason(zloss, zgrad, skip_update_lossz, skip_update_gradz):
    """llm.c's outlier guard (train_gpt2.cu): why this step's update is skipped, or None. A guard is on when
    its threshold is not 0; a NaN z-score (the window still filling) never skips; the loss is checked first."""
    if math.isfinite(zloss) and skip_update_lossz != 0.0 and zloss > skip_update_lossz:
        return f"skipping update due to loss z-score of {zloss:f}"
    if math.isfinite(zgrad) and skip_update_gradz != 0.0 and zgrad > skip_update_gradz:
        return f"skipping update due to grad z-score of {zgrad:f}"
    return None
