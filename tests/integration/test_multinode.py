"""Multi-node runs on one machine (ray.cluster_utils.Cluster: a head and two worker nodes)."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch
import yaml
from pycocotools import mask as mask_utils

from talora.batch.commit import RunOutput
from talora.data.synthetic import write_demo_dataset
from talora.batch.rows import read_run
from talora.model.loading import load_backbone, save_backbone
from tests.conftest import job_command, run_job
from talora.batch.parts import PARQUET
from talora.model.loading import save_hypernet

pytestmark = pytest.mark.integration


def _cluster(**worker):
    """A 1-CPU head and two 1-CPU worker nodes (with `worker`'s resources too), this process joined."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # this test needs its own cluster; the next test's ray_cluster starts a fresh local one
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [c.add_node(num_cpus=1, resources={f"node_{n}": 1}, **worker) for n in "ab"]
    ray.init(address=c.address)
    c.wait_for_nodes()
    return c, workers


@pytest.fixture
def cluster():
    import ray

    c, workers = _cluster()
    yield c, workers
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def gpu_cluster():
    """The same, its worker nodes reporting one GPU each: Ray schedules by the resource, and the
    actors, finding no CUDA device, run on the CPU. The layout is what is under test."""
    import ray

    c, workers = _cluster(num_gpus=1)
    yield c, workers
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def labelled_setup(s3):
    written = write_demo_dataset("s3://talora-test/mn", num_train=4, num_val=6, seed=8, shard_size=2, storage=s3)
    torch.manual_seed(0)
    save_backbone(load_backbone("vit_tiny"), "s3://talora-test/models/base.safetensors", s3)
    from talora.config import default_config
    from talora.model.loading import build_task_aware_sam

    hypernet = build_task_aware_sam(default_config("vit_tiny"))
    with torch.no_grad():  # a hypernet whose adapters differ per prompt
        for head in hypernet.hypernet.heads.values():
            head.weight.normal_(0, 0.02)
    save_hypernet(hypernet, "s3://talora-test/models/hypernet.safetensors", s3)
    argv = ["--prompt", "segment vehicles", "--prompt", "segment green objects", "--images",
            "s3://talora-test/mn/val/images", "--annotations", written["val"], "--sam-checkpoint",
            "s3://talora-test/models/base.safetensors", "--hypernet", "s3://talora-test/models/hypernet.safetensors",
            "--presence-thresh", "0", "--points-per-side", "4",
            "--num-actors", "2", "--cpus-per-actor", "0.75", "--batch-size", "1", "--s3-endpoint-url", s3.endpoint_url]
    return written, argv


def _run_label(argv, address) -> str:
    """Runs the labelling job; returns its output (stdout and stderr)."""
    done = run_job("segment_dataset", argv, address)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def _rows(output, s3):
    run_rows = read_run(output, s3)
    table, processed = run_rows.table, run_rows.processed
    return table.to_pylist(), processed


def _summary(output_prefix, s3):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint_url)
    fs.invalidate_cache()  # the job wrote from another process: a listing cached before is stale
    (path,) = fs.glob(f"{output_prefix.removeprefix('s3://')}/*/_summary.json")
    return json.loads(fs.cat_file(path)), "s3://" + path.rsplit("/", 1)[0]


def test_two_actors_share_each_gpu_node_and_label_as_the_in_process_predictor(gpu_cluster, s3, labelled_setup,
                                                                              monkeypatch):
    written, argv = labelled_setup  # docs/labelling.md's recipe for a small model: --gpus-per-actor 0.5, the rest chosen
    argv = [a for i, a in enumerate(argv) if a not in ("--num-actors", "--cpus-per-actor")
            and argv[i - 1] not in ("--num-actors", "--cpus-per-actor")]
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")  # two actors of a node log the same line: count both
    log = _run_label([*argv, "--gpus-per-actor", "0.5", "--threads-per-actor", "1", "--output",
                      "s3://talora-test/mn-labels"], gpu_cluster[0].address)
    summary, run = _summary("s3://talora-test/mn-labels", s3)
    # Placement, not timing: two 1-GPU nodes of one core hold four actors of half a GPU, two on each
    # (each asking for 3/8 of its node's core, so the read and decode tasks still fit), each actor
    # logs its node when it starts, and the pipeline starts only once all are up
    # (pipeline.ACTOR_START_TIMEOUT_S). Which actor takes which batch is Ray Data's choice, so the
    # rows' nodes are only checked to be among them.
    import re
    from collections import Counter

    assert "4 actor(s) x 1 thread(s) (0.37 CPU, 0.5 GPU each)" in log, log[-3000:]
    per_node = Counter(re.findall(r"label actor on node ([0-9a-f]+)", log))
    assert sorted(per_node.values()) == [2, 2] and set(per_node) == {w.node_id for w in gpu_cluster[1]}
    assert set(summary["worker_nodes"]) <= set(per_node)
    from talora.io.storage import read_bytes

    status = json.loads(read_bytes(f"{run}/_status.json", s3))
    assert status["state"] == "done" and status["shards"] == {"committed": 3, "to_do": 3, "skipped": 0}
    assert status["images"]["returned"] == summary["images"] == 6 and status["eta_s"] == 0
    rows, processed = _rows(run, s3)
    assert len(processed) == 6

    # The same images through the predictor in this process: the single-node reference.
    from talora.data.coco import CocoDataset
    from talora.model.loading import ModelSpec, load_model
    from talora.predict.predictor import PredictConfig, TaskAwarePredictor

    model = load_model(ModelSpec("vit_tiny", "s3://talora-test/models/base.safetensors",
                                 "s3://talora-test/models/hypernet.safetensors"), s3)
    predictor = TaskAwarePredictor(model, PredictConfig(presence_thresh=0.0, points_per_side=4))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each actor (--num-actors 2 on 2 CPUs): the same kernels, the same numbers
    try:
        dataset = CocoDataset.load(written["val"], storage=s3)
        prompts = ["segment vehicles", "segment green objects"]
        checked = 0
        for image_id in dataset.image_ids:
            reference = predictor.predict(dataset.load_image(image_id, s3), prompts)
            for prompt in prompts:
                got = sorted((r for r in rows if r["image_id"] == image_id and r["prompt"] == prompt),
                             key=lambda r: (r["kind"], -r["score"]))
                want = sorted(reference[prompt], key=lambda d: (d.kind, -d.score))
                assert len(got) == len(want)
                for g, w in zip(got, want):
                    assert g["kind"] == w.kind and abs(g["score"] - w.score) < 1e-4
                    a = {"size": g["segmentation"]["size"], "counts": g["segmentation"]["counts"].encode()}
                    b = {"size": w.rle["size"], "counts": w.rle["counts"].encode()}
                    assert mask_utils.iou([a], [b], [0])[0, 0] >= 0.99
                    checked += 1
    finally:
        torch.set_num_threads(threads)
    assert checked > 0


