"""Training batches: (image, task) rows with their semantic, positive and negative samples.

Shapes: B = images, R = (image, task) rows, Q = point rows, L = the low-res mask grid (4h = 64 for
the 256-px CPU presets, 256 for 1024-px SAM), S = the model input size.

Every step's randomness comes from a generator seeded by (seed, rank, step), and its images from
seeded epoch orders (`epoch_images`), so a resumed run draws the same batches as an uninterrupted
one would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from talora.backbones.base import Backbone
from talora.data.coco import CocoDataset, ImageRecord
from talora.train.sampling import sample_task, task_instances
from talora.data.tasks import Task


@dataclass
class Batch:
    trunk: torch.Tensor  # (B, h, w, C) trunk features
    image_index: torch.Tensor  # (R,) row -> image
    prompt_index: torch.Tensor  # (R,) row -> prompt in `prompts`
    prompts: list[str]
    semantic_target: torch.Tensor  # (R, L, L)
    present: torch.Tensor  # (R,) float
    point_row: torch.Tensor  # (Q,) point row -> (image, task) row
    point_coords: torch.Tensor  # (Q, 1, 2) in the input frame
    point_labels: torch.Tensor  # (Q, 1)
    point_target: torch.Tensor  # (Q, L, L)
    box_row: torch.Tensor  # (Qb,) box row -> (image, task) row
    boxes: torch.Tensor  # (Qb, 4) x0, y0, x1, y1 in the input frame
    box_target: torch.Tensor  # (Qb, L, L)
    # A detector's rows (SAM 3) find every instance of their task: its instances, to match queries to.
    instance_row: torch.Tensor  # (N,) instance -> (image, task) row
    instance_target: torch.Tensor  # (N, L, L)
    instance_box: torch.Tensor  # (N, 4) cx, cy, w, h normalised to the image

    @property
    def row_prompts(self) -> list[str]:
        """The prompt of each (image, task) row."""
        return [self.prompts[i] for i in self.prompt_index.tolist()]

    def to(self, device: torch.device) -> Batch:
        return Batch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()})


def epoch_images(ids: list[int], step: int, batch_images: int, seed: tuple[int, ...]) -> list[int]:
    """The images of one step: every id once per epoch, each epoch in its own order seeded by
    (seed, epoch); a batch may span two epochs. Drawing with replacement instead leaves images unseen
    (40000 draws from 24000 images see ~19500 of them), which is what the demo base is short of."""
    picked = []
    for k in range(step * batch_images, (step + 1) * batch_images):
        epoch, position = divmod(k, len(ids))
        picked.append(ids[_epoch_order(seed, epoch, len(ids))[position]])
    return picked


@lru_cache(maxsize=2)
def _epoch_order(seed: tuple[int, ...], epoch: int, n: int) -> list[int]:
    return np.random.default_rng([*seed, epoch]).permutation(n).tolist()


def choose_tasks(tasks: list[Task], instances, k: int, rng: np.random.Generator) -> list[Task]:
    """Up to k tasks for one image: half present in it, the rest absent (presence training)."""
    present = [t for t in tasks if any(t.matches(i) and not i.iscrowd for i in instances)]
    absent = [t for t in tasks if t not in present]
    n_present = min(len(present), (k + 1) // 2) if absent else min(len(present), k)
    chosen = [present[i] for i in rng.choice(len(present), n_present, replace=False)] if n_present else []
    n_absent = min(len(absent), k - len(chosen))
    chosen += [absent[i] for i in rng.choice(len(absent), n_absent, replace=False)] if n_absent else []
    return chosen


def build_batch(
    records: list[ImageRecord],
    trunk: torch.Tensor,
    input_sizes: list[tuple[int, int]],
    dataset: CocoDataset,
    tasks: list[Task],
    prompts_of: dict[str, list[str]],
    rng: np.random.Generator,
    backbone: Backbone,
    tasks_per_image: int,
    num_points: int,
    box_share: float = 0.0,
) -> Batch:
    """Rows for `records` (whose trunk features are `trunk`, (B, h, w, C)); `backbone` places points
    and targets in the model's frames. A positive sample is prompted by its instance's box instead
    of its point with probability `box_share` (no draw at 0, so such runs replay as before). A
    detector's rows get every instance of their task instead of point and box samples."""
    prompts: list[str] = []
    image_index, prompt_index, sem_targets, present = [], [], [], []
    point_row, coords, point_targets = [], [], []
    box_row, boxes, box_targets = [], [], []
    instance_row, instance_targets, instance_boxes = [], [], []
    detector = backbone.detector
    for b, (record, input_size) in enumerate(zip(records, input_sizes)):
        instances = dataset.instances[record.id]
        for task in choose_tasks(tasks, instances, tasks_per_image, rng):
            options = prompts_of[task.id]
            prompt = options[int(rng.integers(len(options)))]
            if prompt not in prompts:
                prompts.append(prompt)
            row = len(image_index)
            image_index.append(b)
            prompt_index.append(prompts.index(prompt))
            if detector:
                for inst in task_instances(instances, task):
                    instance_row.append(row)
                    instance_targets.append(backbone.lowres_target(inst.mask(), input_size))
                    x, y, w, h = inst.bbox
                    instance_boxes.append(torch.tensor([(x + w / 2) / record.width, (y + h / 2) / record.height,
                                                        w / record.width, h / record.height]))
            for s in sample_task(record, instances, task, rng, backbone, 0 if detector else num_points,
                                 use_boxes=box_share > 0):
                target = backbone.lowres_target(s.target, input_size)
                if s.kind == "semantic":
                    sem_targets.append(target)
                    present.append(float(s.present))
                elif s.box is not None and rng.random() < box_share:
                    box_row.append(row)
                    boxes.append(torch.as_tensor(s.box, dtype=torch.float32))
                    box_targets.append(target)
                else:
                    point_row.append(row)
                    coords.append(torch.as_tensor(s.point_coords, dtype=torch.float32))
                    point_targets.append(target)
    lowres_shape = (0, backbone.lowres_size, backbone.lowres_size)
    return Batch(
        trunk=trunk,
        image_index=torch.tensor(image_index, dtype=torch.long),
        prompt_index=torch.tensor(prompt_index, dtype=torch.long),
        prompts=prompts,
        semantic_target=torch.stack(sem_targets),
        present=torch.tensor(present),
        point_row=torch.tensor(point_row, dtype=torch.long),
        point_coords=torch.stack(coords) if coords else torch.zeros(0, 1, 2),
        point_labels=torch.ones(len(coords), 1, dtype=torch.long),
        point_target=torch.stack(point_targets) if point_targets else torch.zeros(lowres_shape),
        box_row=torch.tensor(box_row, dtype=torch.long),
        boxes=torch.stack(boxes) if boxes else torch.zeros(0, 4),
        box_target=torch.stack(box_targets) if box_targets else torch.zeros(lowres_shape),
        instance_row=torch.tensor(instance_row, dtype=torch.long),
        instance_target=torch.stack(instance_targets) if instance_targets else torch.zeros(lowres_shape),
        instance_box=torch.stack(instance_boxes).float() if instance_boxes else torch.zeros(0, 4),
    )
