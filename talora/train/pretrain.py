"""Pretraining a base: the whole SAM (the demo base is the default variant's, `DEFAULT_VARIANT`),
promptable, with semantic trunk features.

Two objectives in one step (a base can only be adapted to what its trunk encodes; docs/design.md):
- promptable segmentation, SAM-style: per image, instances prompted by one interior point
  (multimask output, best of 3 trained) or a jittered box (single output); focal + dice + IoU MSE.
  A detector (SAM 3) is prompted as it is used instead: each (image, category) row by the
  category's name as its own text prompt, its queries matched to every instance of it
  (talora.train.detector); its text encoder stays frozen (`Backbone.text_features` caches it);
- auxiliary per-cell heads on the trunk output (exactly where `talora probe` reads): a linear
  classifier per label key (category and every attribute key, e.g. colour) trained with soft
  cross-entropy against the cell's area share of each class (background included). Class-agnostic
  pretraining alone was measured to leave shape identity at chance; these heads put it there.

Shapes: B = images, h x w = the trunk features' grid (the embedding grid for SAM), L = the low-res mask grid, Q = prompt rows.
Everything per image (normalised input, low-res instance masks, cell targets) is computed once
per worker and memoised (up to train.memo_gb): the generator's images are small and the step is the
expensive part.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from talora.backbones.base import Backbone
from talora.data.coco import CocoDataset, ImageRecord
from talora.data.tasks import Task, TaskSet, semantic_mask
from talora.io.storage import StorageOptions
from talora.train.batches import Batch, build_batch
from talora.train.detector import detector_losses
from talora.train.losses import empty_share, mask_iou, mask_losses
from talora.train.memo import LruMemo

BACKGROUND = "<background>"


def label_vocab(dataset: CocoDataset) -> dict[str, list[str]]:
    """{label key: classes}: "category" (the dataset's category names) and every attribute key
    present on an annotation (its values, sorted). Class 0 of every key is the background."""
    vocab = {"category": [BACKGROUND] + [c["name"] for c in sorted(dataset.categories.values(), key=lambda c: c["id"])]}
    values: dict[str, set[str]] = {}
    for instances in dataset.instances.values():
        for inst in instances:
            for key, value in inst.attributes:
                values.setdefault(key, set()).add(value)
    for key in sorted(values):
        vocab[key] = [BACKGROUND] + sorted(values[key])
    return vocab


@dataclass
class ImageEntry:
    image: torch.Tensor  # (3, S, S) normalised, padded input (float16 in memory)
    masks: torch.Tensor  # (n, L, L) low-res instance masks, area shares in [0, 1]
    boxes: torch.Tensor  # (n, 4) x0, y0, x1, y1 in the input frame
    cells: dict[str, torch.Tensor]  # key -> (h*w, classes) area share of each class per cell
    input_size: tuple[int, int]  # the resized image's (height, width) inside S x S


class ImageMemo(LruMemo[int, ImageEntry]):
    """Per-image training tensors, built once per worker and kept up to `max_bytes` (talora.train.memo)."""

    def __init__(self, backbone: Backbone, dataset: CocoDataset, vocab: dict[str, list[str]],
                 storage: StorageOptions | None, max_bytes: int = 2**62) -> None:
        self.backbone, self.dataset, self.vocab, self.storage = backbone, dataset, vocab, storage
        self.grid = backbone.trunk_size  # the cells of the trunk features (h x w for SAM, S/32 for SAM 2)
        self.lowres = backbone.lowres_size
        super().__init__(self._build, max_bytes)

    @torch.no_grad()
    def _build(self, image_id: int) -> ImageEntry:
        record = self.dataset.images[image_id]
        x, input_size = self.backbone.preprocess(self.dataset.load_image(image_id, self.storage))
        instances = [i for i in self.dataset.instances[image_id] if not i.iscrowd]
        masks = [self.backbone.lowres_target(i.mask(), input_size) for i in instances]
        masks = torch.stack(masks) if masks else torch.zeros(0, self.lowres, self.lowres)
        xyxy = np.array([[x0, y0, x0 + w, y0 + h] for x0, y0, w, h in (i.bbox for i in instances)], dtype=np.float64)
        boxes = torch.tensor(self.backbone.apply_boxes(xyxy.reshape(-1, 4), (record.height, record.width)),
                             dtype=torch.float32).reshape(-1, 4)
        coverage = F.adaptive_avg_pool2d(masks[None], self.grid)[0].flatten(1) if len(masks) else masks.new_zeros(0, self.grid**2)
        cells = {}
        for key, classes in self.vocab.items():
            share = torch.zeros(self.grid**2, len(classes))
            for inst, cov in zip(instances, coverage):
                label = inst.category if key == "category" else inst.attribute(key)
                if label in classes:
                    share[:, classes.index(label)] += cov
            share[:, 0] = (1 - share[:, 1:].sum(1)).clamp(min=0)  # visible masks are disjoint
            cells[key] = share
        return ImageEntry(x.cpu().half(), masks.half(), boxes, cells, input_size)


@dataclass
class PretrainBatch:
    images: torch.Tensor  # (B, 3, S, S)
    cells: dict[str, torch.Tensor]  # key -> (B, h*w, classes)
    point_image: torch.Tensor  # (Qp,) row -> image
    point_coords: torch.Tensor  # (Qp, 1, 2) input frame
    point_target: torch.Tensor  # (Qp, L, L)
    box_image: torch.Tensor  # (Qb,)
    boxes: torch.Tensor  # (Qb, 4) input frame
    box_target: torch.Tensor  # (Qb, L, L)

    def to(self, device: torch.device) -> PretrainBatch:
        return PretrainBatch(**{k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device))
                                for k, v in self.__dict__.items()})


def interior_point(mask: torch.Tensor, rng: np.random.Generator, size: int) -> tuple[float, float]:
    """A random (x, y) in the input frame inside a low-res mask (L, L): a fully covered cell, else the most covered."""
    L = mask.shape[-1]
    inside = torch.nonzero(mask >= 0.99)
    if not len(inside):
        inside = torch.nonzero(mask >= mask.max())
    y, x = inside[int(rng.integers(len(inside)))].tolist()
    cell = size / L
    return (x + float(rng.uniform(0.1, 0.9))) * cell, (y + float(rng.uniform(0.1, 0.9))) * cell


def jitter_box(box: torch.Tensor, rng: np.random.Generator, size: int, noise: float = 0.1, max_px: float = 5.0) -> torch.Tensor:
    """SAM's box noise: each side moves by N(0, noise x side length), at most `max_px`."""
    w, h = float(box[2] - box[0]), float(box[3] - box[1])
    sd = np.array([w, h, w, h]) * noise
    offset = np.clip(rng.normal(0, 1, 4) * sd, -max_px, max_px)
    out = (box.numpy() + offset).clip(0, size)
    return torch.tensor([min(out[0], out[2]), min(out[1], out[3]), max(out[0], out[2]), max(out[1], out[3])],
                        dtype=torch.float32)


def build_pretrain_batch(entries: list[ImageEntry], rng: np.random.Generator, prompts_per_image: int,
                         box_fraction: float, size: int) -> PretrainBatch:
    point_image, coords, point_target, box_image, boxes, box_target = [], [], [], [], [], []
    for b, entry in enumerate(entries):
        n = len(entry.masks)
        for i in rng.permutation(n)[:prompts_per_image].tolist():
            if rng.uniform() < box_fraction:
                box_image.append(b)
                boxes.append(jitter_box(entry.boxes[i], rng, size))
                box_target.append(entry.masks[i].float())
            else:
                point_image.append(b)
                coords.append(torch.tensor([interior_point(entry.masks[i], rng, size)], dtype=torch.float32))
                point_target.append(entry.masks[i].float())
    L = entries[0].masks.shape[-1] if entries else 0
    return PretrainBatch(
        images=torch.stack([e.image.float() for e in entries]),
        cells={k: torch.stack([e.cells[k] for e in entries]) for k in entries[0].cells},
        point_image=torch.tensor(point_image, dtype=torch.long),
        point_coords=torch.stack(coords) if coords else torch.zeros(0, 1, 2),
        point_target=torch.stack(point_target) if point_target else torch.zeros(0, L, L),
        box_image=torch.tensor(box_image, dtype=torch.long),
        boxes=torch.stack(boxes) if boxes else torch.zeros(0, 4),
        box_target=torch.stack(box_target) if box_target else torch.zeros(0, L, L),
    )


class PretrainStep(nn.Module):
    """The whole SAM plus one linear per-cell head per label key on the trunk output; it builds its
    own batches (`make_batch`) and scores itself (`validate`, `score_key` the best-checkpoint metric)."""

    score_key = "val_point_miou"

    def __init__(self, backbone: Backbone, tail_blocks: int, vocab: dict[str, list[str]]) -> None:
        super().__init__()
        self.backbone = backbone  # a plain object; its model is this module's `sam`, trained
        self.sam = backbone.model
        self.tail_blocks = tail_blocks
        self.heads = nn.ModuleDict({key: nn.Linear(backbone.trunk_dim, len(classes)) for key, classes in vocab.items()})

    def make_batch(self, entries: list[ImageEntry], records: list[ImageRecord], dataset: CocoDataset,
                   rng: np.random.Generator, prompts_per_image: int, box_fraction: float) -> PretrainBatch:
        return build_pretrain_batch(entries, rng, prompts_per_image, box_fraction, self.backbone.image_size)

    def validate(self, entries: list[ImageEntry], records: list[ImageRecord], dataset: CocoDataset):
        return validate_pretrain(self, entries)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(trunk (B, h, w, C), image embeddings (B, C', h, w))."""
        trunk = self.backbone.embed_trunk(images, self.tail_blocks)
        return trunk, self.backbone.embed_tail(trunk, self.tail_blocks)

    def decode(self, embeddings: torch.Tensor, coords=None, boxes=None, multimask: bool = True):
        """Per-row decoding: (masks (Q, M, L, L), iou predictions (Q, M)); M = 3 or 1."""
        labels = torch.ones(coords.shape[:2], dtype=torch.long, device=coords.device) if coords is not None else None
        sparse, dense = self.backbone.encode_prompts(coords, labels, boxes)
        masks, iou_pred, _ = self.backbone.decode_rows(embeddings, sparse, dense)
        chosen = slice(1, None) if multimask else slice(0, 1)
        return masks[:, chosen], iou_pred[:, chosen]

    def aux_losses(self, trunk: torch.Tensor, cells: dict[str, torch.Tensor], config) -> tuple[torch.Tensor, dict]:
        """(the per-cell heads' weighted loss, its parts for the log)."""
        loss = torch.zeros((), device=trunk.device)
        out = {}
        flat = trunk.flatten(1, 2)  # (B, h*w, C)
        for key, head in self.heads.items():
            aux = cell_loss(head(flat).float(), cells[key])
            loss = loss + config.aux_weight * aux
            out[f"loss_aux_{key}"] = aux.detach()
        return loss, out

    def forward(self, batch: PretrainBatch, config) -> dict[str, torch.Tensor]:
        trunk, embeddings = self.features(batch.images)
        loss, out = self.aux_losses(trunk, batch.cells, config)
        for name, rows, kwargs, multimask, target in (
            ("points", batch.point_image, {"coords": batch.point_coords}, True, batch.point_target),
            ("boxes", batch.box_image, {"boxes": batch.boxes}, False, batch.box_target),
        ):
            if not len(rows):
                continue
            masks, iou_pred = self.decode(embeddings[rows], multimask=multimask, **kwargs)
            seg, iou = mask_losses(masks, iou_pred, target, config.focal_weight, config.dice_weight, config.iou_weight)
            loss = loss + seg.mean()
            out.update({f"loss_{name}": seg.mean().detach(), f"iou_{name}": iou.mean(),
                        f"empty_{name}": empty_share(masks, target)})
        out["loss"] = loss
        return out


def build_pretrain_step(backbone: Backbone, tail_blocks: int, vocab: dict[str, list[str]],
                  dataset: CocoDataset) -> PretrainStep:
    """The family's pretraining step: prompted by points and boxes, or a detector's by category names."""
    if backbone.detector:
        return DetectorPretrainStep(backbone, tail_blocks, vocab, category_tasks(dataset))
    return PretrainStep(backbone, tail_blocks, vocab)


def category_tasks(dataset: CocoDataset) -> list[Task]:
    """A detector's pretraining tasks: one per category, prompted by its name (SAM 3's noun phrases)."""
    return [t for t in TaskSet.from_dataset(dataset) if t.kind == "category"]


@dataclass
class DetectorPretrainBatch:
    rows: Batch  # (image, category) rows (build_batch's); their `trunk` is the images (B, 3, S, S): the trunk trains
    cells: dict[str, torch.Tensor]  # key -> (B, h*w, classes)

    @property
    def images(self) -> torch.Tensor:
        return self.rows.trunk

    def to(self, device: torch.device) -> DetectorPretrainBatch:
        return DetectorPretrainBatch(self.rows.to(device), {k: v.to(device) for k, v in self.cells.items()})


def build_detector_pretrain_batch(entries: list[ImageEntry], records: list[ImageRecord], dataset: CocoDataset,
                                  tasks: list[Task], rng: np.random.Generator, backbone: Backbone,
                                  prompts_per_image: int) -> DetectorPretrainBatch:
    """Up to `prompts_per_image` categories per image, half present and half absent (presence
    training), each prompted by its name."""
    images = torch.stack([e.image.float() for e in entries])
    rows = build_batch(records, images, [e.input_size for e in entries], dataset, tasks,
                       {t.id: [t.singular] for t in tasks}, rng, backbone, prompts_per_image, num_points=0)
    return DetectorPretrainBatch(rows, {k: torch.stack([e.cells[k] for e in entries]) for k in entries[0].cells})


class DetectorPretrainStep(PretrainStep):
    """A detector (SAM 3) whole but its text encoder, plus the per-cell heads; `tasks` are the
    categories it is prompted with (`category_tasks`)."""

    score_key = "val_semantic_miou"

    def __init__(self, backbone: Backbone, tail_blocks: int, vocab: dict[str, list[str]], tasks: list[Task]) -> None:
        super().__init__(backbone, tail_blocks, vocab)
        for module in backbone.frozen_in_pretraining():
            module.requires_grad_(False)
        self.matcher = backbone.matcher()
        self.tasks = tasks

    def make_batch(self, entries, records, dataset, rng, prompts_per_image, box_fraction) -> DetectorPretrainBatch:
        return build_detector_pretrain_batch(entries, records, dataset, self.tasks, rng, self.backbone,
                                             prompts_per_image)

    def validate(self, entries, records, dataset):
        return validate_detector_pretrain(self, entries, records, dataset)

    def detect(self, embeddings: torch.Tensor, prompts: list[str], rows: torch.Tensor):
        return self.backbone.detect_rows(embeddings, self.backbone.text_features(prompts), rows)

    def forward(self, batch: DetectorPretrainBatch, config) -> dict[str, torch.Tensor]:
        rows = batch.rows
        trunk, embeddings = self.features(batch.images)
        loss, out = self.aux_losses(trunk, batch.cells, config)
        found = self.detect(embeddings, rows.row_prompts, rows.image_index)
        detection_loss, metrics = detector_losses(found, rows, self.matcher, config)
        out.update(metrics)
        out["loss"] = loss + detection_loss
        return out


def cell_loss(logits: torch.Tensor, share: torch.Tensor, min_share: float = 0.5) -> torch.Tensor:
    """Per-cell classification loss: logits and class area shares (..., classes), class 0 = background.

    Soft cross-entropy over every cell (what is where, background included), plus hard cross-entropy
    over the object classes on object cells (one object covers >= `min_share`) — exactly what the
    probe scores, and on the demo domain the part that needs shape rather than colour: without it the
    background cells, most of every image, dominate the loss."""
    log_p = F.log_softmax(logits, -1)
    soft = -(share * log_p).sum(-1).mean()
    objects = share[..., 1:].max(-1)
    keep = objects.values >= min_share
    if not keep.any():
        return soft
    hard = F.cross_entropy(logits[keep][:, 1:], objects.indices[keep])
    return soft + hard


@torch.no_grad()
def validate_pretrain(step: PretrainStep, entries: list[ImageEntry], batch_images: int = 8) -> dict[str, list[float]]:
    """Sums for this worker's share of val images: point-prompt IoU per instance (one interior point,
    SAM's highest-scoring of 3 masks; the point is the cell centre-most of the instance, so it is
    deterministic), box IoU per instance (exact box), and per-cell head accuracy on object cells
    (covered >= 50% by one object; argmax over the object classes, as the probe scores).

    Returns {metric: [sum, count]} so workers can all-reduce."""
    sums: dict[str, list[float]] = {"val_point_miou": [0.0, 0], "val_box_miou": [0.0, 0],
                                    **{f"val_head_{k}": [0.0, 0] for k in step.heads}}
    for start in range(0, len(entries), batch_images):
        chunk = entries[start : start + batch_images]
        trunk, embeddings = step.features(torch.stack([e.image.float() for e in chunk]))
        rows, coords, boxes, targets = [], [], [], []
        for b, e in enumerate(chunk):
            for i, m in enumerate(e.masks.float()):
                rows.append(b)
                coords.append(torch.tensor([_centre_point(m, step.backbone.image_size)]))
                boxes.append(e.boxes[i])
                targets.append(m)
            _add_head_accuracy(step, trunk[b], e, sums)
        if not rows:
            continue
        rows_t, target = torch.tensor(rows), torch.stack(targets)
        masks, iou_pred = step.decode(embeddings[rows_t], coords=torch.stack(coords).float())
        best = masks[torch.arange(len(rows)), iou_pred.argmax(1)]
        sums["val_point_miou"][0] += float(mask_iou(best, target).sum())
        sums["val_point_miou"][1] += len(rows)
        masks, _ = step.decode(embeddings[rows_t], boxes=torch.stack(boxes), multimask=False)
        sums["val_box_miou"][0] += float(mask_iou(masks[:, 0], target).sum())
        sums["val_box_miou"][1] += len(rows)
    return sums


@torch.no_grad()
def validate_detector_pretrain(step: DetectorPretrainStep, entries: list[ImageEntry], records: list[ImageRecord],
                               dataset: CocoDataset, batch_images: int = 8) -> dict[str, list[float]]:
    """Sums for this worker's share of val images, every category on every image under its name:
    semantic IoU (the detector's semantic mask gated by its presence, at low res) on the rows whose
    category is there, presence accuracy on every row, and per-cell head accuracy as
    `validate_pretrain` scores it. Returns {metric: [sum, count]}."""
    sums: dict[str, list[float]] = {"val_semantic_miou": [0.0, 0], "val_presence_accuracy": [0.0, 0],
                                    **{f"val_head_{k}": [0.0, 0] for k in step.heads}}
    backbone = step.backbone
    for start in range(0, len(entries), batch_images):
        chunk, chunk_records = entries[start : start + batch_images], records[start : start + batch_images]
        trunk, embeddings = step.features(torch.stack([e.image.float() for e in chunk]))
        rows, prompts, targets = [], [], []
        for b, (e, record) in enumerate(zip(chunk, chunk_records)):
            _add_head_accuracy(step, trunk[b], e, sums)
            instances = dataset.instances[record.id]
            for task in step.tasks:
                truth = semantic_mask([i for i in instances if task.matches(i)], record.height, record.width)
                rows.append(b)
                prompts.append(task.singular)
                targets.append(backbone.lowres_target(truth, e.input_size))
        if not rows:
            continue
        found = step.detect(embeddings, prompts, torch.tensor(rows))
        target = torch.stack(targets).to(found.semantic.device)
        present = target.flatten(1).amax(1) > 0.5
        says_present = found.presence_logits > 0
        gated = torch.where(says_present[:, None, None], found.semantic.float(), torch.full_like(target, -1.0))
        sums["val_semantic_miou"][0] += float(mask_iou(gated, target)[present].sum())
        sums["val_semantic_miou"][1] += int(present.sum())
        sums["val_presence_accuracy"][0] += float((says_present == present).sum())
        sums["val_presence_accuracy"][1] += len(rows)
    return sums


def _add_head_accuracy(step: PretrainStep, trunk: torch.Tensor, entry: ImageEntry, sums: dict) -> None:
    """Per-cell head accuracy on one image's object cells (covered >= 50% by one object), added to `sums`."""
    for key, head in step.heads.items():
        share = entry.cells[key]
        objects = share[:, 1:].max(1)
        keep = objects.values >= 0.5
        if keep.any():
            predicted = head(trunk.flatten(0, 1)[keep])[:, 1:].argmax(1)
            sums[f"val_head_{key}"][0] += float((predicted == objects.indices[keep]).sum())
            sums[f"val_head_{key}"][1] += int(keep.sum())


def _centre_point(mask: torch.Tensor, size: int) -> tuple[float, float]:
    """The centre of the most interior low-res cell of `mask` (largest distance to its outside)."""
    inside = (mask >= 0.5).float()
    depth = inside.clone()
    eroded = inside
    while eroded.any():  # iterated 3x3 erosion: depth = steps survived
        eroded = -F.max_pool2d(-eroded[None, None], 3, 1, 1)[0, 0]
        depth += eroded
    if not inside.any():
        y, x = divmod(int(mask.argmax()), mask.shape[-1])
    else:
        y, x = divmod(int(depth.argmax()), mask.shape[-1])
    cell = size / mask.shape[-1]
    return (x + 0.5) * cell, (y + 0.5) * cell
