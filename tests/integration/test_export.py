"""Labels out as a training dataset, from and to object storage (moto S3)."""

import json

import pytest

from talora.label.export.run import ExportConfig, export_run
from talora.io.storage import filesystem, read_bytes
from tests.unit.test_label_export import labelled_run

pytestmark = pytest.mark.integration


def test_coco_and_yolo_exports_read_a_run_on_s3_and_write_to_s3(s3, tmp_path):
    from pycocotools.coco import COCO

    run, prefix, dataset, rows = labelled_run(tmp_path, storage=s3, root="s3://talora-test")
    counts = export_run(ExportConfig(run, "s3://talora-test/export/instances.json", storage=s3))
    local = tmp_path / "instances.json"
    local.write_bytes(read_bytes("s3://talora-test/export/instances.json", s3))
    coco = COCO(str(local))
    assert len(coco.anns) == counts["annotations"] == sum(r["kind"] == "instance" for r in rows)
    assert all(not i["file_name"].startswith("s3://") for i in coco.imgs.values())  # relative to the prefix
    assert json.loads(read_bytes("s3://talora-test/export/errors.jsonl", s3))["image_uri"] == f"{prefix}/s/broken.jpg"

    yolo = export_run(ExportConfig(run, "s3://talora-test/yolo", format="yolo", storage=s3))
    fs, root = filesystem("s3://talora-test/yolo", s3)
    fs.invalidate_cache()
    labels = sorted(p.removeprefix(root + "/") for p in fs.find(root + "/labels"))
    assert labels and all(p.startswith("labels/shard-") and p.endswith(".txt") for p in labels)
    lines = sum(len(read_bytes(f"s3://talora-test/yolo/{p}", s3).decode().splitlines()) for p in labels)
    assert lines == yolo["annotations"] > 0
    assert b"segment vehicles" in read_bytes("s3://talora-test/yolo/data.yaml", s3)
