"""The labelling job on a local Ray cluster with moto S3: outputs, exactly-once, bad input, job submit."""

import contextlib
import io
import json
import os
import subprocess
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from talora.batch.commit import RunOutput
from talora.batch.parts import PARQUET
from talora.batch.rows import read_run
from talora.cli.main import main as talora_main
from talora.data.synthetic import write_demo_dataset
from talora.io.storage import read_bytes, write_bytes
from talora.label.export.readback import READERS, read_back
from tests.conftest import REPO, job_command, job_main, job_summary, run_here, run_job

pytestmark = pytest.mark.integration
FAST = ["--points-per-side", "4", "--batch-size", "2"]


def _label(argv):
    """The labelling job's main on this session's Ray, its driver in this process."""
    done = run_here("segment_dataset", argv)
    return done.returncode, (job_summary(done) if done.returncode == 0 else done.stderr)


def test_labels_go_to_s3_exactly_once_across_an_interruption_and_evaluate_and_export_read_them(ray_cluster, s3,
                                                                                               tmp_path):
    written = write_demo_dataset("s3://talora-test/demo", num_train=1, num_val=6, seed=4, shard_size=2, storage=s3)
    argv = ["--prompt", "segment vehicles", "--prompt", "segment red objects", "--images",
            "s3://talora-test/demo/val/images", "--annotations", written["val"], "--output", "s3://talora-test/labels",
            "--s3-endpoint-url", s3.endpoint_url, *FAST]
    code, first = _label([*argv, "--max-shards", "1"])  # "interrupted" after one shard
    assert code == 0 and first["images"] == 2
    # Its own driver (a job of its own on this Ray): the actor lines it prints are its actors' only,
    # however late the first job's actor lines reach this process.
    done = run_job("segment_dataset", argv, ray_cluster)
    second = job_summary(done)
    assert second["output"] == first["output"] and second["images"] == 4  # only what was missing
    # The adapters the first job generated are loaded, not generated again (OUTPUT/_adapters).
    assert "'segment vehicles': 'loaded'" in done.stdout + done.stderr
    assert "'segment vehicles': 'generated'" not in done.stdout + done.stderr

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

    report = job_summary(run_here("evaluate", ["--predictions", second["output"], "--annotations", written["val"],
                                              "--output", "s3://talora-test/eval", "--s3-endpoint-url", s3.endpoint_url]))
    assert report["images"] == 6 and report["unmapped_prompts"] == []
    assert all(m.images[i][1:] == [256, 256] for m in manifests.values() for i in m.items)  # sizes, as processed

    # The run out as datasets, read by the readers detectors train with (nothing moved by hand).
    backgrounds = sum(1 for m in manifests.values() for n in m.items.values() if n == 0)
    for fmt in ("coco", "yolo"):
        code, stdout, stderr = _talora(["export", "--predictions", second["output"], "--format", fmt, "--out",
                                        str(tmp_path / fmt), "--val-fraction", "0.34", "--read-back",
                                        "--s3-endpoint-url", s3.endpoint_url])
        assert code == 0, stderr[-3000:]
        counts = json.loads(stdout.splitlines()[0])
        assert (counts["images"], counts["train"], counts["val"], counts["backgrounds"]) == (6, 4, 2, backgrounds)
        found = read_back(str(tmp_path / fmt), fmt)
        assert sum(f["images"] for f in found.values()) == 6 and sum(f["backgrounds"] for f in found.values()) >= backgrounds
        assert sum(f.get("segments", f.get("annotations")) for f in found.values()) == counts["annotations"]
        assert f"read back ({READERS[fmt]}), val: 2 images" in stdout


