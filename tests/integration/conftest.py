"""A real local Ray cluster for integration tests (2 CPUs, no dashboard, no auth on loopback)."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"  # a loopback-only test head; subprocess jobs connect to it
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    context = ray.init(num_cpus=2, configure_logging=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()
