"""Joining the Ray cluster a job runs on: the one `--ray-address` or RAY_ADDRESS names (under `ray
job submit` the latter), else a local Ray of the job's own that nothing else on the machine is
confused with."""

from __future__ import annotations

import os
import socket

import ray


def init_ray(address: str | None = None, num_cpus: float | None = None) -> None:
    """Connects to `address` or RAY_ADDRESS; with neither (or "local") starts a local Ray.

    A local Ray's workers are told their own API server: Ray Train's clean-up actor queries actor
    state with no address, and Ray's auto-detection refuses to choose when a second local Ray (another
    talora job's) runs on the machine."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, log_to_driver=True, configure_logging=False)
        return
    port = free_port()
    ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", dashboard_port=port,
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
             log_to_driver=True, configure_logging=False)


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
