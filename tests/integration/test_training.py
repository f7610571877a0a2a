"""Training on Ray Train (V2) with a local cluster and moto S3: loss, checkpoints, resume, modes."""

import json

import pytest
import s3fs
import torch
import yaml

from talora.model.files import load_adapter
from talora.data.synthetic import write_demo_dataset
from talora.model.loading import load_task_aware_sam
from talora.model.loading import load_backbone, save_backbone
from talora.io.storage import read_bytes
from tests.conftest import job_main, job_summary, run_here, run_job

pytestmark = pytest.mark.integration


@pytest.fixture
def train_setup(s3, tmp_path):
    """Tiny demo data and a vit_tiny base on S3, and a writer of run configs."""
    written = write_demo_dataset("s3://talora-test/demo", num_train=10, num_val=2, seed=3, storage=s3)
    torch.manual_seed(0)
    save_backbone(load_backbone("vit_tiny"), "s3://talora-test/models/base.safetensors", s3)

    def config(**train):
        data = {
            "model": {"sam": {"sam_type": "vit_tiny", "checkpoint": "s3://talora-test/models/base.safetensors"},
                      "hypernet": {"hidden_dim": 32, "num_layers": 1, "num_heads": 4}},
            "train": {"train_annotations": written["train"], "val_annotations": written["val"], "val_images": 2,
                      "batch_images": 2, "tasks_per_image": 2, "storage_path": "s3://talora-test/runs",
                      "warmup_steps": 1, "log_every": 5, "cpus_per_worker": 0.5, "lr": 0.003, **train},
        }
        path = tmp_path / f"config-{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)

    return config


def _train(config, s3, *extra) -> int:
    """Runs the training job's main on this session's Ray, its driver in this process (what a shell
    adds is proved once, in test_bad_configs_fail_before_any_worker_starts); returns its exit code
    (its stderr in _train.err)."""
    code, _train.err = job_main("train_hypernet", ["--config", config, "--s3-endpoint-url", s3.endpoint_url, *extra])
    return code


def _metrics(s3, name):
    return [json.loads(line) for line in read_bytes(f"s3://talora-test/runs/{name}/metrics.jsonl", s3).splitlines()]


def _checkpoints(s3, name):
    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint_url)
    return sorted(p for p in fs.ls(f"talora-test/runs/{name}") if fs.exists(f"{p}/state.json"))


def test_two_workers_reduce_the_loss_and_checkpoint_to_s3(ray_cluster, s3, train_setup):
    config = train_setup(name="ddp", max_steps=30, val_every=15, num_workers=2)
    assert _train(config, s3, "--adapter-type", "tucker") == 0  # the TA-LoRA cores: trained by the same loop
    history = _metrics(s3, "ddp")
    assert [h["step"] for h in history] == list(range(1, 31))
    first, last = history[:5], history[-5:]
    assert sum(h["loss"] for h in last) < sum(h["loss"] for h in first)
    assert "val_score" in history[14] and "val_miou_seen" in history[-1]
    checkpoints = _checkpoints(s3, "ddp")
    assert len(checkpoints) == 2
    summary = json.loads(read_bytes("s3://talora-test/runs/ddp/summary.json", s3))
    assert summary["final_metrics"]["step"] == 30 and summary["best_checkpoint"]
    scores = {c.rsplit("/", 1)[1]: json.loads(read_bytes(f"s3://{c}/state.json", s3))["metrics"]["val_score"]
              for c in checkpoints}
    assert scores[summary["best_checkpoint"].rstrip("/").rsplit("/", 1)[1]] == max(scores.values())  # ranked, not first
    from talora.train.checkpoint import run_checkpoint

    assert run_checkpoint("s3://talora-test/runs/ddp", "best", s3) == "s3://" + summary["best_checkpoint"].lstrip("/")
    latest = run_checkpoint("s3://talora-test/runs/ddp", "latest", s3)
    assert latest.rsplit("/", 1)[1] == checkpoints[-1].rsplit("/", 1)[1]
    assert read_bytes(f"{latest}/hypernet.safetensors", s3)  # what `talora checkpoint --file` points at
    model = load_task_aware_sam(f"s3://{checkpoints[-1]}/hypernet.safetensors", storage=s3)
    assert len(model.targets) == 36 and model.config.hypernet.adapter_type == "tucker"
    assert model.hypernet.core_head.weight.abs().sum() > 0  # the core was trained