def test_killing_a_worker_node_mid_job_still_labels_everything_exactly_once(cluster, s3, labelled_setup):
    c, workers = cluster
    _, argv = labelled_setup
    # A bucket of 8 shards, so that work is left when the first commit is seen.
    written = write_demo_dataset("s3://talora-test/mnk", num_train=1, num_val=16, seed=8, shard_size=2, storage=s3)
    argv = list(argv)
    argv[argv.index("--images") + 1] = "s3://talora-test/mnk/val/images"
    argv[argv.index("--annotations") + 1] = written["val"]
    output = "s3://talora-test/mn-kill"
    env = {**os.environ, "RAY_ADDRESS": c.address}
    job = subprocess.Popen(job_command("segment_dataset", [*argv, "--output", output]), env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint_url)

    def committed() -> int:
        fs.invalidate_cache()
        return len(fs.glob("talora-test/mn-kill/*/_manifests/*.json"))

    import time

    deadline = time.monotonic() + 300
    while not committed():  # a condition, polled: the node dies mid-job, after a commit
        assert job.poll() is None and time.monotonic() < deadline, "the job ended or stalled before any commit"
        time.sleep(0.2)
    c.remove_node(workers[0])
    # The node is gone while shards are still to do: what follows is the job recovering, not a job
    # that had already finished.
    assert job.poll() is None and committed() < 8, "every shard was committed before the node died"
    import ray

    while any(n["NodeID"] == workers[0].node_id and n["Alive"] for n in ray.nodes()):  # the GCS's view, polled
        assert time.monotonic() < deadline, "the removed node is still alive"
        time.sleep(0.2)
    _, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-3000:]
    summary, run = _summary(output, s3)
    out, key = run.rsplit("/", 1)
    manifests = RunOutput(out, key, s3, PARQUET).manifests()
    items = [i for m in manifests.values() for i in m.items]
    assert len(manifests) == 8 and len(items) == len(set(items)) == 16
    rows, _ = _rows(run, s3)
    keys = [(r["image_uri"], r["prompt"], r["kind"], r["score"], r["segmentation"]["counts"]) for r in rows]
    assert len(keys) == len(set(keys))  # no row twice


def test_training_runs_one_worker_per_node(cluster, s3, tmp_path):
    written = write_demo_dataset("s3://talora-test/mnt", num_train=6, num_val=2, seed=9, storage=s3)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"hypernet": {"hidden_dim": 32, "num_layers": 1, "num_heads": 4}},
        "train": {"train_annotations": written["train"], "val_annotations": written["val"], "val_images": 2,
                  "batch_images": 2, "tasks_per_image": 2, "max_steps": 4, "val_every": 4, "num_workers": 2,
                  "cpus_per_worker": 1, "storage_path": "s3://talora-test/mn-runs", "name": "mn"},
    }))
    done = run_job("train_hypernet", ["--config", str(config), "--s3-endpoint-url", s3.endpoint_url], cluster[0].address)
    assert done.returncode == 0, done.stderr[-3000:]
    from talora.io.storage import read_bytes

    history = [json.loads(x) for x in read_bytes("s3://talora-test/mn-runs/mn/metrics.jsonl", s3).splitlines()]
    assert len(history[-1]["worker_nodes"].split(",")) == 2 and np.isfinite(history[-1]["loss"])
