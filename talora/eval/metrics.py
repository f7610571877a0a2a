"""Task mIoU, defined once, and the ground-truth references it is always reported beside.

Task IoU = sum over evaluated images of |pred & gt| / sum of |pred | gt| for the task's semantic
masks; images without the task count through their false positives (they add to the union). A
task whose union is empty everywhere has no IoU and is left out. Task mIoU = mean over tasks,
per group (seen / held-out paraphrase / held-out composition).

References, computed from ground truth with the same definition: "every object" (all objects),
"attribute only" (every object with the task's attribute value) and "category only" (every object
of the task's category or supercategory). A model that reads only the colour word of "red
circles" scores the attribute-only reference; composition must beat both.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from talora.data.coco import CocoDataset
from talora.data.tasks import GROUPS, Task, TaskSet, semantic_mask

REFERENCES = ("every_object", "attribute_only", "category_only")


class TaskIoU:
    """Accumulates intersection and union per key (a task id, or a (task, group) pair)."""

    def __init__(self) -> None:
        self.intersection: dict = defaultdict(int)
        self.union: dict = defaultdict(int)

    def add(self, key, pred: np.ndarray, gt: np.ndarray) -> None:
        pred, gt = pred.astype(bool), gt.astype(bool)
        self.intersection[key] += int(np.count_nonzero(pred & gt))
        self.union[key] += int(np.count_nonzero(pred | gt))

    def per_key(self) -> dict:
        return {k: self.intersection[k] / u for k, u in self.union.items() if u > 0}


def mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def groups_of(task: Task) -> tuple[str, ...]:
    """The groups a task's scores count in: held-out compositions alone, else seen + held-out paraphrase."""
    return ("heldout_composition",) if task.heldout else ("seen", "heldout_paraphrase")


def _reference_predicate(task: Task, which: str) -> tuple[tuple[str, str], ...] | None:
    if which == "every_object":
        return ()
    want = "attr:" if which == "attribute_only" else ("category", "supercategory")
    kept = tuple((k, v) for k, v in task.predicate if (k.startswith(want) if isinstance(want, str) else k in want))
    return kept or None  # a task without that part has no such reference


def reference_scores(dataset: CocoDataset, tasks: TaskSet, image_ids: list[int] | None = None) -> dict:
    """{group: {reference: mIoU or None}} over `image_ids` (default: all images)."""
    ious = {ref: TaskIoU() for ref in REFERENCES}
    for image_id in image_ids or dataset.image_ids:
        record, instances = dataset.images[image_id], dataset.instances[image_id]
        for task in tasks:
            gt = semantic_mask([i for i in instances if task.matches(i)], record.height, record.width)
            for ref in REFERENCES:
                predicate = _reference_predicate(task, ref)
                if predicate is None:
                    continue
                probe = Task("ref", "ref", "", "", predicate)
                ious[ref].add(task.id, semantic_mask([i for i in instances if probe.matches(i)], record.height, record.width), gt)
    per_task = {ref: ious[ref].per_key() for ref in REFERENCES}
    return {
        group: {ref: mean(v for tid, v in per_task[ref].items() if group in groups_of(tasks.by_id[tid])) for ref in REFERENCES}
        for group in GROUPS
    }
