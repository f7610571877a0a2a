"""YOLO-seg, as Ultralytics reads it without moving anything: ``OUT/labels/<split>/<name>.txt``
beside ``OUT/images/<split>/<name>`` (Ultralytics finds a label by replacing ``images`` with
``labels`` in the image's path), one line per mask, ``class x1 y1 x2 y2 ...`` with the mask's
largest outer contour (OpenCV's findContours) normalised to [0, 1]; an empty file for an image
without masks (a background). ``OUT/data.yaml``: ``train: images/train``, ``val: images/val``
(train again when the split has no val image) and the class names in class-id order, without
``path``, so Ultralytics resolves the folders beside the yaml wherever the dataset is moved."""

from __future__ import annotations

import os

import cv2
import numpy as np
import yaml
from pycocotools import mask as mask_utils

from talora.io.storage import join
from talora.label.export.writer import Categories, Writer, put


def polygon(rle: dict, width: int, height: int) -> list[float]:
    """A mask's largest outer contour as [x1, y1, x2, y2, ...] normalised to [0, 1] ([] for < 3 points)."""
    mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    points = max(contours, key=cv2.contourArea)[:, 0, :].astype(np.float64)  # (n, 2) x, y
    if len(points) < 3:
        return []
    points /= np.array([width, height], dtype=np.float64)
    return np.clip(points, 0.0, 1.0).ravel().round(6).tolist()


class YoloWriter(Writer):
    def __init__(self, spill: str, config) -> None:
        super().__init__(spill, config)
        self.lines: dict[tuple[str, str], list[str]] = {}  # this part's label lines by (split, name)
        self.has_val = False

    def add_image(self, entry: dict, split: str) -> None:
        self.lines.setdefault((split, entry["file_name"]), [])
        self.has_val |= split == "val"

    def add(self, row: dict, name: str, split: str, category: int) -> None:
        points = polygon(row["segmentation"], row["width"], row["height"])
        if points:
            self.annotations += 1
            self.lines[(split, name)].append(" ".join([str(category - 1), *map(str, points)]))

    def end_part(self) -> None:
        """This part's label files, one per image."""
        for (split, name), found in self.lines.items():
            path = os.path.join(self.spill, "labels", split, os.path.splitext(name)[0] + ".txt")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write("".join(line + "\n" for line in found))
        self.lines.clear()

    def finish(self, categories: Categories, prefix: str | None) -> list[str]:
        config = self.config
        names = {i - 1: name for name, i in categories.ids.items()}
        with open(os.path.join(self.spill, "data.yaml"), "w") as f:
            yaml.safe_dump({"train": "images/train", "val": "images/val" if self.has_val else "images/train",
                            "nc": len(names), "names": names}, f, sort_keys=False, allow_unicode=True)
        files = [put(os.path.join(self.spill, "data.yaml"), join(config.out, "data.yaml"), config.storage)]
        if os.path.isdir(os.path.join(self.spill, "labels")):
            files.append(put(os.path.join(self.spill, "labels"), join(config.out, "labels"), config.storage))
        return files
