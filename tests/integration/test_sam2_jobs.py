"""SAM 2.1 in the jobs: labelling, the embedding cache and training take --sam-type sam2_tiny."""

import json

import pytest
import yaml

from talora.batch.commit import RunOutput
from talora.data.synthetic import write_demo_dataset
from talora.train.embed import features_of, read_cache
from talora.batch.parts import PARQUET
from talora.batch.rows import read_run
from tests.conftest import job_summary, run_here

pytestmark = pytest.mark.integration


@pytest.fixture
def demo(tmp_path):
    return write_demo_dataset(str(tmp_path / "demo"), num_train=6, num_val=4, seed=7, shard_size=2)


def test_a_sam2_tiny_labelling_job_writes_rows_through_the_commit_protocol(ray_cluster, demo, tmp_path):
    summary = job_summary(run_here("segment_dataset", [
        "--prompt", "segment vehicles", "--prompt", "segment fruit", "--sam-type", "sam2_tiny", "--untrained",
        "--images", str(tmp_path / "demo" / "val" / "images"), "--annotations", demo["val"],
        "--output", str(tmp_path / "labels"), "--presence-thresh", "0", "--points-per-side", "4"]))
    assert summary["images"] == 4 and summary["rows"] > 0 and summary["errors"] == 0
    out, key = summary["output"].rsplit("/", 1)
    assert sorted(RunOutput(out, key, None, PARQUET).manifests()) == ["shard-00000", "shard-00001"]
    rows = read_run(summary["output"]).table.to_pylist()
    assert {r["model"] for r in rows} == {"sam2_tiny+untrained"} and {r["kind"] for r in rows} <= {"semantic", "instance"}
    assert all(r["segmentation"]["size"] == [256, 256] for r in rows)  # masks at the original size


def test_pretraining_a_sam2_tiny_base_then_its_embedding_cache_and_a_hypernet_run_on_it(ray_cluster, demo, tmp_path):
    """`--sam-type sam2_tiny` on the shipped vit_tiny pretraining config: the job pretrains a SAM 2
    base (its high-resolution skips held at zero over the first steps), whose sam.safetensors the
    embedding cache and a hypernet run then take; a vit_tiny base is refused by name."""
    from talora.backbones import detect_variant
    from talora.model.loading import read_state_dict

    data = ["--train-annotations", demo["train"], "--val-annotations", demo["val"], "--cpus-per-worker", "0.5",
            "--storage-path", str(tmp_path / "runs")]
    done = run_here("train_hypernet", ["--config", "configs/demo_pretrain.yaml", "--sam-type", "sam2_tiny",
                                       "--max-steps", "2", "--val-every", "2", "--name", "pretrain", *data])
    assert done.returncode == 0, done.stderr[-3000:]
    base = job_summary(done)["best_checkpoint"] + "/sam.safetensors"
    state = read_state_dict(base)
    assert detect_variant(state) == "sam2_tiny"
    skips = [k for k in state if k.startswith(("sam_mask_decoder.conv_s0.", "sam_mask_decoder.conv_s1."))]
    assert len(skips) == 4 and not any(state[k].any() for k in skips)  # held at zero by the config's 500 steps

    cache = job_summary(run_here("embed_images", ["--annotations", demo["train"], "--sam-type", "sam2_tiny",
                                                  "--sam-checkpoint", base, "--output", str(tmp_path / "cache")]))
    rows = read_cache(cache["output"]).to_pylist()
    assert len(rows) == 6 and features_of(rows[0]).shape == (8, 8, 64 * 16 + 256)  # the packed trunk, g = 256 / 32

    config = {"model": {"sam": {"sam_type": "sam2_tiny", "checkpoint": base}, "hypernet": {"hidden_dim": 32, "num_layers": 1, "num_heads": 4}},
              "train": {"train_annotations": demo["train"], "val_annotations": demo["val"], "val_images": 2,
                        "batch_images": 2, "tasks_per_image": 2, "max_steps": 4, "log_every": 2, "val_every": 4,
                        "warmup_steps": 1, "cpus_per_worker": 0.5, "storage_path": str(tmp_path / "runs"),
                        "name": "sam2"}}
    (tmp_path / "sam2.yaml").write_text(yaml.safe_dump(config))
    done = run_here("train_hypernet", ["--config", str(tmp_path / "sam2.yaml"), "--embeddings", cache["output"]])
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "sam2" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["loss"] == m["loss"] for m in metrics if "loss" in m)  # finite, logged
    assert list((tmp_path / "runs" / "sam2").glob("checkpoint_*/hypernet.safetensors"))

    refused = run_here("train_hypernet", ["--config", "configs/demo_cpu.yaml", "--mode", "static", "--task",
                                          "supercategory:vehicle", "--sam-type", "vit_tiny", "--sam-checkpoint", base,
                                          "--name", "x", *data])
    assert refused.returncode != 0 and "has keys for sam2_tiny, but --sam-type vit_tiny" in refused.stderr
    assert not (tmp_path / "runs" / "x").exists()