def _talora(argv):
    """The `talora` command's main in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = talora_main(argv)
    return code, out.getvalue(), err.getvalue()


def test_the_same_job_started_twice_at_once_ends_with_every_image_s_rows_once(ray_cluster, tmp_path):
    written = write_demo_dataset(str(tmp_path / "demo"), num_train=1, num_val=6, seed=5, shard_size=2)
    argv = ["--prompt", "segment vehicles", "--images", str(tmp_path / "demo" / "val" / "images"), "--output",
            str(tmp_path / "labels"), "--annotations", written["val"], "--num-actors", "1", "--cpus-per-actor", "0.5",
            "--presence-thresh", "0", *FAST]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}  # a scheduler's retry beside the first submission
    drivers = [subprocess.Popen(job_command("segment_dataset", argv), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    summaries = []
    for driver in drivers:
        stdout, stderr = driver.communicate(timeout=900)
        summaries.append(job_summary(subprocess.CompletedProcess(driver.args, driver.returncode, stdout, stderr)))
    assert summaries[0]["output"] == summaries[1]["output"]

    out, key = summaries[0]["output"].rsplit("/", 1)
    manifests = RunOutput(out, key, None, PARQUET).manifests()
    items = [i for m in manifests.values() for i in m.items]
    assert len(items) == len(set(items)) == 6
    rows = read_run(summaries[0]["output"]).table
    per_image = Counter(rows["image_uri"].to_pylist())
    assert per_image == {i: n for m in manifests.values() for i, n in m.items.items() if n}  # each image's rows once
    assert sum(per_image.values()) > 0  # presence 0: instances were found, so a doubled part would show


def _encoded(image, fmt, **kw):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _corpus():
    """The 14-file bad-input corpus: name -> (bytes, expected error substring or None for valid)."""
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
        "thin.png": (_encoded(Image.new("RGB", (3000, 3), (200, 10, 10)), "PNG"), None),  # 0 rows when resized
        "tall.png": (_encoded(Image.new("RGB", (3, 3000), (10, 200, 10)), "PNG"), None),
    }


def test_the_bad_input_corpus_gives_error_rows_and_never_crashes(ray_cluster, s3):
    corpus = _corpus()
    for name, (data, _) in corpus.items():
        write_bytes(f"s3://talora-test/corpus/batch/{name}", data, s3)
    code, summary = _label(["--prompt", "segment vehicles", "--images", "s3://talora-test/corpus", "--output",
                            "s3://talora-test/corpus-labels", "--max-pixels", "10000", "--presence-thresh", "0",
                            "--s3-endpoint-url", s3.endpoint_url, *FAST])
    assert code == 0
    expected_errors = {n for n, (_, e) in corpus.items() if e}
    assert summary["images"] == 14 and summary["errors"] == len(expected_errors) == 4
    rows = read_run(summary["output"], s3).table.to_pylist()
    errors = {r["image_uri"].rsplit("/", 1)[-1]: r["error"] for r in rows if r["kind"] == "error"}
    assert set(errors) == expected_errors
    for name, message in errors.items():  # a sentence naming the file and the reason, no object reprs
        assert message.startswith(f"{name}: ") and corpus[name][1] in message and " at 0x" not in message, message
    sizes = {r["image_uri"].rsplit("/", 1)[-1]: (r["width"], r["height"]) for r in rows if r["kind"] != "error"}
    assert sizes.get("rotated.jpg", (48, 64)) == (48, 64)  # masks in the oriented frame (EXIF 6: 64x48 -> 48x64)
    assert sizes.get("one_pixel.png", (1, 1)) == (1, 1)
    assert sizes.get("thin.png", (3000, 3)) == (3000, 3) and sizes.get("tall.png", (3, 3000)) == (3, 3000)
    out, key = summary["output"].rsplit("/", 1)
    (manifest,) = RunOutput(out, key, s3, PARQUET).manifests().values()
    assert len(manifest.items) == 14 and set(manifest.errors) == {
        u for u in manifest.items if u.rsplit("/", 1)[-1] in expected_errors}
    status = json.loads(read_bytes(f"{summary['output']}/_status.json", s3))  # what a user watching the job reads
    assert status["state"] == "done" and status["shards"]["committed"] == status["shards"]["to_do"] == 1
    assert status["images"] == {"returned": 14, "errors": 4, "per_shard": 14.0, "estimated_total": 14}
    assert status["eta_s"] == 0


def test_bad_flags_fail_before_the_pool_starts(ray_cluster, tmp_path):
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
        code, err = job_main("segment_dataset", [*argv, "--output", str(tmp_path / "out")] if "--output" not in argv
                             else argv)
        assert code == 2 and message in err, (argv, err[-1000:])
    done = run_job("segment_dataset", ["--prompt", "x", "--images", str(tmp_path / "missing"), "--output",
                                       str(tmp_path / "out")], ray_cluster)  # as a shell sees it
    assert done.returncode == 2 and "no such image prefix" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_boxes_on_s3_become_one_instance_each_and_boxes_of_unlabelled_images_are_reported(ray_cluster, s3):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from talora.data.coco import CocoDataset

    written = write_demo_dataset("s3://talora-test/bx", num_train=1, num_val=4, seed=6, shard_size=2, storage=s3)
    dataset = CocoDataset.load(written["val"], "s3://talora-test/bx/val/images", s3)
    records = [dataset.images[i] for i in dataset.image_ids]
    boxes = [{"image_uri": records[0].uri, "bbox": list(x.bbox), "prompt": None} for x in dataset.instances[records[0].id]]
    boxes.append({"image_uri": records[1].uri, "bbox": [4.0, 4.0, 40.0, 30.0], "prompt": "segment fruit"})
    boxes.append({"image_uri": "s3://talora-test/bx/val/images/elsewhere/missing.jpg", "bbox": [1.0, 1.0, 5.0, 5.0],
                  "prompt": None})
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(boxes), buffer)
    write_bytes("s3://talora-test/bx/boxes.parquet", buffer.getvalue(), s3)
    code, summary = _label(["--prompt", "segment vehicles", "--prompt", "segment fruit", "--images",
                            "s3://talora-test/bx/val/images", "--boxes", "s3://talora-test/bx/boxes.parquet",
                            "--output", "s3://talora-test/bx-labels", "--s3-endpoint-url", s3.endpoint_url, *FAST])
    assert code == 0, summary
    full = json.loads(read_bytes(f"{summary['output']}/_summary.json", s3))
    assert full["boxes"]["boxes"] == len(boxes) and full["boxes"]["images_labelled"] == 2
    assert full["boxes"]["not_labelled_examples"] == ["s3://talora-test/bx/val/images/elsewhere/missing.jpg"]
    rows = [r for r in read_run(summary["output"], s3).table.to_pylist() if r["kind"] == "instance"]
    per = {(uri, prompt): sum(r["image_uri"] == uri and r["prompt"] == prompt for r in rows)
           for uri in (records[0].uri, records[1].uri, records[2].uri) for prompt in ("segment vehicles", "segment fruit")}
    n = len(dataset.instances[records[0].id])
    assert per == {(records[0].uri, "segment vehicles"): n, (records[0].uri, "segment fruit"): n,  # every prompt
                   (records[1].uri, "segment vehicles"): 0, (records[1].uri, "segment fruit"): 1,  # its prompt only
                   (records[2].uri, "segment vehicles"): 0, (records[2].uri, "segment fruit"): 0}  # no box: none
