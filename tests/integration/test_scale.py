"""A bucket of 1 000 000 images costs the labelling driver what one of 10 000 does: it plans by shard."""

import json
import shutil
from pathlib import Path

import pytest

from talora.bench.scale import label_argv, run_driver, write_bucket

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_million_image_bucket_costs_the_driver_what_ten_thousand_do(ray_cluster, tmp_path):
    runs = {}
    for name, shards in (("small", 10), ("large", 1000)):  # x 1000 empty files: 10^4 and 10^6 images
        bucket = write_bucket(str(tmp_path / name), shards, 1000)
        try:
            runs[name] = run_driver(label_argv(bucket, str(tmp_path / f"labels-{name}"), max_shards=2), ray_cluster,
                                    str(tmp_path / f"{name}.log"))
        finally:
            shutil.rmtree(bucket)  # pytest keeps recent temp folders: not a million files of them
        assert runs[name]["returncode"] == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    small, large = runs["small"], runs["large"]
    for run in (small, large):  # the same 2 shards labelled: every empty file an error row, each exactly once
        summary = run["summary"]
        assert summary["images"] == summary["errors"] == 2000 and summary["planning"]["shards"] == 2
        manifests = sorted((Path(summary["output"]) / "_manifests").glob("*.json"))
        assert [m.name for m in manifests] == ["shard-00000.json", "shard-00001.json"]
        assert all(len(json.loads(m.read_text())["items"]) == 1000 for m in manifests)
    # Listing 10^6 images in the driver cost ~440 MB and ~7 s of its CPU; planning by shard costs neither.
    # CPU seconds, not wall time: the driver's own work, whatever else the machine is doing.
    numbers = {k: (round(small[k], 1), round(large[k], 1)) for k in ("peak_rss_mb", "cpu_s", "wall_s")}
    assert large["peak_rss_mb"] <= small["peak_rss_mb"] * 1.1 + 50, numbers
    assert large["cpu_s"] <= small["cpu_s"] * 1.25 + 3, numbers


def test_the_scale_suite_reports_every_key_on_a_tiny_bucket(ray_cluster, tmp_path):
    from talora.bench.scale import ScaleConfig, markdown, run_scale, write_results

    results = run_scale(ScaleConfig(shards=4, images_per_shard=3, small_shards=2, max_shards=1, min_run_time=0.01,
                                    workdir=str(tmp_path)))
    scale = results["scale"]
    assert scale["planning"]["large"]["shards"] == 4 and scale["planning"]["small"]["images"] == 6
    assert scale["listing"]["images"] == 3 and scale["listing"]["s_per_image"] > 0
    for name in ("large", "small"):
        driver = scale["driver"][name]
        assert driver["images_labelled"] == 3 and driver["peak_rss_mb"] > 0 and driver["first_commit_s"] > 0
    assert set(scale["driver"]["large_vs_small"]) == {"peak_rss_mb", "cpu_s", "first_commit_s"}
    assert scale["targets"]["driver_large_vs_small"]["target"] == 1.1
    assert "driver, large / small" in markdown(results)
    files = write_results(results, str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "results.json").read_text())["config"]["shards"] == 4 and len(files) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the generated buckets are gone
