"""The labelling job on a local Ray cluster with moto S3: outputs, exactly-once, bad input, job submit."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from talora.commit import RunOutput
from talora.data.synthetic import write_demo_dataset
from talora.predictions import read_run
from talora.storage import read_bytes, write_bytes
from tests.conftest import job_summary, run_job
from talora.predictions import PARQUET

pytestmark = pytest.mark.integration
FAST = ["--points-per-side", "4", "--batch-size", "2"]


def _label(argv, ray_address):
    done = run_job("segment_dataset", argv, ray_address)
    return done.returncode, (job_summary(done) if done.returncode == 0 else done.stderr)


def test_labels_go_to_s3_exactly_once_across_an_interruption_and_evaluate_reads_them(ray_cluster, s3):
    written = write_demo_dataset("s3://talora-test/demo", num_train=1, num_val=6, seed=4, shard_size=2, storage=s3)
    argv = ["--prompt", "segment vehicles", "--prompt", "segment red objects", "--images",
            "s3://talora-test/demo/val/images", "--annotations", written["val"], "--output", "s3://talora-test/labels",
            "--s3-endpoint-url", s3.endpoint_url, *FAST]
    code, first = _label([*argv, "--max-shards", "1"], ray_cluster)  # "interrupted" after one shard
    assert code == 0 and first["images"] == 2
    code, second = _label(argv, ray_cluster)
    assert code == 0 and second["output"] == first["output"] and second["images"] == 4  # only what was missing

    out, key = second["output"].rsplit("/", 1)
    manifests = RunOutput(out, key, s3, PARQUET).manifests()
    assert sorted(manifests) == ["shard-00000", "shard-00001", "shard-00002"]
    items = [i for m in manifests.values() for i in m.items]
    assert len(items) == len(set(items)) == 6  # every image exactly once, zero-row images included
    run_rows = read_run(second["output"], s3)
    table, processed = run_rows.table, run_rows.processed
    assert sorted(processed) == sorted(items)
    rows = table.to_pylist()
    assert {r["shard"] for r in rows} <= set(manifests) and {r["prompt"] for r in rows} <= {"segment vehicles", "segment red objects"}
    assert all(r["image_id"] in range(1, 7) for r in rows)  # COCO ids from --annotations

    report = job_summary(run_job("evaluate", ["--predictions", second["output"], "--annotations", written["val"],
                                              "--output", "s3://talora-test/eval", "--s3-endpoint-url", s3.endpoint_url]))
    assert report["images"] == 6 and report["unmapped_prompts"] == []


def _encoded(image, fmt, **kw):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _corpus():
    """The 12-file bad-input corpus: name -> (bytes, expected error substring or None for valid)."""
    rgb = Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8))
    png = _encoded(rgb, "PNG")
    gif = [Image.new("P", (32, 24), i) for i in (10, 200)]
    gif_bytes = io.BytesIO()
    gif[0].save(gif_bytes, format="GIF", save_all=True, append_images=gif[1:], duration=50, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    gradient = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (16, 1))
    return {
        "zero.jpg": (b"", "empty file"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "text.jpg": (b"this is not an image\n" * 10, "cannot identify image"),
        "animated.gif": (gif_bytes.getvalue(), None),  # documented: its first frame is labelled
        "huge.png": (_encoded(Image.new("RGB", (200, 100)), "PNG"), "exceeds the limit of 10000"),
        "one_pixel.png": (_encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), None),
        "gradient16.png": (_encoded(Image.fromarray(gradient), "PNG"), None),
        "cmyk.jpg": (_encoded(rgb.convert("CMYK"), "JPEG"), None),
        "rotated.jpg": (_encoded(rgb, "JPEG", exif=exif), None),
        "grey.png": (_encoded(rgb.convert("L"), "PNG"), None),
        "rgba.png": (_encoded(rgb.convert("RGBA"), "PNG"), None),
        "ünïcödé name with spaces.png": (png, None),
    }


def test_the_bad_input_corpus_gives_error_rows_and_never_crashes(ray_cluster, s3):
    corpus = _corpus()
    for name, (data, _) in corpus.items():
        write_bytes(f"s3://talora-test/corpus/batch/{name}", data, s3)
    code, summary = _label(["--prompt", "segment vehicles", "--images", "s3://talora-test/corpus", "--output",
                            "s3://talora-test/corpus-labels", "--max-pixels", "10000", "--presence-thresh", "0",
                            "--s3-endpoint-url", s3.endpoint_url, *FAST], ray_cluster)
    assert code == 0
    expected_errors = {n for n, (_, e) in corpus.items() if e}
    assert summary["images"] == 12 and summary["errors"] == len(expected_errors) == 4
    rows = read_run(summary["output"], s3).table.to_pylist()
    errors = {r["image_uri"].rsplit("/", 1)[-1]: r["error"] for r in rows if r["kind"] == "error"}
    assert set(errors) == expected_errors
    for name, message in errors.items():
        assert corpus[name][1] in message, (name, message)
    sizes = {r["image_uri"].rsplit("/", 1)[-1]: (r["width"], r["height"]) for r in rows if r["kind"] != "error"}
    assert sizes.get("rotated.jpg", (48, 64)) == (48, 64)  # masks in the oriented frame (EXIF 6: 64x48 -> 48x64)
    assert sizes.get("one_pixel.png", (1, 1)) == (1, 1)
    out, key = summary["output"].rsplit("/", 1)
    (manifest,) = RunOutput(out, key, s3, PARQUET).manifests().values()
    assert len(manifest.items) == 12 and set(manifest.errors) == {
        u for u in manifest.items if u.rsplit("/", 1)[-1] in expected_errors}
    status = json.loads(read_bytes(f"{summary['output']}/_status.json", s3))  # what a user watching the job reads
    assert status["state"] == "done" and status["shards"]["committed"] == status["shards"]["to_do"] == 1
    assert status["images"] == {"returned": 12, "errors": 4, "per_shard": 12.0, "estimated_total": 12}
    assert status["eta_s"] == 0


def test_bad_flags_fail_before_the_pool_starts(tmp_path):
    (tmp_path / "imgs").mkdir()
    for argv, message in [
        (["--prompt", "  ", "--images", str(tmp_path / "imgs")], "prompt 0 is empty"),
        (["--prompt", "x", "--images", str(tmp_path / "imgs"), "--num-actors", "0"], "--num-actors must be >= 1"),
        (["--prompt", "x", "--images", str(tmp_path / "imgs"), "--score-thresh", "2"], "score-thresh must be in [0, 1]"),
        (["--prompt", "x", "--images", str(tmp_path / "imgs"), "--output", "memory://x"], "memory://"),
        (["--prompt", "x", "--images", str(tmp_path / "imgs"), "--hypernet", str(tmp_path / "no.safetensors")],
         "no.safetensors"),
        (["--prompt", "x", "--images", str(tmp_path / "imgs")], "no images under"),
        (["--prompt", "x", "--images", str(tmp_path / "missing")], "no such image prefix"),
    ]:
        done = run_job("segment_dataset", [*argv, "--output", str(tmp_path / "out")] if "--output" not in argv else argv)
        assert done.returncode == 2, argv
        assert message in done.stderr, message
