"""TaskAwarePredictor: one image, K prompts -> semantic masks and instances per prompt.

The single per-image code path behind the labelling job's actors, `talora predict` and the
benchmark. Per image: one trunk pass; per prompt the adapted encoder tail, then

- the semantic pass: no point prompt, one mask per prompt, gated by the presence probability
  (an absent task gives no mask);
- the instance pass: a points_per_side x points_per_side grid, keeping only points where a
  dilation of the semantic mask says the task is, decoded in batches of points_per_batch rows
  (each row carries its own copy of the image embedding: 4 MB for vit_h); SAM's filters from
  segment_anything.utils.amg (predicted IoU, stability score, box NMS), then COCO RLE.

Shapes: P = prompts, n = grid points in a batch, L = low-res mask grid (4h), H x W = the image.
Filtering runs on the low-res logits (L x L, 256 x 256 for vit_h) and only kept masks are
upsampled to H x W, so a 64-point batch never holds 64 x 3 full-resolution masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from scipy import ndimage
from segment_anything.utils.amg import MaskData, batched_mask_to_box, build_point_grid, calculate_stability_score
from torchvision.ops.boxes import batched_nms

from talora.model import TaskAwareSam

MODES = ("instance", "semantic", "both")


@dataclass(frozen=True)
class PredictConfig:
    mode: str = "both"  # instance | semantic | both
    points_per_side: int = 16
    points_per_batch: int = 64
    score_thresh: float = 0.5  # predicted IoU of an instance mask
    stability_thresh: float = 0.8
    stability_offset: float = 1.0
    nms_thresh: float = 0.7
    presence_thresh: float = 0.5  # presence probability below which a task is absent
    dilation: float = 0.03  # grid points kept within this fraction of the image's long side of the task
    max_instances: int = 100  # per prompt, by score
    mask_nms_thresh: float = 0.5  # after box NMS: no two kept masks of a prompt overlap with mask IoU above this
    # A connected part of the task region that no kept mask matches (IoU <= 0.5) is an instance too,
    # scored presence x part_score (below a confident point mask); parts under min_part_area of the image are noise.
    region_parts: bool = True
    part_score: float = 0.5
    min_part_area: float = 0.001

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, got {self.mode!r}")
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise ValueError("--points-per-side and --points-per-batch must be >= 1")
        for name in ("score_thresh", "stability_thresh", "nms_thresh", "presence_thresh", "mask_nms_thresh",
                     "part_score", "min_part_area"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class Detection:
    kind: str  # instance | semantic
    rle: dict  # COCO compressed RLE: {"size": [H, W], "counts": str}
    bbox: list[float]  # x, y, w, h
    area: float
    score: float


def encode_mask(mask: np.ndarray, kind: str, score: float) -> Detection:
    """(H, W) bool -> a Detection with pycocotools' RLE, bbox and area."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return Detection(kind, {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
                     [float(v) for v in mask_utils.toBbox(rle)], float(mask_utils.area(rle)), float(score))


def filter_masks(lowres: torch.Tensor, iou_preds: torch.Tensor, cfg: PredictConfig, mask_threshold: float) -> MaskData:
    """SAM's automatic-mask filters on n x 3 candidate low-res masks: predicted IoU, stability
    score, then boxes for NMS. lowres (n, 3, L, L) logits, iou_preds (n, 3)."""
    data = MaskData(masks=lowres.flatten(0, 1), iou_preds=iou_preds.flatten(0, 1))  # (n*3, L, L), (n*3,)
    if cfg.score_thresh > 0:  # as SAM's generator: a zero threshold filters nothing
        data.filter(data["iou_preds"] > cfg.score_thresh)
    data["stability_score"] = calculate_stability_score(data["masks"], mask_threshold, cfg.stability_offset)
    if cfg.stability_thresh > 0:
        data.filter(data["stability_score"] >= cfg.stability_thresh)
    data["boxes"] = batched_mask_to_box(data["masks"] > mask_threshold)  # low-res xyxy
    return data


def deduplicate(data: MaskData, cfg: PredictConfig, mask_threshold: float = 0.0) -> MaskData:
    """Box NMS over every kept candidate of a prompt, best first, at most max_instances; then, if
    mask_nms_thresh < 1, greedy mask-IoU NMS on the low-res masks (boxes miss a part nested in its whole)."""
    keep = batched_nms(data["boxes"].float(), data["iou_preds"], torch.zeros_like(data["iou_preds"]),
                       cfg.nms_thresh)[: cfg.max_instances]
    data.filter(keep)
    if cfg.mask_nms_thresh < 1.0 and len(data["iou_preds"]) > 1:
        data.filter(mask_nms(data["masks"] > mask_threshold, cfg.mask_nms_thresh))
    return data


