"""SAM 3 in the jobs: --sam-type sam3_tiny commits its labelling shards through the commit protocol,
with instances from SAM 3's own detector, and --boxes is refused before anything starts; the
training job pretrains a sam3_tiny base and trains a hypernet on it."""

import json

import pytest
import yaml

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


def test_pretraining_a_sam3_tiny_base_then_a_hypernet_on_it(ray_cluster, demo, tmp_path):
    """The shipped pretraining config with `--sam-type sam3_tiny`: the base is trained on category
    names (its validation says so) and saved as a sam3_tiny checkpoint, and a hypernet trains on it."""
    from talora.backbones import detect_variant
    from talora.model.loading import read_state_dict

    data = ["--train-annotations", demo["train"], "--val-annotations", demo["val"], "--cpus-per-worker", "0.5",
            "--storage-path", str(tmp_path / "runs")]
    done = run_here("train_hypernet", ["--config", "configs/demo_pretrain.yaml", "--sam-type", "sam3_tiny",
                                       "--max-steps", "2", "--val-every", "2", "--name", "pretrain", *data])
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_semantic_miou" in m and "val_presence_accuracy" in m for m in metrics)
    base = job_summary(done)["best_checkpoint"] + "/sam.safetensors"
    assert detect_variant(read_state_dict(base)) == "sam3_tiny"

    config = {"model": {"sam": {"sam_type": "sam3_tiny", "checkpoint": base},
                        "hypernet": {"hidden_dim": 32, "num_layers": 1, "num_heads": 4}},
              "train": {"train_annotations": demo["train"], "val_annotations": demo["val"], "val_images": 2,
                        "batch_images": 2, "tasks_per_image": 2, "max_steps": 2, "log_every": 1, "val_every": 2,
                        "warmup_steps": 1, "cpus_per_worker": 0.5, "storage_path": str(tmp_path / "runs"),
                        "name": "sam3"}}
    (tmp_path / "sam3.yaml").write_text(yaml.safe_dump(config))
    done = run_here("train_hypernet", ["--config", str(tmp_path / "sam3.yaml")])
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "sam3" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_scores" in m for m in metrics) and any("val_miou_seen" in m for m in metrics)
    assert list((tmp_path / "runs" / "sam3").glob("checkpoint_*/hypernet.safetensors"))
