"""One training forward: adapters -> encoder tail -> decoder (semantic and point rows) or a
detector's matched queries -> losses.

`TrainStep` holds only the trainable modules (the adapter source and the presence head) as
submodules; the frozen TaskAwareSam is kept outside the module tree, so DDP wraps and
broadcasts the trainable weights only (a frozen vit_h would be 2.5 GB per broadcast).
"""

from __future__ import annotations

import torch
from torch import nn

from talora.model.task_aware_sam import TaskAwareSam
from talora.train.batches import Batch
from talora.train.config import TrainConfig
from talora.train.detector import detector_losses
from talora.train.losses import empty_share, mask_losses, presence_loss


class TrainStep(nn.Module):
    def __init__(self, model: TaskAwareSam, adapter_source: nn.Module) -> None:
        """`adapter_source`: the hypernet (text embeddings -> per-row Adapter) or a StaticLora."""
        super().__init__()
        self.adapter_source = adapter_source
        self.presence_head = model.presence_head
        object.__setattr__(self, "model", model)  # not a submodule: DDP must not see the frozen SAM
        self.matcher = model.backbone.matcher() if model.backbone.detector else None

    def adapters(self, text_embeddings: torch.Tensor | None, rows: torch.Tensor):
        """One adapter row per entry of `rows` (indices into the step's prompts)."""
        if text_embeddings is None:  # static: the same adapter for every row
            return self.adapter_source().expand(len(rows))
        return self.adapter_source(text_embeddings).select(rows)

    def forward(self, batch: Batch, text_embeddings: torch.Tensor | None, config: TrainConfig) -> dict[str, torch.Tensor]:
        model = self.model
        adapter = self.adapters(text_embeddings, batch.prompt_index)  # R rows
        embeddings = model.embed_tail(batch.trunk[batch.image_index], adapter)  # (R, C, h, w)

        # A detector (SAM 3): each row finds every instance of its task, matched one to one.
        if model.backbone.detector:
            found = model.detect(embeddings, adapter, batch.row_prompts)
            loss, out = detector_losses(found, batch, self.matcher, config)
            out["loss"] = loss
            return out

        # Semantic rows: no prompt; the mask is the task's union, the presence head says "is it here".
        semantic = model.decode(embeddings, adapter, multimask_output=False)
        sem_loss, sem_iou = mask_losses(semantic.masks, semantic.iou_predictions, batch.semantic_target,
                                        config.focal_weight, config.dice_weight, config.iou_weight)
        pres_loss = presence_loss(semantic.presence_logits, batch.present)
        loss = sem_loss.mean() + config.presence_weight * pres_loss.mean()
        out = {"loss_semantic": sem_loss.mean().detach(), "loss_presence": pres_loss.mean().detach(),
               "iou_semantic": sem_iou.mean(), "empty_semantic": empty_share(semantic.masks, batch.semantic_target)}

        # Point rows: one positive or negative point each; SAM's best-of-3 masks.
        if len(batch.point_row):
            rows = batch.point_row
            points = model.decode(embeddings[rows], adapter.select(rows) if adapter.num_rows else adapter,
                                  batch.point_coords, batch.point_labels, multimask_output=True)
            point_loss, point_iou = mask_losses(points.masks, points.iou_predictions, batch.point_target,
                                                config.focal_weight, config.dice_weight, config.iou_weight)
            loss = loss + point_loss.mean()
            out.update(loss_points=point_loss.mean().detach(), iou_points=point_iou.mean(),
                       empty_points=empty_share(points.masks, batch.point_target))

        # Box rows: an instance's box (a detector's, at labelling time) under the task's adapter; one mask.
        if len(batch.box_row):
            rows = batch.box_row
            boxed = model.decode(embeddings[rows], adapter.select(rows) if adapter.num_rows else adapter,
                                 boxes=batch.boxes, multimask_output=False)
            box_loss, box_iou = mask_losses(boxed.masks, boxed.iou_predictions, batch.box_target,
                                            config.focal_weight, config.dice_weight, config.iou_weight)
            loss = loss + box_loss.mean()
            out.update(loss_boxes=box_loss.mean().detach(), iou_boxes=box_iou.mean(),
                       empty_boxes=empty_share(boxed.masks, batch.box_target))
        out["loss"] = loss
        return out
