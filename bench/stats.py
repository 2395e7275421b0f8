"""Percentiles and summaries of timing samples."""

from __future__ import annotations

import math
import statistics


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest-rank: p99 of 200 samples is the 198th."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize_ms(seconds: list[float]) -> dict[str, float]:
    """p50/p99/mean/min/max in milliseconds of samples given in seconds."""
    ms = [s * 1000 for s in seconds]
    return {"p50": percentile(ms, 50), "p99": percentile(ms, 99), "mean": statistics.fmean(ms),
            "min": min(ms), "max": max(ms)}
