"""Talora jobs side by side on one machine, each on a local Ray of its own, beside this test's Ray."""

import os
import subprocess

import pytest
import yaml

from talora.batch.rows import read_run
from talora.data.synthetic import write_demo_dataset
from tests.conftest import REPO, job_command, job_summary

pytestmark = pytest.mark.integration


def test_a_labelling_job_and_a_training_run_at_once_each_find_their_own_ray(ray_cluster, tmp_path):
    # this test's Ray stays up throughout, so each job's Ray has at least one neighbour while it runs
    written = write_demo_dataset(str(tmp_path / "demo"), num_train=6, num_val=4, seed=7, shard_size=2)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"sam": {"sam_type": "vit_tiny"}, "hypernet": {"hidden_dim": 32, "num_layers": 1, "num_heads": 4}},
        "train": {"train_annotations": written["train"], "val_annotations": written["val"], "val_images": 2,
                  "batch_images": 2, "tasks_per_image": 2, "storage_path": str(tmp_path / "runs"), "name": "beside",
                  "warmup_steps": 1, "log_every": 5, "max_steps": 10, "num_workers": 1, "cpus_per_worker": 0.5},
    }))
    label = ["--prompt", "segment vehicles", "--images", str(tmp_path / "demo" / "val" / "images"),
             "--output", str(tmp_path / "labels"), "--num-actors", "1", "--cpus-per-actor", "0.5",
             "--points-per-side", "4", "--batch-size", "2"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # neither names a cluster: each starts its own
    jobs = {name: subprocess.Popen(job_command(script, argv), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
            for name, script, argv in (("label", "segment_dataset", label),
                                       ("train", "train_hypernet", ["--config", str(config)]))}
    done = {}
    for name, job in jobs.items():
        stdout, stderr = job.communicate(timeout=900)
        done[name] = subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)
        assert "multiple active Ray instances" not in stderr, f"{name}: {stderr[-3000:]}"
        assert "PlacementGroupCleaner" not in stderr, f"{name}: {stderr[-3000:]}"  # Train's clean-up: silent when it works

    summary = job_summary(done["label"])
    assert summary["images"] == 4 and summary["errors"] == 0
    assert len(read_run(summary["output"]).processed) == 4  # every image committed, once
    assert job_summary(done["train"])["final_metrics"]["step"] == 10
