"""TaskAwareSam: a frozen SAM whose encoder tail and mask decoder are adapted per prompt.

Shapes: B = images, P = rows ((image, prompt) pairs in the tail, prompt rows in the decoder),
C = channels, h x w = the image-embedding grid (64 x 64 for 1024-px SAM, 16 x 16 for vit_tiny),
M = masks per row (3 with multimask output, else 1), n = point prompts per row.

Where the time goes (DESIGN §1): `embed_trunk` (all encoder blocks but the last k) runs once per
image and is shared by every prompt; `embed_tail` (last k blocks + neck) and `decode` run per
prompt with that prompt's adapter. Nothing here is wrapped in no_grad: SAM's own `Sam.forward`
and `SamPredictor` are, so `decode` calls the prompt encoder and mask decoder's parts directly and
the same code serves training and inference.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.mask_decoder import MLP
from torch import nn

from talora.config import ModelConfig, dump_config, load_config
from talora.hypernet import TaskAwareHyperNet
from talora.lora import Adapter, LoraTarget, find_targets, inject_lora, use_adapter
from talora.sam import build_sam, count_parameters, embed_tail, embed_trunk, predict_masks_per_row, preprocess_image
from talora.storage import StorageOptions
from talora.text import TextEncoder, validate_prompts
from talora.weights import read_weights, write_weights

HYPERNET_FORMAT = "talora.hypernet/1"


# The shipped demo models (make demo-models): the pretrained vit_tiny base and a hypernet trained on it.
DEMO_SAM_CHECKPOINT = "demo://sam_vit_tiny.safetensors"
DEMO_HYPERNET = "demo://hypernet.safetensors"

@dataclass
class DecoderOutput:
    masks: torch.Tensor  # (P, M, 4h, 4w) low-res mask logits
    iou_predictions: torch.Tensor  # (P, M)
    presence_logits: torch.Tensor  # (P,) "is the task in this image at all"


class TaskAwareSam(nn.Module):
    def __init__(
        self,
        sam: Sam,
        targets: list[LoraTarget],
        hypernet: TaskAwareHyperNet,
        presence_head: nn.Module,
        config: ModelConfig,
        text_encoder: TextEncoder | None = None,
    ) -> None:
        """
        Arguments:
          sam: the base SAM; frozen here and wrapped with LoRA layers at `targets`.
          hypernet: text embedding -> per-row Adapter over `targets`.
          presence_head: decoder IoU-token output (P x C) -> presence logit (P x 1).
          config: the resolved config these parts were built from (k = config.tail_blocks image-
            encoder blocks run per prompt; 0 = decoder-only adapters). Saved with the hypernet.
          text_encoder: prompts -> embeddings; needed by `adapters`, not by the tensor paths.
        """
        super().__init__()
        sam.requires_grad_(False)
        sam.eval()
        self.sam = sam
        self.targets = list(targets)
        inject_lora(self.sam, self.targets, config.lora.dropout)
        self.hypernet = hypernet
        self.presence_head = presence_head
        self.config = config
        self.tail_blocks = config.tail_blocks
        self.text_encoder = text_encoder
        self._adapter_cache: dict[str, Adapter] = {}
        self.fixed_adapter: Adapter | None = None  # a static LoRA used for every prompt (--adapter)

    # --- modes and bookkeeping ------------------------------------------------------------------

    def train(self, mode: bool = True) -> TaskAwareSam:
        """Trains the hypernet and presence head only; the frozen SAM stays in eval mode."""
        super().train(mode)
        self.sam.eval()
        self._adapter_cache.clear()  # hypernet weights are about to change
        return self

    def trainable_modules(self) -> nn.ModuleDict:
        """What training updates and checkpoints hold (DDP wraps this, never the frozen SAM)."""
        return nn.ModuleDict({"hypernet": self.hypernet, "presence_head": self.presence_head})

    def parameter_counts(self) -> dict[str, int]:
        trainable, total = count_parameters(self)
        adapter = sum(self.hypernet.rank * (t.in_features + t.out_features) for t in self.targets)
        return {"trainable_params": trainable, "total_params": total, "sam_params": count_parameters(self.sam)[1],
                "adapter_params_per_prompt": adapter}

    # --- text -> adapter ------------------------------------------------------------------------

    def adapters(self, prompts: list[str]) -> Adapter:
        """One adapter row per prompt (P rows). Cached by prompt when not training and no grad."""
        prompts = validate_prompts(prompts)
        if self.fixed_adapter is not None:
            return self.fixed_adapter.expand(len(prompts))
        if self.text_encoder is None:
            raise RuntimeError("TaskAwareSam was built without a text encoder; pass text_encoder=")
        cacheable = not self.training and not torch.is_grad_enabled()
        if cacheable and all(p in self._adapter_cache for p in prompts):
            return Adapter.stack([self._adapter_cache[p] for p in prompts])
        param = next(self.hypernet.parameters())
        adapter = self.hypernet(self.text_encoder.encode(prompts).to(param.device, param.dtype))
        if cacheable:
            for i, p in enumerate(prompts):
                self._adapter_cache[p] = adapter.row(i)
        return adapter

    # --- images -> embeddings ---------------------------------------------------------------------

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """HWC uint8 RGB -> (3, S, S) normalised, padded input and the resized (h, w)."""
        return preprocess_image(self.sam, image)

    def embed_trunk(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S preprocessed images -> B x h x w x C trunk features (shared by all prompts)."""
        return embed_trunk(self.sam.image_encoder, images, self.tail_blocks)

    def embed_tail(self, trunk_features: torch.Tensor, adapter: Adapter | None = None) -> torch.Tensor:
        """P x h x w x C trunk features (one row per (image, prompt)) -> P x C' x h x w image embeddings.

        `adapter` is per row (P rows) or shared; None runs the base tail.
        """
        with use_adapter(self.sam, adapter):
            return embed_tail(self.sam.image_encoder, trunk_features, self.tail_blocks)

    # --- embeddings (+ prompts) -> masks ----------------------------------------------------------

    def decode(
        self,
        image_embeddings: torch.Tensor,
        adapter: Adapter | None = None,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> DecoderOutput:
        """
        Arguments:
          image_embeddings: P x C x h x w, one row per decoder row (expand() one image's for free).
          adapter: per row (P rows), shared, or None for the base decoder.
          point_coords: P x n x 2 in the model's input frame (S x S pixels), or None.
          point_labels: P x n (1 foreground, 0 background), or None.
          boxes: P x 4 (x0, y0, x1, y1) in the input frame, or None. With no points and no
            boxes the row is a semantic query: "where is the task".

        Returns:
          DecoderOutput with low-res mask logits (P x M x 4h x 4w), IoU predictions (P x M) and
          presence logits (P).
        """
        P = image_embeddings.shape[0]
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=None)
        sparse = sparse.expand(P, -1, -1)  # (P, n', C); batch 1 when the row has no prompt
        dense = dense.expand(P, -1, -1, -1)  # (P, C, h, w)
        with use_adapter(self.sam, adapter):
            masks, iou_pred, iou_token = predict_masks_per_row(self.sam, image_embeddings, sparse, dense)
        presence = self.presence_head(iou_token).squeeze(-1)  # (P,)
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return DecoderOutput(masks[:, chosen], iou_pred[:, chosen], presence)

    # --- trainable weights file -------------------------------------------------------------------

    def save_hypernet(self, uri: str, storage: StorageOptions | None = None) -> None:
        """Hypernet + presence head as safetensors; the header carries the resolved config and targets."""
        metadata = {
            "format": HYPERNET_FORMAT,
            "config": dump_config(self.config),
            "targets": json.dumps([t.name for t in self.targets]),
            "digest": self.hypernet.digest(),
        }
        write_weights(uri, self.trainable_modules().state_dict(), metadata, storage)

    def load_hypernet_weights(self, state: dict[str, torch.Tensor], uri: str) -> None:
        try:
            self.trainable_modules().load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"hypernet {uri} does not fit this model: {e}") from e
        self._adapter_cache.clear()


