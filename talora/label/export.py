"""Labels out as a training dataset: a labelling run -> a COCO instances JSON, or YOLO-seg labels.

    talora export --predictions OUT/<run_key> --format coco --out s3://b/labels/instances.json
    talora export --predictions OUT/<run_key> --format yolo --out s3://b/yolo/

The run is read one committed part at a time (every row of an image is in one part); images,
annotations and label files go to a local spill folder as they come, and the output is assembled
from it at the end and uploaded (fsspec `put`). Memory holds one part and the categories, whatever
the number of images.

- COCO: `images` (file_name relative to the labelled prefix, width, height, id = the rows'
  image_id), `categories` (one per task, or per prompt where the job had no --task; the prompts
  are recorded), `annotations` (RLE segmentation, bbox, area, score, iscrowd 0) of one `kind`
  at `min_score` and above. An image whose masks were all filtered out stays an image (a negative).
- YOLO-seg: `labels/<file name>.txt` per image, one line per mask, `class x1 y1 x2 y2 ...` with
  the mask's largest outer contour (OpenCV's findContours) normalised to [0, 1]; `data.yaml`
  (class names in class-id order) and `images.txt` (the labelled images, for `train:`).
- Error rows never become annotations: they are listed in `errors.jsonl` beside the output.
  Images processed without any row (nothing found, nothing written) are not in the export: their
  size is known only by reading them.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np

from talora.batch.rows import iter_parts, read_summary
from talora.io.storage import StorageOptions, absolute, filesystem, protocol_of

FORMATS = ("coco", "yolo")
ERRORS = "errors.jsonl"


@dataclass(frozen=True)
class ExportConfig:
    predictions: str  # a labelling run: OUT/<run_key>
    out: str  # coco: the instances JSON to write; yolo: a folder
    format: str = "coco"
    kind: str = "instance"  # instance | semantic: the rows that become annotations
    min_score: float = 0.0
    images_prefix: str | None = None  # file names are relative to it (default: the run's --images)
    storage: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {FORMATS}, got {self.format!r}")
        if self.kind not in ("instance", "semantic"):
            raise ValueError(f"--kind must be instance or semantic, got {self.kind!r}")


class Categories:
    """Category ids by task (or prompt where a row has no task), in the order the run's summary
    names its prompts, then in order of appearance."""

    def __init__(self, prompts: list[str], task: str | None) -> None:
        self.ids: dict[str, int] = {}
        self.prompts: dict[str, list[str]] = {}
        for prompt in prompts:
            self.id_of(task or prompt, prompt)

    def id_of(self, name: str, prompt: str) -> int:
        if name not in self.ids:
            self.ids[name], self.prompts[name] = len(self.ids) + 1, []
        if prompt not in self.prompts[name]:
            self.prompts[name].append(prompt)
        return self.ids[name]

    def coco(self) -> list[dict]:
        return [{"id": i, "name": name, "supercategory": "talora", "prompts": self.prompts[name]}
                for name, i in self.ids.items()]


def relative_name(uri: str, prefix: str | None) -> str:
    """`uri` relative to the labelled prefix (the whole URI when it is not under it)."""
    if prefix and uri.startswith(prefix.rstrip("/") + "/"):
        return uri[len(prefix.rstrip("/")) + 1:]
    return uri


def polygon(rle: dict, width: int, height: int) -> list[float]:
    """A mask's largest outer contour as [x1, y1, x2, y2, ...] normalised to [0, 1] ([] for < 3 points)."""
    import cv2
    from pycocotools import mask as mask_utils

    mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    points = max(contours, key=cv2.contourArea)[:, 0, :].astype(np.float64)  # (n, 2) x, y
    if len(points) < 3:
        return []
    points /= np.array([width, height], dtype=np.float64)
    return np.clip(points, 0.0, 1.0).ravel().round(6).tolist()


