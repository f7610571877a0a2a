"""SAM-style losses, always computed in float32 (also under autocast).

Shapes: R = rows, M = masks per row, H x W = the low-res mask grid (4h x 4w).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Per-mask sigmoid focal loss, mean over pixels: (..., H, W) -> (...)."""
    logits, target = logits.float(), target.float()
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-mask soft dice loss: (..., H, W) -> (...). An empty target with an empty prediction is 0."""
    p = torch.sigmoid(logits.float()).flatten(-2)
    t = target.float().flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of the thresholded prediction (no gradient): (..., H, W) -> (...)."""
    with torch.no_grad():
        pred = logits.float() > 0
        t = target > 0.5
        inter = (pred & t).flatten(-2).sum(-1).float()
        union = (pred | t).flatten(-2).sum(-1).float()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def empty_share(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Of the rows whose target has a pixel, the share whose every candidate mask is empty (no
    gradient): the sign of a run collapsing to empty masks. logits (R, M, H, W), target (R, H, W)."""
    with torch.no_grad():
        wanted = (target > 0.5).flatten(1).any(1)
        nothing = ~(logits.float() > 0).flatten(1).any(1)
        return (nothing & wanted).sum().float() / wanted.sum().clamp(min=1)


def mask_losses(
    logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, focal_weight: float, dice_weight: float,
    iou_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's loss for R rows of M candidate masks: the best candidate per row (min mask loss) is
    trained, plus an MSE on its IoU prediction. logits (R, M, H, W), iou_pred (R, M), target (R, H, W).

    Returns (per-row loss (R,), per-row IoU of the chosen mask (R,))."""
    target = target.unsqueeze(1).expand_as(logits)  # (R, M, H, W)
    per_mask = focal_weight * focal_loss(logits, target) + dice_weight * dice_loss(logits, target)  # (R, M)
    best = per_mask.argmin(dim=1)  # (R,)
    rows = torch.arange(logits.shape[0], device=logits.device)
    iou = mask_iou(logits[rows, best], target[rows, best])  # (R,)
    iou_loss = F.mse_loss(iou_pred.float()[rows, best], iou, reduction="none")
    return per_mask[rows, best] + iou_weight * iou_loss, iou


def presence_loss(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), present.float(), reduction="none")