def mask_nms(masks: torch.Tensor, thresh: float) -> torch.Tensor:
    """Indices kept by greedy NMS on mask IoU; masks (k, L, L) bool, already sorted best first."""
    flat = masks.flatten(1).float()  # (k, L*L)
    inter = flat @ flat.T  # (k, k)
    area = flat.sum(1)
    iou = inter / (area[:, None] + area[None, :] - inter).clamp(min=1)
    keep: list[int] = []
    for i in range(len(masks)):
        if all(iou[i, j] <= thresh for j in keep):
            keep.append(i)
    return torch.as_tensor(keep, dtype=torch.long, device=masks.device)


class TaskAwarePredictor:
    def __init__(self, model: TaskAwareSam, config: PredictConfig = PredictConfig()) -> None:
        self.model = model.eval()
        self.backbone = model.backbone
        self.config = config
        self.grid = build_point_grid(config.points_per_side)  # (N, 2) in [0, 1]

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def resize(self, image: np.ndarray) -> np.ndarray:
        """HWC uint8 RGB -> the model's resized frame (the CPU stage of the labelling job)."""
        return self.backbone.resize(image)

    @torch.no_grad()
    def predict(self, image: np.ndarray, prompts: list[str]) -> dict[str, list[Detection]]:
        """HWC uint8 RGB image -> {prompt: detections}, semantic first, then instances by score."""
        return self.predict_resized(self.resize(image), image.shape[:2], prompts)

    @torch.no_grad()
    def predict_resized(self, resized: np.ndarray, original_size: tuple[int, int], prompts: list[str]):
        """A resized HWC image (the job's CPU stage did `resize`) -> {prompt: detections}."""
        adapter = self.model.adapters(prompts)  # P rows, cached per prompt
        rows = self.predict_rows(self.trunk(resized), adapter, tuple(resized.shape[:2]), original_size)
        return dict(zip(prompts, rows))

    @torch.no_grad()
    def predict_rows(self, trunk: torch.Tensor, adapter, input_size: tuple[int, int], original_size: tuple[int, int],
                     regions: list[torch.Tensor] | None = None) -> list[list[Detection]]:
        """(1, h, w, C) trunk features + a per-row adapter (P rows) -> detections per row.

        `regions` (P masks of H x W) replaces the predicted task regions in the instance pass (the
        quality benchmark's ground-truth ceiling); the semantic detection is always the predicted one."""
        cfg = self.config
        embeddings = self.tail(trunk, adapter)  # (P, C', h, w)
        presence, logits = self.semantic(embeddings, adapter, input_size, original_size)  # (P,), (P, H, W)
        predicted = self.task_regions(presence, logits)
        results = []
        for p, region in enumerate(predicted):
            detections = []
            if cfg.mode in ("semantic", "both") and region.any():
                detections.append(encode_mask(region.cpu().numpy(), "semantic", float(presence[p])))
            instance_region = region if regions is None else regions[p]
            if cfg.mode in ("instance", "both") and instance_region.any():
                candidates = self.instance_candidates(embeddings[p : p + 1], adapter.row(p), instance_region,
                                                      original_size)
                detections += self.keep_instances(candidates, input_size, original_size, instance_region,
                                                  float(presence[p]))
            results.append(detections)
        return results

    # --- the stages of predict_rows (the benchmark times each) ------------------------------------

    def trunk(self, resized: np.ndarray) -> torch.Tensor:
        """A resized HWC image -> (1, h, w, C) trunk features: once per image, shared by every prompt."""
        return self.model.embed_trunk(self.backbone.normalize(resized))

    def tail(self, trunk: torch.Tensor, adapter) -> torch.Tensor:
        """(1, h, w, C) trunk features + P adapter rows -> (P, C', h, w) image embeddings."""
        return self.model.embed_tail(trunk.expand(adapter.num_rows or 1, -1, -1, -1), adapter)

    def semantic(self, embeddings: torch.Tensor, adapter, input_size, original_size):
        """The prompt-free decoder row per prompt -> (presence probabilities (P,), mask logits (P, H, W))."""
        semantic = self.model.decode(embeddings, adapter, multimask_output=False)
        presence = torch.sigmoid(semantic.presence_logits.float())  # (P,)
        logits = self.backbone.postprocess_masks(semantic.masks.float(), input_size, original_size)[:, 0]
        return presence, logits

    def task_regions(self, presence: torch.Tensor, logits: torch.Tensor) -> list[torch.Tensor]:
        """Each prompt's semantic mask (H, W), empty where presence says the task is absent."""
        present = presence >= self.config.presence_thresh  # (P,)
        return [(logits[p] > self.backbone.mask_threshold) & bool(present[p]) for p in range(len(presence))]

    def instance_candidates(self, embedding, adapter, region: torch.Tensor, original_size) -> list[tuple]:
        """Grid points inside the (dilated) task region -> raw decoder outputs per batch of
        points_per_batch rows: [(low-res logits (n, 3, L, L), predicted IoUs (n, 3))]."""
        model, backbone, cfg = self.model, self.backbone, self.config
        H, W = original_size
        radius = max(1, int(cfg.dilation * max(H, W)))
        dilated = F.max_pool2d(region[None, None].float(), 2 * radius + 1, stride=1, padding=radius)[0, 0] > 0
        points = self.grid * np.array([[W, H]])  # (N, 2) x, y in pixels
        xs = np.clip(points[:, 0].astype(int), 0, W - 1)
        ys = np.clip(points[:, 1].astype(int), 0, H - 1)
        points = points[dilated.cpu().numpy()[ys, xs]]
        candidates = []
        for start in range(0, len(points), cfg.points_per_batch):
            batch = points[start : start + cfg.points_per_batch]
            coords = torch.as_tensor(backbone.apply_coords(batch, original_size), dtype=torch.float32,
                                     device=self.device)[:, None, :]  # (n, 1, 2) in the input frame
            labels = torch.ones(len(batch), 1, dtype=torch.int, device=self.device)
            n = len(batch)
            out = model.decode(embedding.expand(n, -1, -1, -1), adapter, coords, labels, multimask_output=True)
            candidates.append((out.masks.float(), out.iou_predictions.float()))
        return candidates

    def keep_instances(self, candidates: list[tuple], input_size, original_size, region: torch.Tensor | None = None,
                       presence: float = 1.0) -> list[Detection]:
        """SAM's filters per decoder batch, box then mask NMS over all of them, then only the kept
        masks are upsampled to the image and RLE-encoded; with `region` (H x W, the task region the
        points came from), every connected part of it that no kept mask matches becomes an instance too."""
        backbone, cfg = self.backbone, self.config
        masks, scores = np.zeros((0, *original_size), dtype=bool), []
        parts = [filter_masks(lowres, ious, cfg, backbone.mask_threshold) for lowres, ious in candidates]
        if parts:
            data = parts[0]
            for part in parts[1:]:
                data.cat(part)
            if len(data["masks"]):
                data = deduplicate(data, cfg, backbone.mask_threshold)  # low-res boxes overlap as in the original
                upsampled = backbone.postprocess_masks(data["masks"][:, None], input_size, original_size)[:, 0]
                masks = (upsampled > backbone.mask_threshold).cpu().numpy()  # (k, H, W)
                scores = data["iou_preds"].tolist()
        found = [(m, s) for m, s in zip(masks, scores) if m.any()]
        if region is not None and cfg.region_parts:
            found += unmatched_parts(region.cpu().numpy(), masks, presence * cfg.part_score, cfg.min_part_area)
        return [encode_mask(m, "instance", float(s)) for m, s in found]


def unmatched_parts(region: np.ndarray, masks: np.ndarray, score: float, min_area: float) -> list[tuple]:
    """Connected parts of `region` (H x W bool) of at least `min_area` of the image that no mask of
    `masks` (k x H x W) overlaps with IoU > 0.5: [(part mask, score)]. The point prompts miss such a
    part (no grid point passed SAM's filters there), yet the semantic mask says an object is there."""
    labels, count = ndimage.label(region)  # (H, W) int: 0 = outside, 1..count = parts
    if count == 0:
        return []
    part_area = np.bincount(labels.ravel(), minlength=count + 1)
    matched = np.zeros(count + 1, dtype=bool)
    for mask in masks:  # intersections of this mask with every part in one pass
        inter = np.bincount(labels[mask], minlength=count + 1)
        matched |= inter / np.maximum(part_area + mask.sum() - inter, 1) > 0.5
    least = min_area * region.size
    return [(labels == c, score) for c in range(1, count + 1) if not matched[c] and part_area[c] >= least]