def build_presence_head(transformer_dim: int) -> nn.Module:
    return MLP(transformer_dim, transformer_dim, 1, num_layers=2)


def build_task_aware_sam(
    config: ModelConfig,
    text_encoder: TextEncoder | None = None,
    storage: StorageOptions | None = None,
) -> TaskAwareSam:
    """SAM (from config.sam) + LoRA targets + an untrained hypernet (bias-HyperInit) + presence head."""
    sam = build_sam(config.sam.sam_type, config.sam.checkpoint, storage)
    targets = find_targets(sam, config.lora, config.tail_blocks)
    hypernet = TaskAwareHyperNet(targets, config.hypernet, config.lora.rank, config.lora.scale)
    presence = build_presence_head(sam.mask_decoder.transformer_dim)
    return TaskAwareSam(sam, targets, hypernet, presence, config, text_encoder)


def read_hypernet_file(uri: str, storage: StorageOptions | None = None) -> tuple[ModelConfig, dict, dict[str, torch.Tensor]]:
    """(resolved config, header, weights) of a hypernet file; a non-talora file is a clear error."""
    state, header = read_weights(uri, storage)
    if header.get("format") != HYPERNET_FORMAT:
        raise ValueError(f"{uri} is not a talora hypernet file (format {header.get('format')!r}, expected {HYPERNET_FORMAT!r})")
    return load_config(header["config"]), header, state


def load_task_aware_sam(
    hypernet_uri: str,
    sam_checkpoint: str | None = None,
    text_encoder: TextEncoder | None = None,
    storage: StorageOptions | None = None,
) -> TaskAwareSam:
    """The model a hypernet file was trained for, with its weights; `sam_checkpoint` overrides the base's URI."""
    config, header, state = read_hypernet_file(hypernet_uri, storage)
    if sam_checkpoint is not None:
        config = dataclasses.replace(config, sam=dataclasses.replace(config.sam, checkpoint=sam_checkpoint))
    model = build_task_aware_sam(config, text_encoder, storage)
    expected = json.loads(header["targets"])
    if expected != [t.name for t in model.targets]:
        raise ValueError(f"hypernet {hypernet_uri} was trained for other LoRA targets than this {config.sam.sam_type} model finds")
    model.load_hypernet_weights(state, hypernet_uri)
    return model
