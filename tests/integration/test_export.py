"""Labels out as a dataset, from and to object storage (moto S3): images copied within the store."""

import json

import pytest
import yaml

from talora.io.storage import filesystem, read_bytes
from talora.label.export.run import ExportConfig, export_run
from tests.unit.test_label_export import labelled_run

pytestmark = pytest.mark.integration


def test_coco_and_yolo_exports_read_a_run_on_s3_and_write_a_whole_dataset_to_s3(s3, tmp_path):
    from pycocotools.coco import COCO

    run, prefix, dataset, rows = labelled_run(tmp_path, storage=s3, root="s3://talora-test")
    counts = export_run(ExportConfig(run, "s3://talora-test/export", storage=s3, val_fraction=0.0))
    local = tmp_path / "instances.json"
    local.write_bytes(read_bytes("s3://talora-test/export/annotations/instances_train.json", s3))
    coco = COCO(str(local))
    assert len(coco.anns) == counts["annotations"] == sum(r["kind"] == "instance" for r in rows)
    assert len(coco.imgs) == counts["images"] == len(dataset.image_ids)  # backgrounds included
    for image in coco.imgs.values():  # each image copied beside the annotations, named relative to images/train
        record = dataset.images[image["id"]]
        assert not image["file_name"].startswith("s3://")
        assert read_bytes(f"s3://talora-test/export/images/train/{image['file_name']}", s3) == read_bytes(record.uri, s3)
    assert json.loads(read_bytes("s3://talora-test/export/errors.jsonl", s3))["image_uri"] == f"{prefix}/s/broken.jpg"

    yolo = export_run(ExportConfig(run, "s3://talora-test/yolo", format="yolo", storage=s3, val_fraction=0.5))
    fs, root = filesystem("s3://talora-test/yolo", s3)
    fs.invalidate_cache()
    found = sorted(p.removeprefix(root + "/") for p in fs.find(root))
    images = [p for p in found if p.startswith("images/")]
    labels = [p for p in found if p.startswith("labels/")]
    assert len(images) == len(labels) == yolo["images"] == len(dataset.image_ids)
    assert sorted(p.replace("images/", "labels/", 1).rsplit(".", 1)[0] for p in images) == \
        sorted(p.rsplit(".", 1)[0] for p in labels)  # each label where Ultralytics looks for it
    lines = sum(len(read_bytes(f"s3://talora-test/yolo/{p}", s3).decode().splitlines()) for p in labels)
    assert lines == yolo["annotations"] > 0
    data = yaml.safe_load(read_bytes("s3://talora-test/yolo/data.yaml", s3))
    assert data["names"][0] == "segment vehicles" and data["val"] == "images/val" and yolo["val"] == 3
