"""YOLO-seg: `labels/<file name>.txt` per image, one line per mask, `class x1 y1 x2 y2 ...` with the
mask's largest outer contour (OpenCV's findContours) normalised to [0, 1] (an empty file: a
negative); `data.yaml` (class names in class-id order) and `images.txt` (the labelled images, for
`train:`)."""

from __future__ import annotations

import os
import posixpath

import cv2
import numpy as np
import yaml
from pycocotools import mask as mask_utils

from talora.label.export.writer import ERRORS, Categories, Writer, put


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
        self.image_list = open(os.path.join(spill, "images.txt"), "w")
        self.lines: dict[str, list[str]] = {}  # this part's label lines by image file name

    def add_image(self, entry: dict, name: str, uri: str) -> None:
        self.image_list.write(uri + "\n")
        self.lines.setdefault(name, [])

    def add(self, row: dict, name: str, category: int) -> None:
        points = polygon(row["segmentation"], row["width"], row["height"])
        if points:
            self.annotations += 1
            self.lines[name].append(" ".join([str(category - 1), *map(str, points)]))

    def end_part(self) -> None:
        """This part's label files, one per image."""
        for name, found in self.lines.items():
            inside = os.path.normpath(name.split("://", 1)[-1]).lstrip("/")  # never outside the spill
            path = os.path.join(self.spill, "labels", os.path.splitext(inside)[0] + ".txt")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write("".join(line + "\n" for line in found))
        self.lines.clear()

    def close(self) -> None:
        self.image_list.close()

    def finish(self, categories: Categories, prefix: str | None) -> list[str]:
        self.close()
        config, out = self.config, self.config.out.rstrip("/")
        names = {i - 1: name for name, i in categories.ids.items()}
        with open(os.path.join(self.spill, "data.yaml"), "w") as f:
            yaml.safe_dump({"path": ".", "train": "images.txt", "val": "images.txt", "names": names,
                            "images_prefix": prefix}, f, sort_keys=False, allow_unicode=True)
        files = [put(os.path.join(self.spill, name), posixpath.join(out, name), config.storage)
                 for name in ("data.yaml", "images.txt", ERRORS)]
        if os.path.isdir(os.path.join(self.spill, "labels")):
            files.append(put(os.path.join(self.spill, "labels"), posixpath.join(out, "labels"), config.storage))
        return files
