"""Joining the Ray cluster a job runs on: under `ray job submit` the one RAY_ADDRESS names, else a
local one."""

from __future__ import annotations

import os

import ray


def init_ray(address: str | None = None) -> None:
    """Connects to RAY_ADDRESS (under `ray job submit`) or `address`, else starts a local Ray."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    # The dashboard process also serves the state API that Ray Train's cleanup polls.
    ray.init(address=address or os.environ.get("RAY_ADDRESS"),
             log_to_driver=True, configure_logging=False)
