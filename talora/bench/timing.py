"""The one way the benchmarks time a piece of work: torch.utils.benchmark's blocked autorange."""

from __future__ import annotations

from torch.utils.benchmark import Timer


def median_seconds(fn, min_run_time: float) -> tuple[float, int]:
    """(median seconds of one `fn()`, timed runs): after a warm-up, `fn` runs in blocks until
    `min_run_time` seconds were spent (at least one run)."""
    measurement = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return measurement.median, len(measurement.times)


def per_image(fn, count: int, min_run_time: float) -> float:
    """Seconds per image of `fn(i)` over images i = 0 .. count-1: the median of timed passes over all of
    them, so every path is measured on the same images (the instance pass's cost varies per image)."""
    return median_seconds(lambda: [fn(i) for i in range(count)], min_run_time)[0] / count
