"""Labels out as a dataset that trains as it is: COCO (pycocotools, torchvision) and YOLO-seg (Ultralytics)."""

import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from talora.batch.commit import RunOutput, ShardTracker
from talora.batch.parts import PARQUET
from talora.batch.rows import SCHEMA, detection_rows, error_row, write_summary
from talora.data.coco import CocoDataset
from talora.data.synthetic import write_demo_dataset
from talora.label.export.readback import read_back
from talora.label.export.run import ExportConfig, export_run
from talora.label.export.writer import Split
from talora.label.export.yolo import polygon
from talora.predict.predictor import encode_mask

PROMPTS = ["segment vehicles", "segment fruit"]


def labelled_run(tmp_path, storage=None, root=None):
    """A committed run over the demo val split: each image's ground-truth instances as masks of the
    prompt whose supercategory they belong to (score 0.9, or 0.2 for every third), its union as a
    semantic mask, and one error row; images without such instances have no row (backgrounds).
    Returns (run URI, images prefix, dataset, rows)."""
    root = root or str(tmp_path)
    written = write_demo_dataset(f"{root}/demo", num_train=0, num_val=6, seed=2, shard_size=3, storage=storage)
    dataset = CocoDataset.load(written["val"], storage=storage)
    prefix = f"{root}/demo/val/images"
    run = RunOutput(f"{root}/labels", "k", storage, PARQUET)
    tracker = ShardTracker(run, ["s"])
    rows, per_image = [], {}
    for n, image_id in enumerate(dataset.image_ids):
        record = dataset.images[image_id]
        found = {}
        for prompt, supercategory in zip(PROMPTS, ("vehicle", "fruit")):
            instances = [i for i in dataset.instances[image_id]
                         if dataset.categories[i.category_id]["supercategory"] == supercategory]
            found[prompt] = [encode_mask(i.mask(), "instance", 0.2 if (n + k) % 3 == 0 else 0.9)
                             for k, i in enumerate(instances)]
            if instances:
                found[prompt].append(encode_mask(np.any([i.mask() for i in instances], axis=0), "semantic", 0.8))
        if n == 1:
            found = {}  # nothing found on this one: a background
        mine = detection_rows(record.uri, image_id, "s", record.width, record.height, found, None, "m")
        per_image[record.uri] = (len(mine), (image_id, record.width, record.height))
        rows += mine
    bad = f"{prefix}/s/broken.jpg"
    rows.append(error_row(bad, 99, "s", "broken.jpg: empty file (0 bytes)", "m"))
    per_image[bad] = (1, None)
    part = run.write_part("s", 0, rows, SCHEMA)
    for uri, (count, image) in per_image.items():
        tracker.add("s", uri, count, part if count else None, "empty file" if uri == bad else None,
                    shard_items=len(per_image), image=image)
    write_summary(run.root, {"prompts": PROMPTS, "config": {"images": prefix, "task": None}}, storage)
    return run.root, prefix, dataset, rows


def _backgrounds(rows, dataset) -> set[int]:
    return set(dataset.image_ids) - {r["image_id"] for r in rows}


def test_a_coco_export_is_a_dataset_pycocotools_and_torchvision_read_as_it_is(tmp_path):
    from pycocotools.coco import COCO
    from torchvision.datasets import CocoDetection

    run, prefix, dataset, rows = labelled_run(tmp_path)
    out = tmp_path / "export"
    counts = export_run(ExportConfig(run, str(out), val_fraction=0.34))  # 6 images: 2 to val
    instances = [r for r in rows if r["kind"] == "instance"]
    assert counts["annotations"] == len(instances) and counts["errors"] == 1 and counts["categories"] == 2
    assert counts["images"] == 6 and (counts["train"], counts["val"]) == (4, 2)
    assert counts["backgrounds"] == len(_backgrounds(rows, dataset)) >= 2  # the forced one and the data's own

    seen = {}
    for split in ("train", "val"):
        annotations = str(out / "annotations" / f"instances_{split}.json")
        coco = COCO(annotations)
        assert [(c["name"], c["prompts"]) for c in coco.loadCats(coco.getCatIds())] == [(p, [p]) for p in PROMPTS]
        for image in coco.imgs.values():  # the image itself, in the dataset, with the size the run recorded
            record = dataset.images[image["id"]]
            assert (out / "images" / split / image["file_name"]).read_bytes() == (tmp_path / "demo" / "val" /
                                                                                  "images" / record.file_name).read_bytes()
            assert (image["width"], image["height"]) == (record.width, record.height)
            seen[image["id"]] = split
        for ann in coco.anns.values():  # every annotation is one of the run's instance masks, on its image
            row = next(r for r in instances
                       if r["image_id"] == ann["image_id"] and r["segmentation"] == ann["segmentation"])
            assert ann["iscrowd"] == 0 and ann["area"] == row["area"] and PROMPTS[ann["category_id"] - 1] == row["prompt"]
        loader = CocoDetection(str(out / "images" / split), annotations)  # as a trainer loads it, nothing moved
        assert len(loader) == len(coco.imgs)
        for k in range(len(loader)):
            image, targets = loader[k]
            assert image.size == (coco.imgs[loader.ids[k]]["width"], coco.imgs[loader.ids[k]]["height"])
            assert len(targets) == len(coco.getAnnIds(imgIds=[loader.ids[k]]))
    assert sorted(seen) == sorted(dataset.image_ids)  # every image once, the background included
    assert _backgrounds(rows, dataset) <= set(seen)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert errors == [{"image_uri": f"{prefix}/s/broken.jpg", "error": "broken.jpg: empty file (0 bytes)"}]

    found = read_back(str(out), "coco")
    assert [found[s]["images"] for s in ("train", "val")] == [4, 2] and found["val"]["missing files"] == 0
    next((out / "images" / "val").rglob("*.jpg")).unlink()  # a dataset with a file gone says so
    assert read_back(str(out), "coco")["val"]["missing files"] == 1


