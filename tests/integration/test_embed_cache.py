"""The embedding cache job against moto S3 on loopback and a local Ray cluster."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from talora.batch.commit import RunOutput
from talora.data.coco import CocoDataset
from talora.io.images import decode_image
from talora.data.synthetic import write_demo_dataset
from talora.train.embed import cache_dataset, cache_key_inputs, check_cache_key, features_of, read_cache
from talora.model.loading import load_backbone, save_backbone
from tests.conftest import job_main, job_summary, run_here, run_job
from talora.io.storage import read_bytes, write_bytes
from talora.batch.parts import PARQUET

pytestmark = pytest.mark.integration
JOB = os.path.join(os.path.dirname(__file__), "..", "..", "jobs", "embed_images.py")


@pytest.fixture
def demo_on_s3(s3):
    """8 demo images in shard sub-folders of 3 and a vit_tiny checkpoint, all on moto S3."""
    written = write_demo_dataset("s3://talora-test/demo", num_train=8, num_val=1, seed=5, shard_size=3, storage=s3)
    torch.manual_seed(0)
    sam = load_backbone("vit_tiny")
    save_backbone(sam, "s3://talora-test/models/sam_vit_tiny.safetensors", s3)
    return written["train"], "s3://talora-test/models/sam_vit_tiny.safetensors", sam




def test_embed_images_writes_the_cache_to_s3_and_a_rerun_is_idempotent(ray_cluster, s3, demo_on_s3):
    annotations, checkpoint, sam = demo_on_s3
    # One image is corrupt: it must become an error entry, not a crash.
    dataset = CocoDataset.load(annotations, storage=s3)
    bad_uri = dataset.images[dataset.image_ids[4]].uri
    write_bytes(bad_uri, b"not an image", s3)
    argv = ["--annotations", annotations, "--sam-checkpoint", checkpoint, "--output", "s3://talora-test/cache",
            "--batch-size", "2", "--s3-endpoint-url", s3.endpoint_url]
    first = job_summary(run_here("embed_images", argv))
    assert first["images"] == 8 and first["errors"] == 1

    table = read_cache(first["output"], s3)
    assert table.num_rows == 7 and len(set(table["image_uri"].to_pylist())) == 7
    run = RunOutput(*first["output"].rsplit("/", 1), s3, PARQUET)
    manifests = run.manifests()
    assert sorted(manifests) == ["shard-00000", "shard-00001", "shard-00002"]
    errors = {k: v for m in manifests.values() for k, v in m.errors.items()}
    assert list(errors) == [bad_uri] and "cannot identify image" in errors[bad_uri]
    assert sum(m.items[bad_uri] for m in manifests.values() if bad_uri in m.items) == 0

    # The cached features are the trunk's output for that image (fp16).
    row = table.slice(0, 1).to_pylist()[0]
    x, input_size = sam.preprocess(decode_image(read_bytes(row["image_uri"], s3)))
    with torch.no_grad():
        expected = sam.embed_trunk(x[None], 1)[0].numpy()
    assert row["kind"] == "trunk" and (row["input_height"], row["input_width"]) == input_size
    np.testing.assert_allclose(features_of(row).astype(np.float32), expected, atol=2e-2, rtol=1e-2)

    # Training streams the same rows through Ray Data, shuffled locally.
    streamed = [r["image_uri"] for b in cache_dataset(first["output"], s3).iter_batches(
        batch_size=3, local_shuffle_buffer_size=4, batch_format="pandas") for r in b.to_dict("records")]
    assert sorted(streamed) == sorted(table["image_uri"].to_pylist())

    # Rerun: every shard is committed, nothing is recomputed or duplicated.
    second = job_summary(run_here("embed_images", argv))
    assert second["output"] == first["output"] and second["images"] == 0
    assert read_cache(first["output"], s3).num_rows == 7

    # The cache refuses a model whose trunk or split differs.
    key = cache_key_inputs("vit_tiny", sam.trunk_digest(1), 1, 256)
    check_cache_key(first["output"], key, s3)
    with pytest.raises(ValueError, match="tail_blocks: cache has 1, model has 2"):
        check_cache_key(first["output"], {**key, "tail_blocks": 2}, s3)


def test_credentials_never_appear_in_any_output(ray_cluster, s3, demo_on_s3, tmp_path):
    annotations, checkpoint, _ = demo_on_s3
    env_secret, flag_secret = "ENVSECRETf4k3x9", "FLAGSECRETq7z2w1"
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": env_secret, "RAY_ADDRESS": ray_cluster,
           "PYTHONPATH": os.getcwd()}
    out = subprocess.run(
        [sys.executable, JOB, "--annotations", annotations, "--sam-checkpoint", checkpoint, "--output",
         "s3://talora-test/leak", "--max-images", "2", "--s3-endpoint-url", s3.endpoint_url,
         "--s3-access-key-id", "testing", "--s3-secret-access-key", flag_secret],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    # A failing run prints its error too: a missing checkpoint, with the secrets in play.
    failed = subprocess.run(
        [sys.executable, JOB, "--annotations", annotations, "--sam-checkpoint", "s3://talora-test/none.pth",
         "--output", "s3://talora-test/leak", "--s3-endpoint-url", s3.endpoint_url,
         "--s3-access-key-id", "testing", "--s3-secret-access-key", flag_secret],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert failed.returncode == 2 and "s3://talora-test/none.pth" in failed.stderr
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint_url)
    written = [fs.cat_file(p) for p in fs.find("talora-test/leak") if not p.endswith(".parquet")]
    assert any(b"_summary" in p.encode() for p in fs.find("talora-test/leak"))
    for text in [out.stdout, out.stderr, failed.stdout, failed.stderr, *[w.decode() for w in written]]:
        assert env_secret not in text and flag_secret not in text


def test_bad_input_fails_before_any_work_with_a_clear_message(tmp_path):
    done = run_job("embed_images", ["--annotations", str(tmp_path / "missing.json"), "--output", str(tmp_path / "out")])
    assert done.returncode == 2 and "missing.json" in done.stderr
    code, err = job_main("embed_images", ["--annotations", str(tmp_path / "x.json"), "--output", "memory://cache"])
    assert code == 2 and "memory:// lives inside one process" in err
    assert not (tmp_path / "out").exists()


def test_demo_data_round_trips_through_s3_and_the_coco_reader(s3):
    from talora.data.synthetic import make_split

    written = write_demo_dataset("s3://talora-test/rt", num_train=6, num_val=2, seed=9, storage=s3)
    expected, files = make_split(6, seed=9)
    dataset = CocoDataset.load(written["train"], storage=s3)
    assert dataset.image_ids == [im["id"] for im in expected["images"]]
    assert len(dataset.all_instances()) == len(expected["annotations"]) and not dataset.warnings
    first = dataset.images[1]
    assert first.uri == "s3://talora-test/rt/train/images/000000.jpg"
    assert np.array_equal(dataset.load_image(1, s3), decode_image(files["000000.jpg"]))
