"""SAM 3 in the labelling job: --sam-type sam3_tiny commits its shards through the commit protocol,
with instances from SAM 3's own detector, and --boxes is refused before anything starts."""

import pytest

from talora.batch.commit import RunOutput
from talora.batch.parts import PARQUET
from talora.batch.rows import read_run
from talora.data.synthetic import write_demo_dataset
from tests.conftest import job_summary, run_here

pytestmark = pytest.mark.integration


@pytest.fixture
def demo(tmp_path):
    return write_demo_dataset(str(tmp_path / "demo"), num_train=2, num_val=4, seed=7, shard_size=2)


def test_a_sam3_tiny_labelling_job_commits_the_detectors_rows_and_refuses_boxes(ray_cluster, demo, tmp_path):
    images = str(tmp_path / "demo" / "val" / "images")
    # Random weights: every threshold open, so the detector's queries become rows.
    summary = job_summary(run_here("segment_dataset", [
        "--prompt", "segment vehicles", "--prompt", "segment fruit", "--sam-type", "sam3_tiny", "--untrained",
        "--images", images, "--annotations", demo["val"], "--output", str(tmp_path / "labels"),
        "--presence-thresh", "0", "--score-thresh", "0"]))
    assert summary["images"] == 4 and summary["rows"] > 0 and summary["errors"] == 0
    out, key = summary["output"].rsplit("/", 1)
    assert sorted(RunOutput(out, key, None, PARQUET).manifests()) == ["shard-00000", "shard-00001"]
    rows = read_run(summary["output"]).table.to_pylist()
    assert {r["model"] for r in rows} == {"sam3_tiny+untrained"} and {r["kind"] for r in rows} == {"semantic", "instance"}
    assert {r["prompt"] for r in rows} == {"segment vehicles", "segment fruit"}
    assert all(r["segmentation"]["size"] == [256, 256] for r in rows)  # masks at the original size

    boxes = tmp_path / "boxes.json"
    boxes.write_text('[{"file_name": "x.png", "bbox": [0, 0, 8, 8]}]')
    refused = run_here("segment_dataset", ["--prompt", "segment vehicles", "--sam-type", "sam3_tiny", "--untrained",
                                           "--images", images, "--output", str(tmp_path / "boxed"),
                                           "--boxes", str(boxes)])
    assert refused.returncode != 0 and "--sam-type sam3_tiny is a detector" in refused.stderr
    assert not (tmp_path / "boxed").exists()
