"""TaskAwareSam: a frozen SAM whose encoder tail and mask decoder are adapted per prompt.

Shapes: B = images, P = rows ((image, prompt) pairs in the tail, prompt rows in the decoder),
C = channels, h x w = the image-embedding grid (64 x 64 for 1024-px SAM, 16 x 16 for the 256-px CPU presets),
M = masks per row (3 with multimask output, else 1), n = point prompts per row.

Where the time goes: `embed_trunk` (everything in the encoder before its last k blocks) runs once
per image and is shared by every prompt; `embed_tail` (last k blocks + neck) and `decode` run per
prompt with that prompt's adapter (docs/design.md says why the tail is adapted at all). The SAM
family's internals stay behind `talora.backbones`. Nothing here is wrapped in no_grad: the same
code serves training and inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from talora.backbones.base import Backbone
from talora.config import ModelConfig
from talora.adapters.hypernet import TaskAwareHyperNet
from talora.core.lora import Adapter, LoraTarget, inject_lora, use_adapter
from talora.core.text import TextEncoder, validate_prompts


@dataclass
class DecoderOutput:
    masks: torch.Tensor  # (P, M, 4h, 4w) low-res mask logits
    iou_predictions: torch.Tensor  # (P, M)
    presence_logits: torch.Tensor  # (P,) "is the task in this image at all"


class TaskAwareSam(nn.Module):
    def __init__(
        self,
        backbone: Backbone,
        targets: list[LoraTarget],
        hypernet: TaskAwareHyperNet,
        presence_head: nn.Module,
        config: ModelConfig,
        text_encoder: TextEncoder | None = None,
        fixed_adapter: Adapter | None = None,
    ) -> None:
        """
        Arguments:
          backbone: the base SAM (talora.backbones); frozen here and wrapped with LoRA layers at `targets`.
          hypernet: text embedding -> per-row Adapter over `targets`.
          presence_head: decoder IoU-token output (P x C) -> presence logit (P x 1).
          config: the resolved config these parts were built from (k = config.tail_blocks image-
            encoder blocks run per prompt; 0 = decoder-only adapters). Saved with the hypernet.
          text_encoder: prompts -> embeddings; needed by `adapters`, not by the tensor paths.
          fixed_adapter: a static LoRA used for every prompt instead of the hypernet's (--adapter).
        """
        super().__init__()
        backbone.freeze()
        self.backbone = backbone  # a plain object: its model is registered once, as `sam`
        self.sam = backbone.model  # a submodule: .to() moves it, state dicts name it "sam."
        self.targets = list(targets)
        inject_lora(self.sam, self.targets, config.lora.dropout)
        self.hypernet = hypernet
        self.presence_head = presence_head
        self.config = config
        self.tail_blocks = config.tail_blocks
        self.text_encoder = text_encoder
        self.fixed_adapter = fixed_adapter
        self._adapter_cache: dict[str, Adapter] = {}

    # --- modes and bookkeeping ------------------------------------------------------------------

    def forget_adapters(self) -> None:
        """Drops the adapters cached per prompt (the next `adapters` call runs the text encoder and
        the hypernet again)."""
        self._adapter_cache.clear()

    def keep_adapter(self, prompt: str, adapter: Adapter) -> None:
        """Uses `adapter` (one prompt's, e.g. read from an adapter cache) for `prompt` from now on,
        instead of generating it; moved to the hypernet's device and dtype."""
        param = next(self.hypernet.parameters())
        self._adapter_cache[prompt] = adapter.to(param.device, param.dtype)

    def train(self, mode: bool = True) -> TaskAwareSam:
        """Trains the hypernet and presence head only; the frozen SAM stays in eval mode."""
        super().train(mode)
        self.backbone.freeze()
        self.forget_adapters()  # hypernet weights are about to change
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
        param = next(self.hypernet.parameters())
        if not cacheable:
            return self.hypernet(self.text_encoder.encode(prompts).to(param.device, param.dtype))
        for p in prompts:
            if p not in self._adapter_cache:
                # One prompt at a time: a prompt's adapter must not depend on the prompts it was made
                # with (the text encoder pads a batch to its longest prompt), so a job's actors, an
                # adapter cache and an in-process predictor all label with the same numbers.
                self._adapter_cache[p] = self.hypernet(self.text_encoder.encode([p]).to(param.device, param.dtype)).row(0)
        return Adapter.stack([self._adapter_cache[p] for p in prompts])

    # --- images -> embeddings ---------------------------------------------------------------------

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """HWC uint8 RGB -> (3, S, S) normalised model input and the resized (h, w)."""
        return self.backbone.preprocess(image)

    def embed_trunk(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S preprocessed images -> B x h x w x C trunk features (shared by all prompts)."""
        return self.backbone.embed_trunk(images, self.tail_blocks)

    def embed_tail(self, trunk_features: torch.Tensor, adapter: Adapter | None = None) -> torch.Tensor:
        """P x h x w x C trunk features (one row per (image, prompt)) -> P x C' x h x w image embeddings.

        `adapter` is per row (P rows) or shared; None runs the base tail.
        """
        with use_adapter(self.sam, adapter):
            return self.backbone.embed_tail(trunk_features, self.tail_blocks)

    # --- embeddings (+ prompts) -> masks ----------------------------------------------------------

    def decode(
        self,
        image_embeddings: torch.Tensor,
        adapter: Adapter | None = None,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        multimask_output: bool = True,
        rows: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """
        Arguments:
          image_embeddings: P x C x h x w, one row per decoder row (expand() one image's for free).
          adapter: per row (P rows), shared, or None for the base decoder.
          point_coords: P x n x 2 in the model's input frame (S x S pixels), or None.
          point_labels: P x n (1 foreground, 0 background), or None.
          boxes: P x 4 (x0, y0, x1, y1) in the input frame, or None. With no points and no
            boxes the row is a semantic query: "where is the task".
          rows: None, or n indices into the P embeddings and adapter rows: decoder row i decodes
            image_embeddings[rows[i]] with adapter row rows[i] (the prompts then have n rows). Many
            point prompts of a few image embeddings, without a copy of an embedding per row.

        Returns:
          DecoderOutput with low-res mask logits (P x M x 4h x 4w), IoU predictions (P x M) and
          presence logits (P).
        """
        sparse, dense = self.backbone.encode_prompts(point_coords, point_labels, boxes)
        if rows is not None and adapter is not None and adapter.num_rows is not None:
            sorted_rows = len(rows) < 2 or bool((rows[1:] >= rows[:-1]).all())
            adapter = adapter.grouped(rows) if sorted_rows and not self.training else adapter.select(rows)
        with use_adapter(self.sam, adapter):
            masks, iou_pred, iou_token = self.backbone.decode_rows(image_embeddings, sparse, dense, rows)
        presence = self.presence_head(iou_token).squeeze(-1)  # (P,)
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return DecoderOutput(masks[:, chosen], iou_pred[:, chosen], presence)

    def detect(self, image_embeddings: torch.Tensor, adapter: Adapter | None, prompts: list[str],
               rows: torch.Tensor | None = None):
        """A detector family (SAM 3): row i of the n = len(prompts) rows finds every instance of
        prompts[i] in image_embeddings[rows[i]] (rows None: in embedding i), under adapter row i.
        The prompt goes in twice: as the detector's own text prompt and as the adapter.

        Arguments:
          image_embeddings: P x C' x h x w.
          adapter: per row (n rows), shared, or None for the base detector.
        Returns the family's Detections (masks n x Q x 4h x 4w, scores, boxes, presence, semantic)."""
        text = self.backbone.text_features(prompts)
        with use_adapter(self.sam, adapter):
            return self.backbone.detect_rows(image_embeddings, text, rows)

    def semantic_rows(self, image_embeddings: torch.Tensor, adapter: Adapter | None,
                      prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt-free "where is the task" row per embedding, whatever the family: (low-res
        mask logits (P, 1, 4h, 4w), presence logits (P,)). A decoder answers with its single-mask
        output and the presence head; a detector with its semantic mask and its presence token,
        reading `prompts` (one per row) as its own text prompt."""
        if self.backbone.detector:
            found = self.detect(image_embeddings, adapter, prompts)
            return found.semantic[:, None], found.presence_logits
        out = self.decode(image_embeddings, adapter, multimask_output=False)
        return out.masks, out.presence_logits

    # --- trainable weights -------------------------------------------------------------------------

    def load_hypernet_weights(self, state: dict[str, torch.Tensor], uri: str) -> None:
        try:
            self.trainable_modules().load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"hypernet {uri} does not fit this model: {e}") from e
        self.forget_adapters()


class MLP(nn.Module):
    """Linear layers with ReLU between them (the shape of SAM's decoder heads)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def build_presence_head(decoder_dim: int) -> nn.Module:
    return MLP(decoder_dim, decoder_dim, 1, num_layers=2)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
