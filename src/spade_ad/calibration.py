"""Thresholds from good images only, and the verdicts they give."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def calibrate_threshold(normal_values: Sequence[float], margin: float) -> float:
    """A threshold from normal values alone: their maximum plus `margin` times their spread above the median.

    Scale-free (works for any score unit) and never below anything seen on normal data; the margin absorbs the
    underestimate of the true normal maximum from a few calibration images.
    """
    values = np.asarray(normal_values, dtype=np.float64)
    top = float(values.max())
    return top + margin * (top - float(np.median(values)))