def test_min_score_and_kind_choose_the_annotations_and_filtered_images_stay_as_negatives(tmp_path):
    run, _, dataset, rows = labelled_run(tmp_path)
    high = export_run(ExportConfig(run, str(tmp_path / "high"), min_score=0.5, val_fraction=0.0))
    semantic = export_run(ExportConfig(run, str(tmp_path / "semantic"), kind="semantic"))
    assert high["annotations"] == sum(r["kind"] == "instance" and r["score"] >= 0.5 for r in rows) > 0
    assert semantic["annotations"] == sum(r["kind"] == "semantic" for r in rows) > 0
    assert high["images"] == semantic["images"] == len(dataset.image_ids)
    document = json.loads((tmp_path / "high" / "annotations" / "instances_train.json").read_text())
    assert all(a["score"] >= 0.5 for a in document["annotations"]) and len(document["images"]) == high["images"]
    assert json.loads((tmp_path / "high" / "annotations" / "instances_val.json").read_text())["images"] == []


def test_the_split_is_exact_and_spread_over_the_images():
    for total, fraction in ((10, 0.1), (7, 0.3), (40, 0.25), (3, 0.0), (1000, 0.15)):
        split = Split(total, fraction)
        order = [split.next() for _ in range(total)]
        assert order.count("val") == int(total * fraction) == split.counts["val"]
        if "val" in order:
            first = order.index("val")
            assert first < total / max(1, order.count("val")) + 1  # not all at the end


def test_yolo_export_is_read_by_ultralytics_as_it_is_labels_beside_images_backgrounds_included(tmp_path):
    import cv2
    import yaml

    run, prefix, dataset, rows = labelled_run(tmp_path)
    out = tmp_path / "yolo"
    counts = export_run(ExportConfig(run, str(out), format="yolo", val_fraction=0.34))
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["names"] == {0: PROMPTS[0], 1: PROMPTS[1]} and "path" not in data  # resolved beside the yaml
    assert (data["train"], data["val"]) == ("images/train", "images/val")
    checked = 0
    for image_id in dataset.image_ids:
        record = dataset.images[image_id]
        (image,) = out.glob(f"images/*/{record.file_name}")
        label = out / "labels" / image.relative_to(out / "images").parts[0] / record.file_name.replace(".jpg", ".txt")
        mine = [r for r in rows if r["image_id"] == image_id and r["kind"] == "instance"]
        lines = label.read_text().splitlines()  # a background has an empty one
        assert len(lines) == len(mine)
        for line in lines:  # the polygon, filled back in, is one of the image's masks of that class
            cls, *xy = line.split()
            points = (np.array(xy, dtype=float).reshape(-1, 2) * [record.width, record.height]).round().astype(np.int32)
            assert all(0 <= float(v) <= 1 for v in xy)
            filled = cv2.fillPoly(np.zeros((record.height, record.width), np.uint8), [points], 1).astype(bool)
            best = max(_iou(filled, _largest_part(r)) for r in mine if r["prompt"] == data["names"][int(cls)])
            assert best >= 0.8  # the mask's largest part (an occluded object keeps that one)
            checked += 1
    assert checked == counts["annotations"] > 0

    found = read_back(str(out), "yolo")  # Ultralytics' YOLODataset, from data.yaml's folders
    import torch
    from PIL import Image, UnidentifiedImageError

    with pytest.raises(UnidentifiedImageError):  # Ultralytics' process-wide patches were put back
        Image.open(io.BytesIO(b"not an image"))
    assert torch.save.__module__.startswith("torch")
    assert sum(f["images"] for f in found.values()) == 6 and (found["train"]["images"], found["val"]["images"]) == (4, 2)
    assert sum(f["segments"] for f in found.values()) == counts["annotations"]
    assert sum(f["backgrounds"] for f in found.values()) == sum(
        1 for i in dataset.image_ids if not any(r["image_id"] == i and r["kind"] == "instance" for r in rows)) >= 1


