"""Validation: task mIoU per group on held-out images, sharded across workers and all-reduced.

Rows per image: every non-held-out task under one seen prompt and one held-out paraphrase, and
every held-out composition under one of its prompts. Predictions are the semantic masks
(no point prompt; a detector's semantic output), upsampled with the family's postprocess_masks and
gated by the presence logit.
"""

from __future__ import annotations

import torch

from talora.data.tasks import Task, semantic_mask
from talora.eval.metrics import TaskIoU
from talora.train.reduce import sum_over_workers


def validation_rows(tasks: list[Task], static: bool) -> list[tuple[Task, str, str]]:
    """(task, group, prompt) for every row scored on each image."""
    rows = []
    for t in tasks:
        if static:
            rows.append((t, "seen", t.prompts()[0]))
        elif t.heldout:
            rows.append((t, "heldout_composition", t.heldout_prompts[0]))
        else:
            rows += [(t, "seen", t.train_prompts[0]), (t, "heldout_paraphrase", t.heldout_prompts[0])]
    return rows


@torch.no_grad()
def validate(step_module, entries, dataset, rows, text_embeddings: torch.Tensor | None, chunk: int = 64) -> TaskIoU:
    """`entries`: iterable of (record, trunk (h, w, C), input_size) of this worker's share of the val
    images (the trunk on any device); `text_embeddings`: one per row (hypernet) or None (static);
    `chunk`: rows per tail + decoder pass (the training loop passes its step's row count, so
    validation never holds more activations than a step: a vit_h tail row is ~3.2 GB in fp32).
    Returns this worker's sums."""
    model = step_module.model
    device = next(step_module.parameters()).device
    ious = TaskIoU()
    all_rows = torch.arange(len(rows))
    adapter = step_module.adapters(text_embeddings, all_rows)  # one row per (task, group, prompt)
    for record, trunk, input_size in entries:
        trunk = trunk.to(device)
        instances = dataset.instances[record.id]
        truths = {t.id: semantic_mask([i for i in instances if t.matches(i)], record.height, record.width)
                  for t, _, _ in rows}
        for start in range(0, len(rows), chunk):
            index = all_rows[start : start + chunk]
            part = adapter.select(index)
            embeddings = model.embed_tail(trunk[None].expand(len(index), -1, -1, -1), part)
            logits, presence = model.semantic_rows(embeddings, part, [rows[i][2] for i in index.tolist()])
            masks = model.backbone.postprocess_masks(logits.float(), input_size, (record.height, record.width))
            predicted = (masks[:, 0] > 0) & (presence > 0)[:, None, None]
            for i, pred in zip(index.tolist(), predicted.cpu().numpy()):
                task, group, _ = rows[i]
                ious.add((task.id, group), pred, truths[task.id])
    return ious


def reduce_ious(ious: TaskIoU, keys: list, device: torch.device) -> TaskIoU:
    """Sums every worker's intersections and unions (a no-op on one worker)."""
    counts = sum_over_workers([[ious.intersection[k], ious.union[k]] for k in keys], device)
    total = TaskIoU()
    for k, (inter, union) in zip(keys, counts):
        total.intersection[k], total.union[k] = int(inter), int(union)
    return total


def group_metrics(ious: TaskIoU) -> dict[str, float]:
    """val_miou_<group> per group present, and val_score = their mean (the best-checkpoint metric)."""
    per_group: dict[str, list[float]] = {}
    for (task_id, group), value in ious.per_key().items():
        per_group.setdefault(group, []).append(value)
    metrics = {f"val_miou_{g}": sum(v) / len(v) for g, v in per_group.items()}
    metrics["val_score"] = sum(metrics.values()) / len(metrics) if metrics else 0.0
    return metrics


@torch.no_grad()
def score_tasks(step_module, dataset, image_ids: list[int], rows, text_embeddings: torch.Tensor | None) -> TaskIoU:
    """`validate` outside a training run: trunk features computed here, on one process."""
    model = step_module.model
    entries = []
    for image_id in image_ids:
        x, input_size = model.preprocess(dataset.load_image(image_id))
        entries.append((dataset.images[image_id], model.embed_trunk(x[None])[0], input_size))
    return validate(step_module, entries, dataset, rows, text_embeddings)


def per_task(ious: TaskIoU) -> dict[str, dict[str, float]]:
    """{group: {task id: IoU}}."""
    out: dict[str, dict[str, float]] = {}
    for (task_id, group), value in ious.per_key().items():
        out.setdefault(group, {})[task_id] = value
    return out
