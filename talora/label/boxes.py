"""Boxes in: a detector's boxes as the labelling job's instance prompts (`--boxes URI`).

Accepted files (any URI):
- COCO JSON: a results list `[{"image_id", "bbox": [x, y, w, h], ...}]`, or a dataset with an
  `annotations` list of the same; `image_id` is a COCO id (the job maps ids with --annotations).
- Parquet: columns `image_uri` or `image_id`, `bbox` (x, y, w, h), and optionally `prompt`.

A box with a `prompt` (one of the job's prompts) is decoded under that prompt's adapter only; one
without, under every prompt's. With --boxes the instances of an image are its boxes' masks (one
per box); an image without a box gets none. The file is read whole by the driver: its size is
the file's, as with a COCO JSON of annotations.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from talora.io.storage import StorageOptions, read_bytes


@dataclass
class BoxIndex:
    """Boxes by image: {image URI or COCO id: [{"bbox": [x, y, w, h], "prompt": str | None}]}."""

    source: str
    by_uri: dict[str, list[dict]] = field(default_factory=dict)
    by_id: dict[int, list[dict]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(map(len, self.by_uri.values())) + sum(map(len, self.by_id.values()))

    def of(self, uri: str, image_id: int) -> list[dict]:
        """An image's boxes (by URI, else by COCO id); [] when it has none."""
        return self.by_uri.get(uri) or self.by_id.get(image_id) or []

    def unmatched(self, uris: set[str], image_ids: set[int]) -> list[str]:
        """The images that have boxes but are not among those labelled."""
        return sorted([u for u in self.by_uri if u not in uris] + [f"image_id {i}" for i in self.by_id if i not in image_ids])


def read_boxes(uri: str, prompts: list[str], storage: StorageOptions | None = None) -> BoxIndex:
    """Reads and checks a boxes file; a bad entry is an error naming the file, the entry and the field."""
    data = read_bytes(uri, storage)
    if uri.lower().endswith(".parquet"):
        entries = pq.read_table(io.BytesIO(data)).to_pylist()
    else:
        try:
            document = json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"--boxes {uri}: not JSON or Parquet ({e})") from None
        entries = document.get("annotations") if isinstance(document, dict) else document
        if not isinstance(entries, list):
            raise ValueError(f"--boxes {uri}: expected a list of boxes, or a COCO dataset with annotations")
    index = BoxIndex(uri)
    for n, entry in enumerate(entries):
        where = f"--boxes {uri}: entry {n}"
        bbox = entry.get("bbox") if isinstance(entry, dict) else None
        if bbox is None or len(bbox) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
            raise ValueError(f"{where}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
        if bbox[2] <= 0 or bbox[3] <= 0:
            raise ValueError(f"{where}: bbox {bbox} has no area (w and h must be > 0)")
        prompt = entry.get("prompt")
        if prompt is not None and prompt not in prompts:
            raise ValueError(f"{where}: prompt {prompt!r} is not one of the job's prompts {prompts}")
        box = {"bbox": [float(v) for v in bbox], "prompt": prompt}
        if entry.get("image_uri"):
            index.by_uri.setdefault(str(entry["image_uri"]), []).append(box)
        elif entry.get("image_id") is not None:
            index.by_id.setdefault(int(entry["image_id"]), []).append(box)
        else:
            raise ValueError(f"{where}: needs image_uri or image_id")
    return index
