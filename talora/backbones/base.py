"""The contract every SAM family meets, so the rest of talora never touches a family's internals.

A `Backbone` holds one frozen SAM (`model`, an nn.Module whose Linears LoRA wraps in place; target
names are module paths inside it) and answers, for that family:

- frames: resize an image to the model's input frame, map points/boxes/masks into it, normalise;
- the encoder split: `embed_trunk` (once per image, shared by all prompts; one tensor per image)
  and `embed_tail` (the last k blocks + neck, per (image, prompt) row), which together equal the
  family's own image path (`embed_image`);
- the decoder, one image embedding per row: `encode_prompts` + `decode_rows`;
- masks back to the original frame: `postprocess_masks`;
- LoRA targets (`find_targets`) and which weights the trunk depends on (`trunk_digest`).

A family module (``talora/backbones/<family>.py``) defines its `Backbone` subclass and two
functions the registry calls: ``build_model(variant_name)`` (random init) and ``detect_variant(state_dict)``
(which of its variants a checkpoint holds, or None). Its CPU-side resize, used without building a
model or importing torch, is the frame geometry its `Family` entry names (``talora.backbones.frames.FRAMES``).

Shapes: B = images, P = rows, S = the square input side, h x w = the embedding grid, L = the
low-res mask side (4h), C = trunk channels, C' = decoder channels, M = masks per row.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from talora.backbones.frames import resize_square
from talora.backbones.variants import FAMILIES, Variant
from talora.core.lora import LoraLinear, LoraTarget

if TYPE_CHECKING:  # annotations only: the config module reads this package's registry
    from talora.config import LoraConfig


class Backbone:
    def __init__(self, variant: Variant, model: nn.Module) -> None:
        self.variant = variant
        self.model = model

    # --- facts -----------------------------------------------------------------------------------
    image_size: int  # S
    embedding_size: int  # h (= w)
    trunk_size: int  # the trunk features' grid side (h for SAM; S/32 for SAM 2, see its module)
    trunk_dim: int  # C
    decoder_dim: int  # C'
    num_blocks: int  # encoder blocks the trunk/tail split cuts
    mask_threshold: float = 0.0

    @property
    def detector(self) -> bool:
        """A detector family (SAM 3): `text_features` + `detect_rows` instead of prompts + `decode_rows`."""
        return FAMILIES[self.variant.family].detector

    @property
    def lowres_size(self) -> int:
        """L: the decoder's low-res mask side."""
        return 4 * self.embedding_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def freeze(self) -> Backbone:
        self.model.eval()
        self.model.requires_grad_(False)
        return self

    # --- weights ---------------------------------------------------------------------------------
    def load_base_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"checkpoint {source} does not match the {self.variant.name} architecture: {e}") from e

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The base weights as the family's checkpoints name them (LoRA wrappers looked through)."""
        return {k.replace(".base_layer.", "."): v for k, v in self.model.state_dict().items()}

    def trunk_digest(self, tail_blocks: int) -> str:
        """Digest of exactly the weights that produce `embed_trunk`'s output for this split (the
        whole encoder when k = 0), plus the split itself: names an embedding cache."""
        tag, state = self.trunk_state(tail_blocks)
        h = hashlib.sha256(tag.encode())
        for name, tensor in sorted(state.items()):
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    # --- frames ----------------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """HWC uint8 RGB -> (3, S, S) normalised model input on the model's device, and the resized (h, w)."""
        resized = self.resize(image)
        return self.normalize(resized)[0], (int(resized.shape[0]), int(resized.shape[1]))

    def lowres_target(self, mask: np.ndarray, input_size: tuple[int, int]) -> torch.Tensor:
        """(H, W) bool in the original frame -> (L, L) float area shares in the decoder's low-res frame."""
        t = self.to_model_frame(torch.from_numpy(mask.astype(np.float32))[None, None], input_size)  # (1, 1, S, S)
        return F.interpolate(t, size=(self.lowres_size, self.lowres_size), mode="area")[0, 0]

    # --- what each family implements -------------------------------------------------------------
    def resize(self, image: np.ndarray) -> np.ndarray:
        """HWC uint8 -> the resized image (the labelling job's CPU stage)."""
        raise NotImplementedError

    def normalize(self, resized: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A resized HWC image -> (1, 3, S, S) normalised input on the model's device."""
        raise NotImplementedError

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(N, 2) x, y in the original frame -> the input frame."""
        raise NotImplementedError

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(N, 4) x0, y0, x1, y1 in the original frame -> the input frame."""
        raise NotImplementedError

    def to_model_frame(self, masks: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
        """(N, 1, H, W) float masks in the original frame -> (N, 1, S, S), as images are placed."""
        raise NotImplementedError

    def embed_trunk(self, images: torch.Tensor, tail_blocks: int) -> torch.Tensor:
        """(B, 3, S, S) -> trunk features (B, h, w, C): everything before the last `tail_blocks` blocks."""
        raise NotImplementedError

    def embed_tail(self, trunk_features: torch.Tensor, tail_blocks: int) -> torch.Tensor:
        """(P, h, w, C) trunk features -> (P, C', h, w) image embeddings: the last blocks + neck."""
        raise NotImplementedError

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> the image embeddings as the family's own code computes them, in the form
        `embed_tail` returns: what trunk + tail must equal at every split (the registry's tests)."""
        raise NotImplementedError

    def encode_prompts(self, point_coords: torch.Tensor | None, point_labels: torch.Tensor | None,
                       boxes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts in the input frame -> (sparse (P or 1, n', C'), dense (1 or P, C', h, w)) embeddings."""
        raise NotImplementedError

    def decode_rows(self, image_embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor,
                    rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mask decoder with one image embedding per row: (P, C', h, w) -> low-res logits
        (P, 1+M, L, L), IoU predictions (P, 1+M) and the IoU token (P, C'); column 0 is the
        single-mask output, the rest the multimask outputs. With `rows` (n indices into the P
        embeddings) there are n decoder rows, row i on image_embeddings[rows[i]]."""
        raise NotImplementedError

    def text_features(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """A detector's own (frozen) text encoder on n prompts (its concept path), cached per prompt:
        the features `detect_rows` takes."""
        raise NotImplementedError(f"{self.variant.name} is no detector: it decodes point, box or semantic rows")

    def detect_rows(self, image_embeddings: torch.Tensor, text: dict[str, torch.Tensor],
                    rows: torch.Tensor | None = None):
        """A detector on (P, C', h, w) image embeddings and n prompts' text -> its instances per row
        (masks (n, Q, L, L), scores, boxes, presence, a semantic mask; see the family's Detections)."""
        raise NotImplementedError(f"{self.variant.name} is no detector: it decodes point, box or semantic rows")

    def matcher(self):
        """A detector's query-to-instance matching for training (see the family's)."""
        raise NotImplementedError(f"{self.variant.name} is no detector")

    def postprocess_masks(self, masks: torch.Tensor, input_size: tuple[int, int],
                          original_size: tuple[int, int]) -> torch.Tensor:
        """(N, M, L, L) low-res logits -> (N, M, H, W) logits in the original frame."""
        raise NotImplementedError

    def frozen_in_pretraining(self) -> list[nn.Module]:
        """Modules pretraining leaves as they are (a detector's text encoder, whose features are
        cached per prompt); none on the decoder families."""
        return []

    def high_res_skips(self) -> list[nn.Module]:
        """The decoder's skip connections from early trunk stages past the tail (none on SAM 1)."""
        return []

    def reference_predictor(self):
        """The family's own interactive predictor on this base with LoRA inactive (`set_image(image)`,
        then `predict(point_coords=, point_labels=, multimask_output=)`): the speed suite's reference."""
        raise NotImplementedError

    def automatic_mask_generator(self, **options):
        """The family's own automatic mask generator on this base with LoRA inactive (`generate(image)`
        -> a list of {segmentation, bbox, area, predicted_iou, ...}). `options` are the keyword
        arguments the families share: points_per_side, points_per_batch, pred_iou_thresh,
        stability_score_thresh, stability_score_offset, box_nms_thresh, output_mode."""
        raise NotImplementedError

    def fast_reference_predictor(self):
        """(predictor, None) with the family's fastest published predictor for this variant (random
        weights, its own precision and compilation; the same `set_image` / `predict` calls), or
        (None, why there is none here): the speed suite's `reference_fast`."""
        return None, f"the {self.variant.family} family has no fast reference predictor"

    # Where a family's adaptable Linears live, as module-path regexes (group 1: the block or layer
    # index, or the path kept as the module type; group 2: the path inside the block or layer).
    ENCODER_BLOCK: re.Pattern
    DECODER_LAYER: re.Pattern
    DECODER_FINAL: re.Pattern
    OUTPUT_MLP: re.Pattern
    IOU_HEAD: re.Pattern

    def num_decoder_layers(self) -> int:
        """The mask decoder's two-way transformer layers."""
        raise NotImplementedError

    def first_tail_block(self, tail_blocks: int) -> int:
        """The index of the first encoder block of a tail of `tail_blocks` blocks."""
        return self.num_blocks - tail_blocks

    @staticmethod
    def pattern_name(path: str) -> str:
        """The name `LoraConfig.target_patterns` calls a Linear at `path` (inside its block): its last part."""
        return path.rsplit(".", 1)[-1]

    def find_targets(self, lora: LoraConfig, tail_blocks: int) -> list[LoraTarget]:
        """Every Linear that `lora` adapts (the last `tail_blocks` encoder blocks and the decoder), in
        module order, each with its (depth, module type) identity for the hypernet: tail blocks
        first, then the decoder's layers, its final attention, then its heads."""
        first = self.first_tail_block(tail_blocks)
        num_layers = self.num_decoder_layers()
        heads_depth = tail_blocks + num_layers + 1  # after the decoder's final attention
        patterns = set(lora.target_patterns)
        targets = []
        for name, module in self.model.named_modules():
            linear = module.base_layer if isinstance(module, LoraLinear) else module
            if not isinstance(linear, nn.Linear) or name.endswith(".base_layer"):
                continue
            found: tuple[str, int, str] | None = None
            if m := self.ENCODER_BLOCK.match(name):
                if lora.image_encoder and int(m[1]) >= first and self.pattern_name(m[2]) in patterns:
                    found = ("image_encoder", int(m[1]) - first, "encoder." + m[2])
            elif m := self.DECODER_LAYER.match(name):
                if lora.mask_decoder and self.pattern_name(m[2]) in patterns:
                    found = ("mask_decoder", tail_blocks + int(m[1]), "decoder." + m[2])
            elif m := self.DECODER_FINAL.match(name):
                if lora.mask_decoder and self.pattern_name(m[1]) in patterns:
                    found = ("mask_decoder", tail_blocks + num_layers, "decoder." + m[1])
            elif m := self.OUTPUT_MLP.match(name):
                if lora.output_mlps:
                    found = ("output_mlps", heads_depth, "decoder." + m[1])
            elif m := self.IOU_HEAD.match(name):
                if lora.iou_head:
                    found = ("iou_head", heads_depth, "decoder." + m[1])
            if found:
                component, depth, module_type = found
                targets.append(LoraTarget(name, linear.in_features, linear.out_features, component, depth, module_type))
        return targets

    def trunk_state(self, tail_blocks: int) -> tuple[str, dict[str, torch.Tensor]]:
        """(a tag naming the split, the base weights `embed_trunk`'s output depends on for it)."""
        raise NotImplementedError


class SquareFrame:
    """The "square" frame (SAM 2.1, SAM 3): every image stretched to S x S (the aspect is not kept),
    normalised with the family's MEAN / STD; points and boxes scale by (S / W, S / H); masks go
    bilinearly straight back to (H, W). Mixed into a family's Backbone ahead of `Backbone`."""

    MEAN: tuple[float, float, float]
    STD: tuple[float, float, float]

    def resize(self, image: np.ndarray) -> np.ndarray:
        return resize_square(image, self.image_size)

    def normalize(self, resized: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1)[None].float() / 255.0  # (1, 3, S, S)
        mean = torch.tensor(self.MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.STD, device=self.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        h, w = original_size
        return np.asarray(coords, dtype=np.float64) * np.array([self.image_size / w, self.image_size / h])

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        return self.apply_coords(np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def to_model_frame(self, masks: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(masks, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)

    def postprocess_masks(self, masks: torch.Tensor, input_size: tuple[int, int],
                          original_size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(masks, size=original_size, mode="bilinear", align_corners=False)
