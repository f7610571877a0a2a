"""The speed suite's end-to-end part: the labelling job on a local Ray, measured beside the floor."""

import pytest

from talora.bench.speed import run_speed, speed_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_speed_suite_times_the_labelling_job_beside_the_floor(ray_cluster):
    config = speed_config("vit_tiny", "cpu", num_images=4, timed_images=2, batch_images=2, min_run_time=0.01,
                          points_per_side=4)
    results = run_speed(config)
    job, memory = results["speed"]["job"], results["speed"]["memory"]
    assert job["images"] == 4 and job["errors"] == 0
    assert job["actors"] == 2 and job["threads"] == 2  # chosen from the 2-CPU test cluster: a 1-thread actor per core
    assert 0 < job["first_commit_s"] <= job["wall_s"] and job["floor_s_per_image_at_job_threads"] > 0
    if job["images_per_s"] is not None:  # images that came back after the first commit, if any did
        assert job["vs_floor"] == pytest.approx(job["images_per_s"] * job["floor_s_per_image_at_job_threads"])
    assert memory["actor_peak_rss_mb"] > 0 and "actor_peak_rss_mb" not in job
    assert results["config"]["job"] is True
