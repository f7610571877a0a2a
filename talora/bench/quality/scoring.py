"""Scoring one method on the prepared validation images: task mIoU per group and the instances for
COCOeval (the adapted model, a shared adapter, the family's own automatic mask generator)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from pycocotools import mask as mask_utils

from talora.data.tasks import GROUPS, semantic_mask
from talora.eval.evaluate import coco_stats
from talora.eval.metrics import TaskIoU, mean
from talora.predict.predictor import Detection, encode_mask


@dataclass
class Prepared:
    """One validation image, encoded once and shared by every method."""

    image_id: int
    image: np.ndarray  # HWC uint8 RGB
    trunk: torch.Tensor  # (1, h, w, C)
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    truths: dict[str, np.ndarray]  # task id -> (H, W) bool semantic ground truth


class MethodScores:
    """Task IoU and COCO results of one method, by group."""

    def __init__(self) -> None:
        self.ious = TaskIoU()
        self.results: dict[str, list[dict]] = {g: [] for g in GROUPS}

    def add(self, task_id: str, group: str, category_id: int, image: Prepared, detections) -> None:
        semantic = [d for d in detections if d.kind == "semantic"]
        pred = decode_rle(semantic[0].rle) if semantic else np.zeros_like(image.truths[task_id])
        self.ious.add((task_id, group), pred, image.truths[task_id])
        self.results[group] += [{"image_id": image.image_id, "category_id": category_id, "segmentation": d.rle,
                                 "score": d.score} for d in detections if d.kind == "instance"]

    def summary(self, gt: dict, category_of: dict[str, int], rows, backend: str, semantic: bool = True) -> dict:
        """{group: {miou, ap, ap50, tasks}} for each group with rows; None for a group without."""
        per_key = self.ious.per_key()
        out = {}
        for group in GROUPS:
            task_ids = sorted({t.id for t, g, _ in rows if g == group})
            if not task_ids:
                out[group] = None
                continue
            stats = coco_stats(gt, self.results[group], [category_of[t] for t in task_ids], backend)
            out[group] = {"miou": mean(v for (t, g), v in per_key.items() if g == group) if semantic else None,
                          "ap": stats["AP"], "ap50": stats["AP50"], "tasks": len(task_ids)}
        return out


def decode_rle(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def prepare(model, dataset, image_ids: list[int], tasks) -> list[Prepared]:
    prepared = []
    with torch.no_grad():
        for image_id in image_ids:
            record, image = dataset.images[image_id], dataset.load_image(image_id)
            resized = model.backbone.resize(image)
            trunk = model.embed_trunk(model.backbone.normalize(resized))
            truths = {t.id: semantic_mask([i for i in dataset.instances[image_id] if t.matches(i)], record.height,
                                          record.width) for t in tasks}
            prepared.append(Prepared(image_id, image, trunk, tuple(resized.shape[:2]), (record.height, record.width),
                                     truths))
    return prepared


def score_adapted(predictor, images: list[Prepared], rows, category_of, adapter_of, truth_regions: bool = False,
                  chunk: int = 32) -> MethodScores:
    """A method that runs the task-aware predictor: `adapter_of(prompts)` gives one adapter row per
    row of a chunk (rows: (task, group, prompt)); `truth_regions` runs the instance pass in the
    ground-truth task region. A detector also reads each row's prompt as its own text prompt."""
    scores = MethodScores()
    device = predictor.device
    for image in images:
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            regions = [torch.as_tensor(image.truths[t.id], device=device) for t, _, _ in part] if truth_regions else None
            prompts = [p for _, _, p in part]
            detections = predictor.predict_rows(image.trunk, adapter_of(prompts), image.input_size,
                                                image.original_size, regions, prompts=prompts)
            for (task, group, _), found in zip(part, detections):
                scores.add(task.id, group, category_of[task.id], image, found)
    return scores


def score_shared(predictor, images: list[Prepared], rows, category_of, adapter) -> MethodScores:
    """A method whose answer does not depend on the task (one adapter row): predicted once per image,
    scored for every row."""
    scores = MethodScores()
    for image in images:
        (found,) = predictor.predict_rows(image.trunk, adapter, image.input_size, image.original_size)
        for task, group, _ in rows:
            scores.add(task.id, group, category_of[task.id], image, found)
    return scores


def score_amg(model, predict_config, images: list[Prepared], rows, category_of) -> MethodScores:
    """The family's own automatic mask generator on the frozen base (no adapter is set outside
    talora's adapter contexts), with the instance pass's grid and filters."""
    generator = model.backbone.automatic_mask_generator(
        points_per_side=predict_config.points_per_side, points_per_batch=predict_config.points_per_batch,
        pred_iou_thresh=predict_config.score_thresh, stability_score_thresh=predict_config.stability_thresh,
        stability_score_offset=predict_config.stability_offset, box_nms_thresh=predict_config.nms_thresh,
        output_mode="coco_rle")
    scores = MethodScores()
    for image in images:
        with torch.no_grad():
            masks = generator.generate(image.image)
        found = [Detection("instance", m["segmentation"], m["bbox"], m["area"], m["predicted_iou"]) for m in masks]
        union = np.zeros(image.original_size, dtype=bool)
        for m in masks:
            union |= decode_rle(m["segmentation"])
        if union.any():
            found.append(encode_mask(union, "semantic", 1.0))
        for task, group, _ in rows:
            scores.add(task.id, group, category_of[task.id], image, found)
    return scores


def random_prompts(rows, seed: int) -> dict[str, str]:
    """Each row's prompt -> the same-group prompt of another task (a seeded derangement of tasks)."""
    rng = random.Random(seed)
    swapped = {}
    for group in GROUPS:
        part = [(t, p) for t, g, p in rows if g == group]
        if len(part) < 2:
            swapped.update({p: p for _, p in part})
            continue
        order = list(range(len(part)))
        while any(part[i][0].id == part[j][0].id for i, j in enumerate(order)):
            rng.shuffle(order)
        swapped.update({part[i][1]: part[j][1] for i, j in enumerate(order)})
    return swapped
