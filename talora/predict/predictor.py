"""TaskAwarePredictor: one image, K prompts -> semantic masks and instances per prompt.

The single per-image code path behind the labelling job's actors, `talora predict` and the
benchmark. Per image: one trunk pass; per prompt the adapted encoder tail, then

- the semantic pass: no point prompt, one mask per prompt, gated by the presence probability
  (an absent task gives no mask);
- the instance pass: a points_per_side x points_per_side grid, keeping only points near the
  prompt's semantic mask. The points of every prompt go through the decoder together, in batches
  of points_per_batch rows, each row pointing at its prompt's image embedding and adapter row
  (`TaskAwareSam.decode(rows=)`); SAM's filters (predicted IoU, stability score; the helpers of
  talora.backbones.amg) run on the whole batch, box NMS on all prompts at once (per prompt, through
  torchvision's batched_nms), mask NMS per prompt, then COCO RLE once per kept mask. On grids
  of 16 per side and more the coarse grid goes first and the other points only where no kept
  mask of their prompt covers them (`coarse_to_fine`).

Images can come in batches (`predict_batch`): one trunk pass for all of them, then the per-prompt
passes image by image. `precision` runs the model under autocast (bf16, or fp16 where the GPU has
no bf16); filtering, upsampling and RLE always see float32 logits.

Shapes: P = prompts, n = grid points in a batch, L = low-res mask grid (4h), H x W = the image.
Filtering runs on the low-res logits (L x L, 256 x 256 for vit_h) and only kept masks are
upsampled to H x W, so a 64-point batch never holds 64 x 3 full-resolution masks.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from scipy import ndimage
from torchvision.ops.boxes import batched_nms

from talora.core.precision import cpu_has_native
from talora.backbones.amg import MaskData, batched_mask_to_box, build_point_grid, calculate_stability_score
from talora.model.task_aware_sam import TaskAwareSam

MODES = ("instance", "semantic", "both")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Coarse to fine pays on dense grids: on the demo val at 16 x 16 it decoded ~2/3 of the rows at the
# same mask AP; at 8 x 8 its 4 x 4 coarse grid missed objects (AP 0.594 -> 0.585) and saved no time.
COARSE_TO_FINE_MIN_SIDE = 16

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictConfig:
    mode: str = "both"  # instance | semantic | both
    points_per_side: int = 16
    points_per_batch: int = 64
    score_thresh: float = 0.5  # an instance's predicted IoU (a detector's: its query score x presence)
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
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of the model passes
    # The coarse grid first; then only the points outside every mask their prompt kept so far.
    coarse_to_fine: bool = True
    # Per-prompt presence thresholds ((prompt, threshold), ...): override presence_thresh for those prompts.
    prompt_thresholds: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, got {self.mode!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}")
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise ValueError("--points-per-side and --points-per-batch must be >= 1")
        for name in ("score_thresh", "stability_thresh", "nms_thresh", "presence_thresh", "mask_nms_thresh",
                     "part_score", "min_part_area"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        for prompt, thresh in self.prompt_thresholds:
            if not 0.0 <= thresh <= 1.0:
                raise ValueError(f"--prompt-thresh for {prompt!r} must be in [0, 1], got {thresh}")

    def presence_thresh_of(self, prompt: str) -> float:
        """The presence threshold of `prompt`: its own where given, else presence_thresh."""
        return dict(self.prompt_thresholds).get(prompt, self.presence_thresh)


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


def filter_masks(lowres: torch.Tensor, iou_preds: torch.Tensor, cfg: PredictConfig, mask_threshold: float,
                 owner: torch.Tensor | None = None) -> MaskData:
    """SAM's automatic-mask filters on n x 3 candidate low-res masks: predicted IoU, stability
    score, then boxes for NMS. lowres (n, 3, L, L) logits, iou_preds (n, 3), owner (n,) the prompt
    of each row (None: one prompt)."""
    if owner is None:
        owner = torch.zeros(len(lowres), dtype=torch.long, device=lowres.device)
    data = MaskData(masks=lowres.flatten(0, 1), iou_preds=iou_preds.flatten(0, 1),  # (n*3, L, L), (n*3,)
                    owner=owner.repeat_interleave(lowres.shape[1]))
    if cfg.score_thresh > 0:  # as SAM's generator: a zero threshold filters nothing
        data.filter(data["iou_preds"] > cfg.score_thresh)
    data["stability_score"] = calculate_stability_score(data["masks"], mask_threshold, cfg.stability_offset)
    if cfg.stability_thresh > 0:
        data.filter(data["stability_score"] >= cfg.stability_thresh)
    data["boxes"] = batched_mask_to_box(data["masks"] > mask_threshold)  # low-res xyxy
    return data


def deduplicate(data: MaskData, cfg: PredictConfig, mask_threshold: float = 0.0) -> MaskData:
    """Per prompt (data["owner"]): box NMS over every kept candidate, best first, at most
    max_instances; then, if mask_nms_thresh < 1, greedy mask-IoU NMS on the low-res masks (boxes
    miss a part nested in its whole). Candidates stay best first."""
    owner = data["owner"]
    order = batched_nms(data["boxes"].float(), data["iou_preds"], owner, cfg.nms_thresh)  # best first
    rank = torch.zeros_like(order)  # the position of each candidate among its prompt's
    for p in owner[order].unique():
        mine = owner[order] == p
        rank[mine] = torch.arange(int(mine.sum()), device=order.device)
    data.filter(order[rank < cfg.max_instances])
    if cfg.mask_nms_thresh < 1.0 and len(data["iou_preds"]) > 1:
        owner, binary = data["owner"], data["masks"] > mask_threshold
        keep = [torch.nonzero(owner == p)[:, 0][mask_nms(binary[owner == p], cfg.mask_nms_thresh)]
                for p in owner.unique()]
        data.filter(torch.cat(keep).sort().values)
    return data


def mask_nms(masks: torch.Tensor, thresh: float) -> torch.Tensor:
    """Indices kept by greedy NMS on mask IoU; masks (k, L, L) bool, already sorted best first."""
    flat = masks.flatten(1).float()  # (k, L*L)
    inter = flat @ flat.T  # (k, k)
    area = flat.sum(1)
    overlaps = (inter / (area[:, None] + area[None, :] - inter).clamp(min=1) > thresh).cpu().numpy()
    keep: list[int] = []
    for i in range(len(masks)):
        if not overlaps[i, keep].any():
            keep.append(i)
    return torch.as_tensor(keep, dtype=torch.long, device=masks.device)


class TaskAwarePredictor:
    def __init__(self, model: TaskAwareSam, config: PredictConfig = PredictConfig()) -> None:
        self.model = model.eval()
        self.backbone = model.backbone
        self.config = config
        self.grid = build_point_grid(config.points_per_side)  # (N, 2) in [0, 1]
        self.dtype = autocast_dtype(config.precision, self.device)

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def autocast(self):
        """The model passes' autocast context (none in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def resize(self, image: np.ndarray) -> np.ndarray:
        """HWC uint8 RGB -> the model's resized frame (the CPU stage of the labelling job)."""
        return self.backbone.resize(image)

    @torch.no_grad()
    def predict(self, image: np.ndarray, prompts: list[str], boxes: list[dict] | None = None) -> dict[str, list[Detection]]:
        """HWC uint8 RGB image -> {prompt: detections}, semantic first, then instances by score.
        `boxes` ([{"bbox": [x, y, w, h], "prompt": one of `prompts` or None = every prompt}], in
        the image's pixels): the instances are these boxes' masks instead of the point grid's."""
        return self.predict_resized(self.resize(image), image.shape[:2], prompts, boxes)

    @torch.no_grad()
    def predict_resized(self, resized: np.ndarray, original_size: tuple[int, int], prompts: list[str],
                        boxes: list[dict] | None = None):
        """A resized HWC image (the job's CPU stage did `resize`) -> {prompt: detections}."""
        return self.predict_batch([(resized, original_size)], prompts, None if boxes is None else [boxes])[0]

    @torch.no_grad()
    def predict_batch(self, images: list[tuple[np.ndarray, tuple[int, int]]], prompts: list[str],
                      boxes: list[list[dict] | None] | None = None) -> list[dict]:
        """[(resized HWC image, original (H, W))] -> [{prompt: detections}] per image: the trunk runs
        once on the whole batch (padded to the model's square input), the rest image by image.
        `boxes`: per image, its box prompts (see `predict`) or None for the point grid."""
        adapter = self.model.adapters(prompts)  # P rows, cached per prompt
        trunks = self.trunk([resized for resized, _ in images])  # (B, h, w, C)
        thresholds = [self.config.presence_thresh_of(p) for p in prompts]
        boxes = boxes or [None] * len(images)
        return [dict(zip(prompts, self.predict_rows(trunks[i : i + 1], adapter, tuple(resized.shape[:2]), size,
                                                    thresholds=thresholds, boxes=box_prompts(boxes[i], prompts),
                                                    prompts=prompts)))
                for i, (resized, size) in enumerate(images)]

    @torch.no_grad()
    def predict_rows(self, trunk: torch.Tensor, adapter, input_size: tuple[int, int], original_size: tuple[int, int],
                     regions: list[torch.Tensor] | None = None,
                     thresholds: list[float] | None = None,
                     boxes: tuple[np.ndarray, np.ndarray] | None = None,
                     prompts: list[str] | None = None) -> list[list[Detection]]:
        """(1, h, w, C) trunk features + a per-row adapter (P rows) -> detections per row.

        `regions` (P masks of H x W) replaces the predicted task regions in the instance pass (the
        quality benchmark's ground-truth ceiling); the semantic detection is always the predicted one.
        `thresholds`: each row's presence threshold (default: presence_thresh for every row).
        `boxes`: (xywh boxes (n, 4) in the original frame, the row of each (n,)): the instances
        are these boxes' masks, one per box, whatever the presence says, instead of the grid's.
        `prompts`: the rows' prompts, which a detector family (SAM 3) also reads as its own text
        prompt (`detect_instances`); the decoder families do not need them."""
        if self.backbone.detector:
            if regions is not None or boxes is not None:
                raise ValueError(f"{self.backbone.variant.name} is a detector: it takes no task regions or box prompts")
            if prompts is None:
                raise ValueError(f"{self.backbone.variant.name} is a detector: predict_rows needs the rows' prompts")
            return self.detect_instances(trunk, adapter, prompts, input_size, original_size, thresholds)
        cfg = self.config
        with self.autocast():
            embeddings = self.tail(trunk, adapter)  # (P, C', h, w)
            presence, logits = self.semantic(embeddings, adapter, input_size, original_size)  # (P,), (P, H, W)
        predicted = self.task_regions(presence, logits, thresholds)
        results = [[encode_mask(region.cpu().numpy(), "semantic", float(presence[p]))]
                   if cfg.mode in ("semantic", "both") and region.any() else [] for p, region in enumerate(predicted)]
        if cfg.mode in ("instance", "both") and boxes is not None:
            for detections, instances in zip(results, self.decode_boxes(embeddings, adapter, *boxes, input_size,
                                                                         original_size)):
                detections += instances
        elif cfg.mode in ("instance", "both"):
            instance_regions = predicted if regions is None else regions
            candidates = self.instance_candidates(embeddings, adapter, instance_regions, original_size)
            kept = self.keep_instances(candidates, input_size, original_size, instance_regions, presence.tolist())
            for detections, instances in zip(results, kept):
                detections += instances
        return results

    def detect_instances(self, trunk: torch.Tensor, adapter, prompts: list[str], input_size, original_size,
                         thresholds: list[float] | None = None) -> list[list[Detection]]:
        """A detector family's rows: the adapted tail, then the detector per prompt. The semantic
        detection is its semantic mask where its presence clears the row's threshold; the instances
        are its queries whose score x presence (as `Sam3Processor` scores them) passes score_thresh,
        de-duplicated per prompt as the grid's are, best first."""
        with self.autocast():
            embeddings = self.tail(trunk, adapter)  # (P, C', h, w)
            found = self.model.detect(embeddings, adapter, prompts)
        return self.keep_detections(found, len(prompts), input_size, original_size, thresholds)

    def keep_detections(self, found, num_prompts: int, input_size, original_size,
                        thresholds: list[float] | None = None) -> list[list[Detection]]:
        """A detector's outputs for P rows (the family's Detections) -> detections per row (see
        `detect_instances`)."""
        cfg, backbone = self.config, self.backbone
        presence = torch.sigmoid(found.presence_logits.float())  # (P,)
        semantic = backbone.postprocess_masks(found.semantic.float()[:, None], input_size, original_size)[:, 0]
        regions = self.task_regions(presence, semantic, thresholds)  # empty where the task is absent
        results = [[encode_mask(region.cpu().numpy(), "semantic", float(presence[p]))]
                   if cfg.mode in ("semantic", "both") and region.any() else [] for p, region in enumerate(regions)]
        if cfg.mode not in ("instance", "both"):
            return results
        thresholds = thresholds or [cfg.presence_thresh] * num_prompts
        scores = torch.sigmoid(found.scores.float()) * presence[:, None]  # (P, Q)
        present = presence >= torch.tensor(thresholds, device=presence.device)  # (P,)
        keep = (scores > cfg.score_thresh) & present[:, None]
        owner = torch.arange(num_prompts, device=scores.device)[:, None].expand_as(scores)
        if not keep.any():
            return results
        lowres = found.masks.float()[keep]  # (k, L, L)
        data = MaskData(masks=lowres, iou_preds=scores[keep], owner=owner[keep],
                        boxes=batched_mask_to_box(lowres > backbone.mask_threshold))
        data = deduplicate(data, cfg, backbone.mask_threshold)
        for p in range(num_prompts):
            mine = data["owner"] == p
            if not mine.any():
                continue
            masks = backbone.postprocess_masks(data["masks"][mine][:, None], input_size, original_size)[:, 0]
            masks = (masks > backbone.mask_threshold).cpu().numpy()  # (k, H, W)
            results[p] += [encode_mask(m, "instance", s) for m, s in zip(masks, data["iou_preds"][mine].tolist())
                           if m.any()]
        return results

    # --- the stages of predict_rows (the benchmark times each) ------------------------------------

    def trunk(self, resized: np.ndarray | list[np.ndarray]) -> torch.Tensor:
        """A resized HWC image (or a list of B) -> (1 or B, h, w, C) trunk features: once per image,
        shared by every prompt."""
        images = [resized] if isinstance(resized, np.ndarray) else resized
        with self.autocast():
            return self.model.embed_trunk(torch.cat([self.backbone.normalize(image) for image in images]))

    def tail(self, trunk: torch.Tensor, adapter) -> torch.Tensor:
        """(1, h, w, C) trunk features + P adapter rows -> (P, C', h, w) image embeddings."""
        return self.model.embed_tail(trunk.expand(adapter.num_rows or 1, -1, -1, -1), adapter)

    def semantic(self, embeddings: torch.Tensor, adapter, input_size, original_size):
        """The prompt-free decoder row per prompt -> (presence probabilities (P,), mask logits (P, H, W))."""
        semantic = self.model.decode(embeddings, adapter, multimask_output=False)
        presence = torch.sigmoid(semantic.presence_logits.float())  # (P,)
        logits = self.backbone.postprocess_masks(semantic.masks.float(), input_size, original_size)[:, 0]
        return presence, logits

    def task_regions(self, presence: torch.Tensor, logits: torch.Tensor,
                     thresholds: list[float] | None = None) -> list[torch.Tensor]:
        """Each prompt's semantic mask (H, W), empty where presence (below the row's threshold) says
        the task is absent."""
        thresholds = thresholds or [self.config.presence_thresh] * len(presence)
        present = presence >= torch.tensor(thresholds, device=presence.device)  # (P,)
        return [(logits[p] > self.backbone.mask_threshold) & bool(present[p]) for p in range(len(presence))]

    def grid_points(self, regions: list[torch.Tensor], original_size) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The grid points within `dilation` of each region: (points (n, 2) x, y in pixels, their
        prompt (n,), whether each is on the coarse grid of every other row and column (n,)), prompt
        by prompt. A point is kept when the square of side 2r+1 around it holds a pixel of the region
        (a max-pool dilation read at the points, from one integral image)."""
        H, W = original_size
        radius = max(1, int(self.config.dilation * max(H, W)))
        grid = self.grid * np.array([[W, H]])  # (N, 2), row-major: point k is row k // side, column k % side
        side = self.config.points_per_side
        row, column = np.divmod(np.arange(len(grid)), side)
        coarse = (row % 2 == 1) & (column % 2 == 1)
        xs = np.clip(grid[:, 0].astype(int), 0, W - 1)
        ys = np.clip(grid[:, 1].astype(int), 0, H - 1)
        x0, x1 = np.clip(xs - radius, 0, W), np.clip(xs + radius + 1, 0, W)
        y0, y1 = np.clip(ys - radius, 0, H), np.clip(ys + radius + 1, 0, H)
        points, owners, coarse_points = [], [], []
        for p, region in enumerate(regions):
            if not region.any():
                continue
            integral = F.pad(region.int().cumsum(0).cumsum(1), (1, 0, 1, 0)).cpu().numpy()  # (H+1, W+1)
            inside = (integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]) > 0
            points.append(grid[inside])
            owners.append(np.full(int(inside.sum()), p))
            coarse_points.append(coarse[inside])
        if not points:
            return np.zeros((0, 2)), np.zeros(0, dtype=int), np.zeros(0, dtype=bool)
        return np.concatenate(points), np.concatenate(owners), np.concatenate(coarse_points)

    def instance_candidates(self, embeddings: torch.Tensor, adapter, regions: list[torch.Tensor],
                            original_size) -> list[tuple]:
        """Grid points near each prompt's region, every prompt's in the same decoder batches of
        points_per_batch rows -> [(prompt of each row (n,), low-res logits (n, 3, L, L), predicted
        IoUs (n, 3))]. embeddings (P, C', h, w) and `adapter` (P rows) are indexed per row, not copied.

        With `coarse_to_fine` (on grids of COARSE_TO_FINE_MIN_SIDE and more), the coarse grid (every
        other row and column) goes first; of the other points, only those outside every mask of
        their prompt kept so far are decoded: a point on an object already found would find it again."""
        points, owners, coarse = self.grid_points(regions, original_size)
        coords = self.backbone.apply_coords(points, original_size)  # the input frame
        if not self.config.coarse_to_fine or self.config.points_per_side < COARSE_TO_FINE_MIN_SIDE:
            return self.decode_points(embeddings, adapter, coords, owners)
        candidates = self.decode_points(embeddings, adapter, coords[coarse], owners[coarse])
        rest = ~coarse & ~self.covered(candidates, coords, owners)
        return candidates + self.decode_points(embeddings, adapter, coords[rest], owners[rest])

    def decode_points(self, embeddings: torch.Tensor, adapter, coords: np.ndarray, owners: np.ndarray) -> list[tuple]:
        """Point prompts (n, 2) in the input frame, each of prompt owners[i] -> decoder outputs in
        batches of points_per_batch rows."""
        candidates = []
        for start in range(0, len(coords), self.config.points_per_batch):
            batch = slice(start, start + self.config.points_per_batch)
            rows = torch.as_tensor(owners[batch], device=self.device)
            point_coords = torch.as_tensor(coords[batch], dtype=torch.float32, device=self.device)[:, None, :]
            labels = torch.ones(len(rows), 1, dtype=torch.int, device=self.device)
            with self.autocast():
                out = self.model.decode(embeddings, adapter, point_coords, labels, multimask_output=True, rows=rows)
            candidates.append((rows, out.masks.float(), out.iou_predictions.float()))
        return candidates

    def decode_boxes(self, embeddings: torch.Tensor, adapter, boxes: np.ndarray, owners: np.ndarray, input_size,
                     original_size) -> list[list[Detection]]:
        """Box prompts (n, 4: x, y, w, h in the original frame), box i under the adapter of row
        owners[i] -> per row, one instance per box (SAM's single mask for a box, scored by its
        predicted IoU), in box order."""
        results: list[list[Detection]] = [[] for _ in range(embeddings.shape[0])]
        xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)  # (n, 4)
        coords = self.backbone.apply_boxes(xyxy, original_size)  # the input frame
        for start in range(0, len(coords), self.config.points_per_batch):
            batch = slice(start, start + self.config.points_per_batch)
            rows = torch.as_tensor(owners[batch], device=self.device)
            box_tensor = torch.as_tensor(coords[batch], dtype=torch.float32, device=self.device)  # (b, 4)
            with self.autocast():
                out = self.model.decode(embeddings, adapter, boxes=box_tensor, multimask_output=False, rows=rows)
            masks = self.backbone.postprocess_masks(out.masks.float(), input_size, original_size)[:, 0]  # (b, H, W)
            masks = (masks > self.backbone.mask_threshold).cpu().numpy()
            for row, mask, score in zip(rows.tolist(), masks, out.iou_predictions.float()[:, 0].tolist()):
                results[row].append(encode_mask(mask, "instance", score))
        return results

    def kept(self, candidates: list[tuple]) -> MaskData | None:
        """SAM's filters on every decoder batch, then the de-duplication per prompt: the masks each
        prompt keeps (low-res, with their prompt in "owner"), best first; None if none is kept."""
        threshold = self.backbone.mask_threshold
        parts = [filter_masks(lowres, ious, self.config, threshold, rows) for rows, lowres, ious in candidates]
        if not parts:
            return None
        data = parts[0]
        for part in parts[1:]:
            data.cat(part)
        return deduplicate(data, self.config, threshold) if len(data["masks"]) else None

    def covered(self, candidates: list[tuple], coords: np.ndarray, owners: np.ndarray) -> np.ndarray:
        """(n,) whether each point (input frame) lies in a mask its prompt keeps from `candidates`
        (SAM's filters and the de-duplication, on the low-res masks, which cover the padded input)."""
        kept = self.kept(candidates)
        if kept is None or not len(coords):
            return np.zeros(len(coords), dtype=bool)
        masks = kept["masks"] > self.backbone.mask_threshold  # (k, L, L)
        scale = masks.shape[-1] / self.backbone.image_size
        lx = torch.as_tensor(np.clip((coords[:, 0] * scale).astype(int), 0, masks.shape[-1] - 1), device=masks.device)
        ly = torch.as_tensor(np.clip((coords[:, 1] * scale).astype(int), 0, masks.shape[-2] - 1), device=masks.device)
        same_prompt = kept["owner"][:, None] == torch.as_tensor(owners, device=masks.device)[None, :]  # (k, n)
        return (masks[:, ly, lx] & same_prompt).any(0).cpu().numpy()

    def keep_instances(self, candidates: list[tuple], input_size, original_size, regions: list[torch.Tensor],
                       presence: list[float]) -> list[list[Detection]]:
        """SAM's filters on every decoder batch, box NMS per prompt on all of them at once, mask NMS
        per prompt; then only the kept masks are upsampled to the image and RLE-encoded. Every
        connected part of a prompt's region (H x W, where its points came from) that no kept mask
        matches becomes an instance too. -> detections per prompt, by score."""
        backbone, cfg = self.backbone, self.config
        kept = self.kept(candidates)
        results = []
        for p, region in enumerate(regions):
            masks, scores = np.zeros((0, *original_size), dtype=bool), []
            if kept is not None and (mine := kept["owner"] == p).any():
                upsampled = backbone.postprocess_masks(kept["masks"][mine][:, None], input_size, original_size)[:, 0]
                masks = (upsampled > backbone.mask_threshold).cpu().numpy()  # (k, H, W)
                scores = kept["iou_preds"][mine].tolist()
            found = [(m, s) for m, s in zip(masks, scores) if m.any()]
            if cfg.region_parts and region.any():
                found += unmatched_parts(region.cpu().numpy(), masks, presence[p] * cfg.part_score, cfg.min_part_area)
            results.append([encode_mask(m, "instance", float(s)) for m, s in found])
        return results


def box_prompts(boxes: list[dict] | None, prompts: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """[{"bbox": [x, y, w, h], "prompt": str | None}] -> (boxes (n, 4), the prompt row of each (n,)):
    a box with a prompt goes to that prompt's row, one without to every prompt's. None -> None."""
    if boxes is None:
        return None
    xywh, owners = [], []
    for box in boxes:
        rows = [prompts.index(box["prompt"])] if box.get("prompt") else range(len(prompts))
        for row in rows:
            xywh.append([float(v) for v in box["bbox"]])
            owners.append(row)
    return np.array(xywh, dtype=np.float64).reshape(-1, 4), np.array(owners, dtype=int)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`: bf16 falls back to fp16 on a GPU without it,
    and a CPU without the dtype's instructions runs fp32 (emulated bf16 is several times slower)."""
    dtype = PRECISIONS[precision]
    if dtype is not None and device.type == "cpu" and not cpu_has_native(dtype):
        log.warning(f"this CPU has no {precision} instructions: --precision {precision} runs as fp32")
        return None
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("this GPU has no bf16: --precision bf16 runs as fp16")
        return torch.float16
    return dtype


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
