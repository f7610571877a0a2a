"""A real local Ray cluster for integration tests (2 CPUs, its dashboard on a free loopback port, no auth)."""

import pytest


@pytest.fixture
def ray_cluster():
    """The session's local Ray (started on first use, and again after a test that ran its own
    multi-node cluster); yields its GCS address."""
    import ray

    from talora.batch.cluster import init_ray

    init_ray("local", num_cpus=2)  # never a stray `ray start` head; the state API its own
    yield ray.get_runtime_context().gcs_address
