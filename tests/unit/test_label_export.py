"""Labels out as a training dataset: COCO instances (pycocotools, torchvision) and YOLO-seg."""

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from talora.batch.commit import RunOutput, ShardTracker
from talora.batch.parts import PARQUET
from talora.batch.rows import SCHEMA, detection_rows, error_row, write_summary
from talora.data.coco import CocoDataset
from talora.data.synthetic import write_demo_dataset
from talora.label.export.run import ExportConfig, export_run
from talora.label.export.yolo import polygon
from talora.predict.predictor import encode_mask

PROMPTS = ["segment vehicles", "segment fruit"]


def labelled_run(tmp_path, storage=None, root=None):
    """A committed run over the demo val split: each image's ground-truth instances as masks of the
    prompt whose supercategory they belong to (score 0.9, or 0.2 for every third), its union as a
    semantic mask, and one error row. Returns (run URI, images prefix, dataset)."""
    root = root or str(tmp_path)
    written = write_demo_dataset(f"{root}/demo", num_train=0, num_val=6, seed=2, shard_size=3, storage=storage)
    dataset = CocoDataset.load(written["val"], storage=storage)
    prefix = f"{root}/demo/val/images"
    run = RunOutput(f"{root}/labels", "k", storage, PARQUET)
    tracker = ShardTracker(run, ["s"])
    rows = []
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
        rows += detection_rows(record.uri, image_id, "s", record.width, record.height, found, None, "m")
    bad = f"{prefix}/s/broken.jpg"
    rows.append(error_row(bad, 99, "s", "broken.jpg: empty file (0 bytes)", "m"))
    part = run.write_part("s", 0, rows, SCHEMA)
    for uri in [dataset.images[i].uri for i in dataset.image_ids] + [bad]:
        tracker.add("s", uri, 1, part, shard_items=len(dataset.image_ids) + 1)
    write_summary(run.root, {"prompts": PROMPTS, "config": {"images": prefix, "task": None}}, storage)
    return run.root, prefix, dataset, rows


def test_a_coco_export_loads_in_pycocotools_and_torchvision_with_the_runs_masks(tmp_path):
    from pycocotools.coco import COCO
    from torchvision.datasets import CocoDetection

    run, prefix, dataset, rows = labelled_run(tmp_path)
    counts = export_run(ExportConfig(run, str(tmp_path / "export" / "instances.json")))
    instances = [r for r in rows if r["kind"] == "instance"]
    assert counts["annotations"] == len(instances) and counts["errors"] == 1 and counts["categories"] == 2

    coco = COCO(str(tmp_path / "export" / "instances.json"))
    assert [(c["name"], c["prompts"]) for c in coco.loadCats(coco.getCatIds())] == [(p, [p]) for p in PROMPTS]
    assert {i["file_name"] for i in coco.imgs.values()} <= {dataset.images[i].file_name for i in dataset.image_ids}
    for ann in coco.anns.values():  # every annotation is one of the run's instance masks, on its image
        row = next(r for r in instances if r["image_id"] == ann["image_id"] and r["segmentation"] == ann["segmentation"])
        assert ann["iscrowd"] == 0 and ann["area"] == row["area"] and PROMPTS[ann["category_id"] - 1] == row["prompt"]
        assert coco.annToMask(ann).shape == (coco.imgs[ann["image_id"]]["height"], coco.imgs[ann["image_id"]]["width"])
    errors = [json.loads(line) for line in (tmp_path / "export" / "errors.jsonl").read_text().splitlines()]
    assert errors == [{"image_uri": f"{prefix}/s/broken.jpg", "error": "broken.jpg: empty file (0 bytes)"}]

    loader = CocoDetection(prefix, str(tmp_path / "export" / "instances.json"))  # as a trainer loads it
    image, targets = loader[0]
    assert image.size == (coco.imgs[loader.ids[0]]["width"], coco.imgs[loader.ids[0]]["height"])
    assert len(targets) == len(coco.getAnnIds(imgIds=[loader.ids[0]]))


def test_min_score_and_kind_choose_the_annotations_and_filtered_images_stay_as_negatives(tmp_path):
    run, _, _, rows = labelled_run(tmp_path)
    high = export_run(ExportConfig(run, str(tmp_path / "high.json"), min_score=0.5))
    semantic = export_run(ExportConfig(run, str(tmp_path / "semantic.json"), kind="semantic"))
    assert high["annotations"] == sum(r["kind"] == "instance" and r["score"] >= 0.5 for r in rows) > 0
    assert semantic["annotations"] == sum(r["kind"] == "semantic" for r in rows) > 0
    images = {r["image_id"] for r in rows if r["kind"] != "error"}
    assert high["images"] == semantic["images"] == len(images)
    document = json.loads((tmp_path / "high.json").read_text())
    assert all(a["score"] >= 0.5 for a in document["annotations"]) and len(document["images"]) == len(images)


def test_yolo_labels_hold_each_masks_outline_with_the_class_of_data_yaml(tmp_path):
    import cv2
    import yaml

    run, prefix, dataset, rows = labelled_run(tmp_path)
    counts = export_run(ExportConfig(run, str(tmp_path / "yolo"), format="yolo"))
    names = yaml.safe_load((tmp_path / "yolo" / "data.yaml").read_text())["names"]
    assert names == {0: PROMPTS[0], 1: PROMPTS[1]}
    images = (tmp_path / "yolo" / "images.txt").read_text().split()
    assert sorted(images) == sorted({r["image_uri"] for r in rows if r["kind"] != "error"})
    checked = 0
    for image_id in dataset.image_ids:
        record = dataset.images[image_id]
        label = tmp_path / "yolo" / "labels" / record.file_name.replace(".jpg", ".txt")
        mine = [r for r in rows if r["image_id"] == image_id and r["kind"] == "instance"]
        if not any(r["image_id"] == image_id for r in rows):
            assert not label.exists()  # no row at all: not in the export (its size is unknown)
            continue
        lines = label.read_text().splitlines()
        assert len(lines) == len(mine)
        for line in lines:  # the polygon, filled back in, is one of the image's masks of that class
            cls, *xy = line.split()
            points = (np.array(xy, dtype=float).reshape(-1, 2) * [record.width, record.height]).round().astype(np.int32)
            assert all(0 <= float(v) <= 1 for v in xy)
            filled = cv2.fillPoly(np.zeros((record.height, record.width), np.uint8), [points], 1).astype(bool)
            best = max(_iou(filled, _largest_part(r)) for r in mine if r["prompt"] == names[int(cls)])
            assert best >= 0.8  # the mask's largest part (an occluded object keeps that one)
            checked += 1
    assert checked == counts["annotations"] > 0


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
            tracker.add(f"s{p}", uri, 1, part, shard_items=len(uris))
    write_summary(run.root, {"prompts": ["segment x"], "config": {"images": "/bucket"}})
    return run.root


def test_exporting_streams_memory_stays_flat_from_2000_to_20000_rows(tmp_path):
    import tracemalloc

    peaks = {}
    for rows, parts in ((2_000, 4), (20_000, 40)):  # parts of 500 rows: ten times the images, same part size
        run = _many_rows_run(tmp_path, f"run{rows}", parts, 500)
        tracemalloc.start()
        counts = export_run(ExportConfig(run, str(tmp_path / f"out{rows}" / "instances.json")))
        peaks[rows] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        assert counts["images"] == counts["annotations"] == rows
    assert peaks[20_000] < peaks[2_000] * 1.5 + 1.0, peaks  # MB: one part at a time, whatever the run's size
