"""A detector's training loss (SAM 3): its queries matched one to one to the task's instances.

Per (image, task) row the detector answers with Q queries (mask, box, score), a presence logit and a
semantic mask. The family's own matcher (`Backbone.matcher`: SAM 3's Hungarian matcher, focal class
cost + L1 + GIoU box costs) pairs queries with the row's instances; then

- scores: sigmoid focal loss over every query, 1 where matched (an absent task's queries are all 0),
  summed and divided by the instances in the batch, as DETR normalises it;
- boxes of matched queries: L1 + GIoU; masks of matched queries: the SAM-style focal + dice;
- presence: BCE against "is any instance of the task here";
- semantic mask: focal + dice against the union of the task's instances.

Weights: the matcher's own costs for scores and boxes (2, 5, 2: DETR's convention of loss weights
equal to matching costs); focal 2 and dice 5 for the instance and semantic masks, where SAM's
decoders train at 20:1 (TrainConfig.focal_weight / dice_weight): at 20:1 a random SAM 3's masks
were all empty by step 50 of pretraining and stayed so, at 2:5 none were (docs/results.md); and
TrainConfig's presence weight. Everything is float32.

Shapes: R rows, Q queries, N instances in the batch, L the low-res mask side.
"""

from __future__ import annotations

import torch
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss
from torchvision.ops.boxes import box_convert

from talora.train.losses import dice_loss, empty_share, focal_loss, mask_iou, presence_loss

CLASS_WEIGHT, BOX_L1_WEIGHT, BOX_GIOU_WEIGHT = 2.0, 5.0, 2.0
MASK_FOCAL_WEIGHT, MASK_DICE_WEIGHT = 2.0, 5.0


def match(matcher, found, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, query, instance) index triples of the matched pairs: instance k of row r is
    batch.instance_row's k-th entry among those of row r, in batch order."""
    rows = len(batch.prompt_index)
    counts = torch.bincount(batch.instance_row, minlength=rows)  # (R,)
    device = found.scores.device
    if not int(counts.sum()):
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, empty
    order = torch.argsort(batch.instance_row, stable=True)  # instances grouped by row, in batch order
    padded = torch.zeros(rows, int(counts.max()), 4, device=device)
    slot = torch.cat([torch.arange(int(c)) for c in counts.tolist()]).to(device)  # position within its row
    padded[batch.instance_row[order], slot] = batch.instance_box[order].to(device)
    outputs = {"pred_logits": found.scores.detach().float()[..., None], "pred_boxes": found.boxes.detach().float()}
    row, query, target = matcher(outputs, {"num_boxes": counts.to(device), "boxes_padded": padded})
    if target is None:  # every row's instances came back in order (fewer instances than queries)
        target = torch.arange(int(counts.sum()), device=device)
    return row, query, order.to(device)[target]


def detector_losses(found, batch, matcher, config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the loss, its parts for the log) for a detector's rows; `found`: the family's Detections."""
    row, query, instance = match(matcher, found, batch)
    num_instances = max(len(instance), 1)

    labels = torch.zeros_like(found.scores, dtype=torch.float32)  # (R, Q)
    labels[row, query] = 1.0
    class_loss = sigmoid_focal_loss(found.scores.float(), labels, alpha=0.25, gamma=2.0, reduction="sum") / num_instances

    metrics: dict[str, torch.Tensor] = {}
    loss = CLASS_WEIGHT * class_loss
    if len(instance):
        boxes = found.boxes.float()[row, query]  # (n, 4) cx, cy, w, h
        truth = batch.instance_box[instance].to(boxes.device)
        l1 = (boxes - truth).abs().sum(-1).mean()
        giou = generalized_box_iou_loss(box_convert(boxes, "cxcywh", "xyxy"), box_convert(truth, "cxcywh", "xyxy"),
                                        reduction="mean")
        masks = found.masks.float()[row, query]  # (n, L, L)
        targets = batch.instance_target[instance].to(masks.device)
        mask_loss = MASK_FOCAL_WEIGHT * focal_loss(masks, targets) + MASK_DICE_WEIGHT * dice_loss(masks, targets)
        loss = loss + BOX_L1_WEIGHT * l1 + BOX_GIOU_WEIGHT * giou + mask_loss.mean()
        metrics.update(loss_boxes=(l1 + giou).detach(), loss_instances=mask_loss.mean().detach(),
                       iou_instances=mask_iou(masks, targets).mean(),
                       empty_instances=empty_share(masks[:, None], targets))

    semantic = found.semantic.float()  # (R, L, L)
    target = batch.semantic_target.to(semantic.device)
    sem_loss = MASK_FOCAL_WEIGHT * focal_loss(semantic, target) + MASK_DICE_WEIGHT * dice_loss(semantic, target)
    pres_loss = presence_loss(found.presence_logits, batch.present)
    loss = loss + sem_loss.mean() + config.presence_weight * pres_loss.mean()
    metrics.update(loss_scores=class_loss.detach(), loss_semantic=sem_loss.mean().detach(),
                   loss_presence=pres_loss.mean().detach(), iou_semantic=mask_iou(semantic, target).mean(),
                   empty_semantic=empty_share(semantic[:, None], target))
    return loss, metrics
