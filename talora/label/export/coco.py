"""COCO instances JSON: `images` (file_name relative to the labelled prefix, width, height, id = the
rows' image_id), `categories` (one per task, or per prompt where the job had no --task; the
prompts are recorded), `annotations` (RLE segmentation, bbox, area, score, iscrowd 0). An image
whose masks were all filtered out stays an image (a negative)."""

from __future__ import annotations

import json
import os
import posixpath
import shutil

from talora.label.export.writer import ERRORS, Categories, Writer, put


class CocoWriter(Writer):
    def __init__(self, spill: str, config) -> None:
        super().__init__(spill, config)
        self.images = open(os.path.join(spill, "images.part"), "w")
        self.parts = open(os.path.join(spill, "annotations.part"), "w")
        self.image_count = 0

    def add_image(self, entry: dict, name: str, uri: str) -> None:
        self.images.write(("," if self.image_count else "") + json.dumps(entry))
        self.image_count += 1

    def add(self, row: dict, name: str, category: int) -> None:
        self.annotations += 1
        self.parts.write(("," if self.annotations > 1 else "") + json.dumps({
            "id": self.annotations, "image_id": row["image_id"], "category_id": category,
            "segmentation": row["segmentation"], "bbox": [round(v, 2) for v in row["bbox"]],
            "area": row["area"], "score": round(float(row["score"]), 5), "iscrowd": 0}))

    def close(self) -> None:
        self.images.close()
        self.parts.close()

    def finish(self, categories: Categories, prefix: str | None) -> list[str]:
        self.close()
        config = self.config
        document = os.path.join(self.spill, "instances.json")
        info = {"description": f"talora labels of {config.predictions}", "images_prefix": prefix,
                "kind": config.kind, "min_score": config.min_score}
        with open(document, "w") as out:
            out.write('{"info": ' + json.dumps(info) + ', "images": [')
            with open(os.path.join(self.spill, "images.part")) as part:
                shutil.copyfileobj(part, out)
            out.write('], "annotations": [')
            with open(os.path.join(self.spill, "annotations.part")) as part:
                shutil.copyfileobj(part, out)
            out.write('], "categories": ' + json.dumps(categories.coco()) + "}\n")
        errors = posixpath.join(posixpath.dirname(config.out.rstrip("/")) or ".", ERRORS)
        return [put(document, config.out, config.storage), put(os.path.join(self.spill, ERRORS), errors, config.storage)]
