"""An exported dataset read back by the readers detectors train with: pycocotools and torchvision's
CocoDetection for COCO, Ultralytics' YOLODataset for YOLO-seg. For `talora export --read-back`
(what `make demo` prints) and for users checking an export before a training run."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile

import yaml

from talora.io.storage import protocol_of
from talora.label.export.writer import SPLITS

READERS = {"coco": "pycocotools + torchvision CocoDetection", "yolo": "Ultralytics YOLODataset"}


def check_readable(out: str) -> None:
    """Refuses, before an export starts, a read-back the readers cannot do (they read local files)."""
    if protocol_of(out) != "file":
        raise ValueError(f"--read-back reads a local dataset, got --out {out!r}")


def read_back(out: str, format: str) -> dict:
    """{split: counts} of the dataset at `out` (a local folder), as the format's own readers see it."""
    check_readable(out)
    return {"coco": _coco, "yolo": _yolo}[format](out)


def _coco(out: str) -> dict:
    from pycocotools.coco import COCO
    from torchvision.datasets import CocoDetection

    found = {}
    for split in SPLITS:
        annotations, root = os.path.join(out, "annotations", f"instances_{split}.json"), os.path.join(out, "images", split)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco = COCO(annotations)
            dataset = CocoDetection(root, annotations)
        empty = sum(1 for i in coco.imgs if not coco.getAnnIds(imgIds=[i]))
        missing = sum(1 for i in dataset.ids if not os.path.exists(os.path.join(root, coco.imgs[i]["file_name"])))
        found[split] = {"images": len(dataset), "backgrounds": empty, "annotations": len(coco.anns),
                        "categories": len(coco.cats), "missing files": missing}
    return found


def _yolo(out: str) -> dict:
    # Ultralytics is optional (a test and demo dependency): imported here, offline, its settings in a
    # temporary folder unless the user has set one.
    os.environ.setdefault("YOLO_OFFLINE", "true")
    os.environ.setdefault("YOLO_VERBOSE", "false")
    os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "talora-ultralytics"))
    import torch
    from PIL import Image

    # Ultralytics replaces PIL's Image.open (an unreadable image then asks for pi_heif instead of
    # raising UnidentifiedImageError) and torch.save process-wide on import: put back once read
    pil_open, torch_save = Image.open, torch.save
    try:
        return _read_yolo(out)
    finally:
        Image.open, torch.save = pil_open, torch_save


def _read_yolo(out: str) -> dict:
    try:
        from ultralytics.data.dataset import YOLODataset
    except ImportError as e:
        raise ValueError("--read-back of a YOLO export needs Ultralytics: pip install --no-deps ultralytics "
                         "ultralytics-thop (make setup installs it)") from e
    with open(os.path.join(out, "data.yaml")) as f:
        data = yaml.safe_load(f)
    found = {}
    for split in SPLITS:
        folder = os.path.join(out, data[split])  # as Ultralytics resolves it: beside the yaml
        dataset = YOLODataset(img_path=folder, imgsz=320, augment=False, data={**data, "channels": 3},
                              task="segment")
        labels = dataset.labels
        found[split] = {"images": len(labels), "labelled": sum(1 for lb in labels if len(lb["cls"])),
                        "backgrounds": sum(1 for lb in labels if not len(lb["cls"])),
                        "segments": sum(len(lb["segments"]) for lb in labels)}
    return found