def test_a_failed_run_relaunched_with_the_same_name_resumes_and_a_changed_config_is_refused(
    ray_cluster, s3, train_setup, monkeypatch
):
    config = train_setup(name="resume", max_steps=8, val_every=4)
    monkeypatch.setenv("TALORA_FAIL_AT_STEP", "4")
    assert _train(config, s3) == 1  # died right after the step-4 checkpoint
    assert len(_checkpoints(s3, "resume")) == 1
    monkeypatch.delenv("TALORA_FAIL_AT_STEP")

    assert _train(config, s3) == 0
    history = _metrics(s3, "resume")
    assert [h["step"] for h in history] == list(range(1, 9))
    assert history[-1]["start_step"] == 4  # resumed from step 4, not from zero
    assert history[3]["start_step"] == 0

    changed = train_setup(name="resume", max_steps=8, val_every=4, lr=0.01)
    assert _train(changed, s3) == 2
    err = _train.err
    assert "exists with another config" in err and "train.lr: 0.003 -> 0.01" in err


def test_static_mode_produces_a_loadable_adapter(ray_cluster, s3, train_setup):
    assert _train(train_setup(name="static", mode="static", task="supercategory:vehicle", max_steps=4, val_every=4), s3) == 0
    (checkpoint,) = _checkpoints(s3, "static")
    from talora.config import default_config

    targets = load_backbone("vit_tiny").find_targets(default_config("vit_tiny").lora, 1)
    adapter, header = load_adapter(f"s3://{checkpoint}/adapter.safetensors", targets, "vit_tiny", s3)
    assert header.prompt == "supercategory:vehicle" and any(b.abs().sum() > 0 for _, b in adapter.weights.values())


def test_bad_configs_fail_before_any_worker_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    for text, message in (("train:\n  train_annotations: a.json\n  rnak: 3\n", "train.rnak"),
                          ("train:\n  train_annotations: a.json\n  batch_images: 0\n", "train.batch_images must be >= 1"),
                          (f"train:\n  train_annotations: {tmp_path}/missing.json\n  storage_path: {tmp_path}/runs\n",
                           "missing.json")):
        bad.write_text(text)
        code, err = job_main("train_hypernet", ["--config", str(bad)])
        assert code == 2 and message in err, (message, err[-500:])
    done = run_job("train_hypernet", ["--config", str(bad)])  # the last one again, as a shell sees it
    assert done.returncode == 2 and "missing.json" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "runs").exists()


def test_training_streams_the_embedding_cache_and_refuses_a_mismatched_one(ray_cluster, s3, train_setup):
    config = train_setup(name="cached", max_steps=4, val_every=4)
    spec = yaml.safe_load(open(config))
    cache = job_summary(run_here("embed_images", ["--annotations", spec["train"]["train_annotations"], "--sam-checkpoint",
                                                  spec["model"]["sam"]["checkpoint"], "--output", "s3://talora-test/cache",
                                                  "--s3-endpoint-url", s3.endpoint_url]))["output"]

    assert _train(config, s3, "--embeddings", cache) == 0
    assert [h["step"] for h in _metrics(s3, "cached")] == [1, 2, 3, 4]

    spec["model"]["lora"] = {"tail_blocks": 2}  # another split: the cached features are not its input
    spec["train"]["name"] = "cached-mismatch"
    other = config.replace(".yaml", "-tail2.yaml")
    open(other, "w").write(yaml.safe_dump(spec))
    assert _train(other, s3, "--embeddings", cache) == 2
    assert "does not match this model" in _train.err


def test_pretrain_mode_trains_the_whole_sam_into_a_loadable_base_and_refuses_the_cache(ray_cluster, s3, train_setup):
    config = train_setup(name="pretrain", mode="pretrain", max_steps=6, val_every=3, prompts_per_image=3)
    assert _train(config, s3) == 0
    history = _metrics(s3, "pretrain")
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert {"val_point_miou", "val_box_miou", "val_head_category", "val_head_color"} <= set(history[-1])
    assert {"loss_aux_category", "loss_points", "loss_boxes"} <= set(history[0])
    checkpoints = _checkpoints(s3, "pretrain")
    assert len(checkpoints) == 2
    start = load_backbone("vit_tiny", "s3://talora-test/models/base.safetensors", s3).model
    trained = load_backbone("vit_tiny", f"s3://{checkpoints[-1]}/sam.safetensors", s3).model  # loads strictly
    for name, before in start.state_dict().items():
        if name.startswith(("image_encoder.blocks.0.", "prompt_encoder.point_embeddings.1.", "mask_decoder.transformer.")):
            assert not torch.equal(before, trained.state_dict()[name]), f"{name} was not trained"

    assert _train(config, s3, "--name", "pretrain-cached", "--embeddings", "s3://talora-test/cache/run") == 2
    assert "pretraining trains the trunk itself" in _train.err