def test_linked_images_point_at_the_run_s_own_files_and_a_link_to_object_storage_is_refused(tmp_path):
    run, prefix, dataset, rows = labelled_run(tmp_path)
    counts = export_run(ExportConfig(run, str(tmp_path / "linked"), image_files="link", val_fraction=0.0))
    links = sorted((tmp_path / "linked" / "images" / "train").rglob("*.jpg"))
    assert len(links) == counts["images"] == 6 and all(p.is_symlink() for p in links)
    assert {str(p.resolve()) for p in links} == {str((tmp_path / "demo" / "val" / "images" / dataset.images[i].file_name)
                                                     .resolve()) for i in dataset.image_ids}
    with pytest.raises(ValueError, match="--image-files link needs local images and a local --out"):
        export_run(ExportConfig(run, "s3://bucket/dataset", image_files="link"))
    assert not (tmp_path / "bucket").exists()


def _largest_part(row) -> np.ndarray:
    import cv2

    mask = mask_utils.decode({"size": row["segmentation"]["size"], "counts": row["segmentation"]["counts"].encode()})
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])) if count > 1 else mask.astype(bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_a_mask_without_area_has_no_polygon():
    empty = mask_utils.encode(np.zeros((4, 5), np.uint8, order="F"))
    assert polygon({"size": [4, 5], "counts": empty["counts"].decode()}, 5, 4) == []


def test_a_bad_format_or_kind_is_refused_naming_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--format must be one of"):
        export_run(ExportConfig(str(tmp_path / "no-run"), "out", format="voc"))  # before the run is read
    with pytest.raises(ValueError, match="--kind"):
        ExportConfig("run", "out", kind="error")
    with pytest.raises(ValueError, match="--image-files"):
        ExportConfig("run", "out", image_files="move")
    with pytest.raises(ValueError, match="--val-fraction"):
        ExportConfig("run", "out", val_fraction=1.0)


def _many_rows_run(tmp_path, name: str, parts: int, rows_per_part: int) -> str:
    """A committed run of parts x rows_per_part instance rows, one image per row (16 x 16 masks)."""
    run = RunOutput(str(tmp_path / name), "k", None, PARQUET)
    tracker = ShardTracker(run, [f"s{p}" for p in range(parts)])
    mask = np.zeros((16, 16), bool)
    mask[4:9, 3:12] = True
    detection = encode_mask(mask, "instance", 0.9)
    for p in range(parts):
        rows, uris = [], [f"/bucket/s{p}/{i:05d}.jpg" for i in range(rows_per_part)]
        for i, uri in enumerate(uris):
            rows += detection_rows(uri, p * rows_per_part + i, f"s{p}", 16, 16, {"segment x": [detection]}, None, "m")
        part = run.write_part(f"s{p}", 0, rows, SCHEMA)
        for uri in uris:
            tracker.add(f"s{p}", uri, 1, part, shard_items=len(uris), image=(0, 16, 16))
    write_summary(run.root, {"prompts": ["segment x"], "config": {"images": "/bucket"}})
    return run.root


def test_exporting_streams_memory_stays_flat_from_2000_to_20000_rows(tmp_path):
    import tracemalloc

    peaks = {}
    for rows, parts in ((2_000, 4), (20_000, 40)):  # parts of 500 rows: ten times the images, same part size
        run = _many_rows_run(tmp_path, f"run{rows}", parts, 500)
        tracemalloc.start()
        # Linked: the 16 x 16 images of this run are names only, and a link needs no file behind it.
        counts = export_run(ExportConfig(run, str(tmp_path / f"out{rows}"), image_files="link"))
        peaks[rows] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        assert counts["images"] == counts["annotations"] == rows
    assert peaks[20_000] < peaks[2_000] * 1.5 + 1.0, peaks  # MB: one part at a time, whatever the run's size
