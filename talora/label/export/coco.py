"""COCO instances, one document per split: ``OUT/annotations/instances_{train,val}.json`` beside
``OUT/images/{train,val}/``, laid out as COCO itself is (pycocotools and torchvision's
CocoDetection read a split with root ``OUT/images/<split>``). `images`: file_name relative to that
root, width, height, id = the rows' image_id; `categories`: one per task, or per prompt where the
job had no --task (the prompts are recorded); `annotations`: RLE segmentation, bbox, area, score,
iscrowd 0. Images on which nothing was found, or whose masks were all filtered out, are images
without annotations (negatives)."""

from __future__ import annotations

import json
import os
import shutil

from talora.io.storage import join
from talora.label.export.writer import SPLITS, Categories, Writer, put


class CocoWriter(Writer):
    def __init__(self, spill: str, config) -> None:
        super().__init__(spill, config)
        self.images = {s: open(os.path.join(spill, f"images-{s}.part"), "w") for s in SPLITS}
        self.parts = {s: open(os.path.join(spill, f"annotations-{s}.part"), "w") for s in SPLITS}
        self.counts = {s: {"images": 0, "annotations": 0} for s in SPLITS}

    def add_image(self, entry: dict, split: str) -> None:
        self.images[split].write(("," if self.counts[split]["images"] else "") + json.dumps(entry))
        self.counts[split]["images"] += 1

    def add(self, row: dict, name: str, split: str, category: int) -> None:
        self.annotations += 1
        self.parts[split].write(("," if self.counts[split]["annotations"] else "") + json.dumps({
            "id": self.annotations, "image_id": row["image_id"], "category_id": category,
            "segmentation": row["segmentation"], "bbox": [round(v, 2) for v in row["bbox"]],
            "area": row["area"], "score": round(float(row["score"]), 5), "iscrowd": 0}))
        self.counts[split]["annotations"] += 1

    def close(self) -> None:
        for f in (*self.images.values(), *self.parts.values()):
            f.close()

    def finish(self, categories: Categories, prefix: str | None) -> list[str]:
        self.close()
        config = self.config
        info = {"description": f"talora labels of {config.predictions}", "images_prefix": prefix,
                "kind": config.kind, "min_score": config.min_score}
        files = []
        for split in SPLITS:
            document = os.path.join(self.spill, f"instances_{split}.json")
            with open(document, "w") as out:
                out.write('{"info": ' + json.dumps({**info, "split": split}) + ', "images": [')
                with open(os.path.join(self.spill, f"images-{split}.part")) as part:
                    shutil.copyfileobj(part, out)
                out.write('], "annotations": [')
                with open(os.path.join(self.spill, f"annotations-{split}.part")) as part:
                    shutil.copyfileobj(part, out)
                out.write('], "categories": ' + json.dumps(categories.coco()) + "}\n")
            files.append(put(document, join(config.out, "annotations", f"instances_{split}.json"), config.storage))
        return files
