"""The one way the benchmarks time a piece of work: torch.utils.benchmark's blocked autorange."""

from __future__ import annotations

from torch.utils.benchmark import Timer


def median_seconds(fn, min_run_time: float) -> tuple[float, int]:
    """(median seconds of one `fn()`, timed runs): after a warm-up, `fn` runs in blocks until
    `min_run_time` seconds were spent (at least one run)."""
    measurement = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return measurement.median, len(measurement.times)
