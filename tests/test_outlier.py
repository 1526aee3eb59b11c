"""llmc/outlier.py: llm.c's OutlierDetector against the z-scores computed directly with NumPy."""

import math

import numpy as np

from llmc.outlier import OUTLIER_DETECTOR_WINDOW_SIZE, OutlierDetector

def window_zscores(xs, N=OUTLIER_DETECTOR_WINDOW_SIZE):
    """llm.c's semantics written out: NaN while fewer than N values have been seen (the first N calls);
    after that, x's z-score against the last N values INCLUDING x, with the population std (ddof 0)."""
    zs = []
    for i, x in enumerate(xs):
        if i < N:
            zs.append(math.nan)
            continue
        window = xs[i - N + 1:i + 1]                  # the N values up to and including x
        zs.append((x - window.mean()) / window.std())
    return np.array(zs)


def test_detector_matches_numpy_window_over_a_long_sequence():
    r = np.random.default_rng(0)
    xs = 3.0 + 0.5 * r.standard_normal(3 * OUTLIER_DETECTOR_WINDOW_SIZE + 17)   # wraps the ring twice
    xs[200], xs[300] = 9.0, -4.0                       # outliers, to leave and re-enter the window
    det = OutlierDetector()
    got = np.array([det.update(x) for x in xs])
    want = window_zscores(xs)
    assert np.isnan(got[:128]).all() and np.isfinite(got[128:]).all()
    np.testing.assert_allclose(got[128:], want[128:], rtol=1e-9, atol=1e-9)
    assert got[200] > 5 and got[300] < -5
    # the z-score is NOT the one against the window before x (that would be larger for a spike)
    before = (xs[200] - xs[72:200].mean()) / xs[72:200].std()
    assert before > got[200] + 1


def test_detector_constant_window_gives_zero():
    det = OutlierDetector()
    zs = [det.update(2.5) for _ in range(130)]
    assert all(math.isnan(z) for z in zs[:128]) and zs[128:] == [0.0, 0.0]