def export_run(config: ExportConfig) -> dict:
    """Writes the export; returns its counts {images, annotations, categories, errors, out, files}."""
    summary = read_summary(config.predictions, config.storage)
    prefix = absolute(config.images_prefix or summary.get("config", {}).get("images"))  # as the rows' URIs
    categories = Categories(summary.get("prompts", []), summary.get("config", {}).get("task"))
    counts = {"images": 0, "annotations": 0, "errors": 0}
    with tempfile.TemporaryDirectory(prefix="talora-export-") as spill:
        images = open(os.path.join(spill, "images.part"), "w")
        annotations = open(os.path.join(spill, "annotations.part"), "w")
        errors = open(os.path.join(spill, ERRORS), "w")
        image_list = open(os.path.join(spill, "images.txt"), "w")
        seen: set[int] = set()  # image ids of the current part only: an image's rows are in one part
        for table in iter_parts(config.predictions, config.storage):
            seen.clear()
            lines: dict[str, list[str]] = {}
            for row in table.to_pylist():
                if row["kind"] == "error":
                    errors.write(json.dumps({"image_uri": row["image_uri"], "error": row["error"]}) + "\n")
                    counts["errors"] += 1
                    continue
                name = relative_name(row["image_uri"], prefix)
                if row["image_id"] not in seen:
                    seen.add(row["image_id"])
                    entry = {"id": row["image_id"], "file_name": name, "width": row["width"], "height": row["height"]}
                    images.write(("," if counts["images"] else "") + json.dumps(entry))
                    image_list.write(row["image_uri"] + "\n")
                    lines.setdefault(name, [])
                    counts["images"] += 1
                if row["kind"] != config.kind or row["score"] < config.min_score:
                    continue
                category = categories.id_of(row["task"] or row["prompt"], row["prompt"])
                if config.format == "coco":
                    counts["annotations"] += 1
                    annotations.write(("," if counts["annotations"] > 1 else "") + json.dumps({
                        "id": counts["annotations"], "image_id": row["image_id"], "category_id": category,
                        "segmentation": row["segmentation"], "bbox": [round(v, 2) for v in row["bbox"]],
                        "area": row["area"], "score": round(float(row["score"]), 5), "iscrowd": 0}))
                else:
                    points = polygon(row["segmentation"], row["width"], row["height"])
                    if points:
                        counts["annotations"] += 1
                        lines[name].append(" ".join([str(category - 1), *map(str, points)]))
            if config.format == "yolo":  # this part's label files, one per image (empty: a negative)
                for name, found in lines.items():
                    inside = os.path.normpath(name.split("://", 1)[-1]).lstrip("/")  # never outside the spill
                    path = os.path.join(spill, "labels", os.path.splitext(inside)[0] + ".txt")
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "w") as f:
                        f.write("".join(line + "\n" for line in found))
        for f in (images, annotations, errors, image_list):
            f.close()
        counts["categories"] = len(categories.ids)
        if config.format == "coco":
            files = _write_coco(spill, config, categories, prefix)
        else:
            files = _write_yolo(spill, config, categories, prefix)
    return {**counts, "out": config.out, "files": files}


def _write_coco(spill: str, config: ExportConfig, categories: Categories, prefix: str | None) -> list[str]:
    document = os.path.join(spill, "instances.json")
    info = {"description": f"talora labels of {config.predictions}", "images_prefix": prefix,
            "kind": config.kind, "min_score": config.min_score}
    with open(document, "w") as out:
        out.write('{"info": ' + json.dumps(info) + ', "images": [')
        with open(os.path.join(spill, "images.part")) as part:
            shutil.copyfileobj(part, out)
        out.write('], "annotations": [')
        with open(os.path.join(spill, "annotations.part")) as part:
            shutil.copyfileobj(part, out)
        out.write('], "categories": ' + json.dumps(categories.coco()) + "}\n")
    errors = posixpath.join(posixpath.dirname(config.out.rstrip("/")) or ".", ERRORS)
    return [_put(document, config.out, config.storage), _put(os.path.join(spill, ERRORS), errors, config.storage)]


def _write_yolo(spill: str, config: ExportConfig, categories: Categories, prefix: str | None) -> list[str]:
    import yaml

    names = {i - 1: name for name, i in categories.ids.items()}
    with open(os.path.join(spill, "data.yaml"), "w") as f:
        yaml.safe_dump({"path": ".", "train": "images.txt", "val": "images.txt", "names": names,
                        "images_prefix": prefix}, f, sort_keys=False, allow_unicode=True)
    files = [_put(os.path.join(spill, name), posixpath.join(config.out.rstrip("/"), name), config.storage)
             for name in ("data.yaml", "images.txt", ERRORS)]
    if os.path.isdir(os.path.join(spill, "labels")):
        files.append(_put(os.path.join(spill, "labels"), posixpath.join(config.out.rstrip("/"), "labels"),
                          config.storage))
    return files


def _put(local: str, uri: str, storage: StorageOptions) -> str:
    """Uploads a local file or folder to `uri` (any fsspec URI); returns `uri`."""
    fs, path = filesystem(uri, storage)
    if protocol_of(uri) == "file":
        if os.path.isdir(local):
            shutil.copytree(local, path, dirs_exist_ok=True)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            shutil.copyfile(local, path)
    else:
        if os.path.isdir(local):
            fs.put(local.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)  # the folder's contents
        else:
            fs.put(local, path)
    return uri
