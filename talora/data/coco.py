"""COCO instance datasets from any URI.

Polygons, uncompressed RLE and compressed RLE all become masks through pycocotools (RLE size is
[height, width]). `area` is recomputed from the mask when missing or inconsistent; `iscrowd` is
kept. Malformed annotations (missing keys, unknown image or category ids, polygons with fewer
than 3 points, masks that do not fit their image) are dropped with a warning naming the
annotation id, and the rest still loads; a file without the COCO top-level keys is an error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils

from talora.io.images import decode_image
from talora.io.storage import StorageOptions, join, read_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageRecord:
    id: int
    file_name: str
    width: int
    height: int
    uri: str  # image root + file_name


@dataclass(frozen=True)
class Instance:
    id: int  # annotation id
    image_id: int
    category_id: int
    category: str
    supercategory: str
    attributes: tuple[tuple[str, str], ...]  # sorted (name, value) pairs
    iscrowd: bool
    area: float
    bbox: tuple[float, float, float, float]  # x, y, w, h
    rle: dict = field(repr=False, compare=False)  # compressed RLE, counts as bytes

    def attribute(self, name: str) -> str | None:
        return dict(self.attributes).get(name)

    def mask(self) -> np.ndarray:
        """(height, width) bool."""
        return mask_utils.decode(self.rle).astype(bool)


class CocoDataset:
    def __init__(self, images: dict[int, ImageRecord], categories: dict[int, dict],
                 instances: dict[int, list[Instance]], warnings: list[str], source: str = "") -> None:
        self.images = images
        self.categories = categories
        self.instances = instances  # image id -> instances, annotation order
        self.warnings = warnings
        self.source = source

    @property
    def image_ids(self) -> list[int]:
        return sorted(self.images)

    def all_instances(self) -> list[Instance]:
        return [inst for image_id in self.image_ids for inst in self.instances[image_id]]

    def load_image(self, image_id: int, storage: StorageOptions | None = None) -> np.ndarray:
        """(H, W, 3) uint8 RGB, EXIF orientation applied."""
        return decode_image(read_bytes(self.images[image_id].uri, storage))

    @classmethod
    def load(cls, annotations: str, image_root: str | None = None, storage: StorageOptions | None = None) -> CocoDataset:
        """Reads an instances JSON from any URI; images live under `image_root` (default: the
        ``images`` folder beside the JSON)."""
        try:
            data = json.loads(read_bytes(annotations, storage))
        except json.JSONDecodeError as e:
            raise ValueError(f"{annotations} is not valid JSON: {e}") from e
        if image_root is None:
            image_root = join(annotations.rsplit("/", 1)[0] if "/" in annotations else ".", "images")
        return cls.from_dict(data, image_root, annotations)

    @classmethod
    def from_dict(cls, data: dict, image_root: str, source: str = "<dict>") -> CocoDataset:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a COCO file is a JSON object, got {type(data).__name__}")
        missing = [k for k in ("images", "annotations", "categories") if k not in data]
        if missing:
            raise ValueError(f"{source}: not a COCO instances file, missing key(s) {missing}")
        warnings: list[str] = []

        def warn(message: str) -> None:
            warnings.append(message)
            log.warning("%s: %s", source, message)

        categories = {}
        for c in data["categories"]:
            if "id" not in c or "name" not in c:
                raise ValueError(f"{source}: category {c} needs 'id' and 'name'")
            categories[int(c["id"])] = {"id": int(c["id"]), "name": str(c["name"]),
                                        "supercategory": str(c.get("supercategory") or c["name"])}

        images = {}
        for im in data["images"]:
            lacking = [k for k in ("id", "file_name", "width", "height") if k not in im]
            if lacking:
                warn(f"image {im.get('id', '?')} lacks {lacking}; skipped")
                continue
            images[int(im["id"])] = ImageRecord(int(im["id"]), im["file_name"], int(im["width"]), int(im["height"]),
                                                join(image_root, im["file_name"]))

        instances: dict[int, list[Instance]] = {i: [] for i in images}
        for ann in data["annotations"]:
            instance = _parse_annotation(ann, images, categories, warn)
            if instance is not None:
                instances[instance.image_id].append(instance)
        return cls(images, categories, instances, warnings, source)


def _parse_annotation(ann: dict, images: dict[int, ImageRecord], categories: dict[int, dict], warn) -> Instance | None:
    ann_id = ann.get("id", "?")
    lacking = [k for k in ("id", "image_id", "category_id", "segmentation") if k not in ann]
    if lacking:
        warn(f"annotation {ann_id} lacks {lacking}; skipped")
        return None
    image = images.get(int(ann["image_id"]))
    if image is None:
        warn(f"annotation {ann_id} refers to unknown image id {ann['image_id']}; skipped")
        return None
    category = categories.get(int(ann["category_id"]))
    if category is None:
        warn(f"annotation {ann_id} refers to unknown category id {ann['category_id']}; skipped")
        return None
    rle = _to_rle(ann["segmentation"], image, ann_id, warn)
    if rle is None:
        return None
    area = float(mask_utils.area(rle))
    if area == 0:
        warn(f"annotation {ann_id} has an empty mask inside image {image.id}; skipped")
        return None
    given = ann.get("area")
    if given is None or abs(float(given) - area) > 0.25 * area + 10:
        if given is not None:
            warn(f"annotation {ann_id}: area {given} disagrees with its mask ({area:g} px); using the mask's")
        given = area
    attributes = ann.get("attributes") or {}
    if not isinstance(attributes, dict):
        warn(f"annotation {ann_id}: attributes must be a mapping, got {attributes!r}; ignored")
        attributes = {}
    return Instance(
        id=int(ann["id"]),
        image_id=image.id,
        category_id=category["id"],
        category=category["name"],
        supercategory=category["supercategory"],
        attributes=tuple(sorted((str(k), str(v)) for k, v in attributes.items())),
        iscrowd=bool(ann.get("iscrowd", 0)),
        area=float(given),
        bbox=tuple(float(v) for v in mask_utils.toBbox(rle)),
        rle=rle,
    )


def _to_rle(segmentation, image: ImageRecord, ann_id, warn) -> dict | None:
    """Any COCO segmentation -> one compressed RLE of the image's size, or None (warned)."""
    h, w = image.height, image.width
    if isinstance(segmentation, list):  # polygons: [[x0, y0, x1, y1, ...], ...]
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if len(polygons) < len(segmentation):
            warn(f"annotation {ann_id}: {len(segmentation) - len(polygons)} polygon(s) with fewer than 3 points dropped")
        if not polygons:
            warn(f"annotation {ann_id} has no valid polygon; skipped")
            return None
        xs, ys = np.concatenate([p[0::2] for p in polygons]), np.concatenate([p[1::2] for p in polygons])
        if xs.min() < -1 or ys.min() < -1 or xs.max() > w + 1 or ys.max() > h + 1:
            warn(f"annotation {ann_id}: polygon reaches outside image {image.id} ({w}x{h}); clipped")
        return mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if [int(v) for v in segmentation["size"]] != [h, w]:
            warn(f"annotation {ann_id}: RLE size {segmentation['size']} does not match image {image.id} "
                 f"[height, width] = [{h}, {w}]; skipped")
            return None
        if isinstance(segmentation["counts"], list):  # uncompressed RLE
            return mask_utils.frPyObjects(segmentation, h, w)
        counts = segmentation["counts"]
        return {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
    warn(f"annotation {ann_id}: segmentation is neither polygons nor RLE; skipped")
    return None
