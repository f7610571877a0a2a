"""Training samples per (image, task).

- semantic: no prompt; target = union of the task's instances (empty when the task is absent),
  presence = whether any is there;
- positive: a point (and optionally a box) on one target instance; target = that instance;
- negative: a point on a non-target object or on background; target = empty, presence = False.

Point and box coordinates are in the model's input frame (the backbone's `apply_coords` /
`apply_boxes`), exactly what the prompt encoder expects; targets stay in the original frame.
Crowd instances are never sampled as positives and never count as background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from talora.data.coco import ImageRecord, Instance
from talora.data.tasks import Task, semantic_mask


@dataclass
class Sample:
    image_id: int
    task_id: str
    kind: str  # semantic | positive | negative
    point_coords: np.ndarray | None  # (n, 2) x, y in the resized frame
    point_labels: np.ndarray | None  # (n,) 1 = foreground
    box: np.ndarray | None  # (4,) x0, y0, x1, y1 in the resized frame
    target: np.ndarray  # (H, W) bool, original frame
    present: bool


def task_instances(instances: list[Instance], task: Task) -> list[Instance]:
    """The instances `task` names (never a crowd region): its semantic target's parts, a detector's targets."""
    return [i for i in instances if task.matches(i) and not i.iscrowd]


def _interior_pixel(mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """A random (x, y) inside `mask`, preferring pixels whose 4-neighbours are inside too."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    ys, xs = np.nonzero(inner if inner.any() else mask)
    i = int(rng.integers(len(xs)))
    return int(xs[i]), int(ys[i])


def sample_task(
    image: ImageRecord,
    instances: list[Instance],
    task: Task,
    rng: np.random.Generator,
    frame,
    num_points: int = 1,
    use_boxes: bool = False,
) -> list[Sample]:
    """The semantic sample plus up to `num_points` positive and `num_points` negative samples; `frame`
    maps coordinates into the model's input frame (a Backbone: `apply_coords`, `apply_boxes`)."""
    size = (image.height, image.width)
    targets = task_instances(instances, task)
    union = semantic_mask(targets, *size)
    samples = [Sample(image.id, task.id, "semantic", None, None, None, union, bool(union.any()))]

    def point_sample(kind: str, xy: tuple[int, int], target: np.ndarray, box=None) -> Sample:
        coords = frame.apply_coords(np.array([xy], dtype=np.float64), size)
        box_t = None if box is None else frame.apply_boxes(np.array([box], dtype=np.float64), size)[0]
        return Sample(image.id, task.id, kind, coords, np.ones(1, dtype=np.int64), box_t, target, kind == "positive")

    for inst in rng.permutation(len(targets))[:num_points] if targets else []:
        inst = targets[int(inst)]
        mask = inst.mask()
        x, y, w, h = inst.bbox
        samples.append(point_sample("positive", _interior_pixel(mask, rng), mask, (x, y, x + w, y + h) if use_boxes else None))

    others = [i for i in instances if not task.matches(i) and not i.iscrowd]
    crowd = np.zeros(size, dtype=bool)  # ambiguous regions: never a negative
    for inst in instances:
        if inst.iscrowd:
            crowd |= inst.mask()
    empty = np.zeros(size, dtype=bool)
    for n in range(num_points):
        if others and n % 2 == 0:  # alternate: another object, then background
            region = others[int(rng.integers(len(others)))].mask() & ~union & ~crowd
        else:
            region = ~union & ~crowd & ~semantic_mask(others, *size)
        if region.any():
            samples.append(point_sample("negative", _interior_pixel(region, rng), empty))
    return samples
