"""SAM 1 (segment_anything): ``vit_h``/``vit_l``/``vit_b`` from its own registry, and ``vit_tiny``.

``vit_tiny`` is a ~1.2 M parameter preset assembled from the same modeling classes
(ImageEncoderViT, PromptEncoder, MaskDecoder, TwoWayTransformer) for CPU tests and the offline
demo. Every variant shares the decoder code, so LoRA and the hypernet never care which encoder runs.

The split: the trunk is the patch embedding + positional embedding + every ViT block but the last
k; the tail is the last k blocks + the neck (k = 0: the trunk is the whole encoder, the tail empty).
Images are resized so the long side is S (`ResizeLongestSide`), normalised and padded bottom/right.
"""

from __future__ import annotations

import re
from functools import partial

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide
from torch.nn import functional as F

from talora.backbones import base
from talora.backbones.sam1_fused import fuse_attention
from talora.backbones.frames import longest_side_shape, resize_longest_side

# (patch-embedding width, encoder depth) -> variant: enough to tell the variants apart from a state dict.
_ENCODER_SHAPES = {"vit_h": (1280, 32), "vit_l": (1024, 24), "vit_b": (768, 12), "vit_tiny": (128, 4)}

# A target's (depth, module type) is its identity for the hypernet.
_ENCODER_BLOCK = re.compile(r"^image_encoder\.blocks\.(\d+)\.(.+)$")
_DECODER_LAYER = re.compile(r"^mask_decoder\.transformer\.layers\.(\d+)\.(.+)$")
_DECODER_FINAL = re.compile(r"^mask_decoder\.transformer\.(final_attn_token_to_image\..+)$")
_OUTPUT_MLP = re.compile(r"^mask_decoder\.(output_hypernetworks_mlps\.\d+\.layers\.\d+)$")
_IOU_HEAD = re.compile(r"^mask_decoder\.(iou_prediction_head\.layers\.\d+)$")


def build_model(sam_type: str) -> Sam:
    """A randomly initialised SAM 1 of `sam_type`."""
    return build_sam_vit_tiny() if sam_type == "vit_tiny" else sam_model_registry[sam_type](checkpoint=None)


def build_sam_vit_tiny() -> Sam:
    """A 256-px SAM with a 4-block, 128-d encoder and a 64-d decoder (~1.2 M parameters)."""
    return _build_sam_tiny(
        image_size=256,
        patch_size=16,
        encoder_embed_dim=128,
        encoder_depth=4,
        encoder_num_heads=4,
        encoder_global_attn_indexes=(1, 3),
        prompt_embed_dim=64,
        decoder_mlp_dim=256,
        decoder_num_heads=4,
    )


def _build_sam_tiny(
    image_size: int,
    patch_size: int,
    encoder_embed_dim: int,
    encoder_depth: int,
    encoder_num_heads: int,
    encoder_global_attn_indexes: tuple[int, ...],
    prompt_embed_dim: int,
    decoder_mlp_dim: int,
    decoder_num_heads: int,
    window_size: int = 0,
) -> Sam:
    image_embedding_size = image_size // patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=encoder_embed_dim,
            depth=encoder_depth,
            num_heads=encoder_num_heads,
            mlp_ratio=4,
            out_chans=prompt_embed_dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            global_attn_indexes=encoder_global_attn_indexes,
            window_size=window_size,  # 0 = every block global: 16x16 tokens are cheap
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(image_embedding_size, image_embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=prompt_embed_dim,
                mlp_dim=decoder_mlp_dim,
                num_heads=decoder_num_heads,
            ),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=prompt_embed_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def detect_variant(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The SAM 1 variant whose encoder shape matches `state_dict`, or None."""
    patch = state_dict.get("image_encoder.patch_embed.proj.weight")
    if patch is None:
        return None
    depth = 1 + max((int(k.split(".")[2]) for k in state_dict if k.startswith("image_encoder.blocks.")), default=-1)
    shape = (patch.shape[0], depth)
    return next((name for name, s in _ENCODER_SHAPES.items() if s == shape), None)


class _FrameTransform(ResizeLongestSide):
    """segment_anything's coordinate and box mapping into the resized frame, on the frame
    `resize` makes: a very thin image keeps a short side of at least one pixel."""

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        return longest_side_shape(oldh, oldw, long_side_length)


class _ReferencePredictor(SamPredictor):
    """SamPredictor, whose `predict` also works under bf16/fp16 autocast: segment_anything 1.0 turns
    the decoder's scores and low-res logits to numpy as they come (numpy has no bfloat16)."""

    def predict_torch(self, *args, **kwargs):
        masks, iou_predictions, low_res_masks = super().predict_torch(*args, **kwargs)
        return masks, iou_predictions.float(), low_res_masks.float()


class Backbone(base.Backbone):
    model: Sam

    def __init__(self, variant, model: Sam) -> None:
        super().__init__(variant, fuse_attention(model))
        encoder = model.image_encoder
        self.image_size = encoder.img_size
        self.embedding_size = model.prompt_encoder.image_embedding_size[0]
        self.trunk_size = self.embedding_size
        self.trunk_dim = encoder.patch_embed.proj.out_channels
        self.decoder_dim = model.mask_decoder.transformer_dim
        self.num_blocks = len(encoder.blocks)
        self.mask_threshold = model.mask_threshold
        self.transform = _FrameTransform(self.image_size)  # coordinates and boxes

    # --- frames ----------------------------------------------------------------------------------
    def resize(self, image: np.ndarray) -> np.ndarray:
        return resize_longest_side(image, self.image_size)

    def normalize(self, resized: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None].float()  # (1, 3, h', w')
        return self.model.preprocess(x)  # normalise + pad to (1, 3, S, S)

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        return self.transform.apply_coords(coords, original_size)

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        return self.transform.apply_boxes(boxes, original_size)

    def to_model_frame(self, masks: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
        masks = F.interpolate(masks, size=input_size, mode="bilinear", align_corners=False)  # the resized frame
        return F.pad(masks, (0, self.image_size - input_size[1], 0, self.image_size - input_size[0]))  # pad bottom/right

    def postprocess_masks(self, masks: torch.Tensor, input_size: tuple[int, int],
                          original_size: tuple[int, int]) -> torch.Tensor:
        return self.model.postprocess_masks(masks, input_size, original_size)

    # --- the encoder split -----------------------------------------------------------------------
    def embed_trunk(self, images: torch.Tensor, tail_blocks: int) -> torch.Tensor:
        encoder: ImageEncoderViT = self.model.image_encoder
        x = encoder.patch_embed(images)  # (B, h, w, C)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        for block in encoder.blocks[: self.num_blocks - tail_blocks]:
            x = block(x)
        return x

    def embed_tail(self, trunk_features: torch.Tensor, tail_blocks: int) -> torch.Tensor:
        encoder: ImageEncoderViT = self.model.image_encoder
        x = trunk_features
        for block in encoder.blocks[self.num_blocks - tail_blocks :]:
            x = block(x)
        return encoder.neck(x.permute(0, 3, 1, 2))  # (P, C', h, w)

    def trunk_state(self, tail_blocks: int) -> tuple[str, dict[str, torch.Tensor]]:
        trunk_blocks = self.num_blocks - tail_blocks
        state = {}
        for name, tensor in self.model.image_encoder.state_dict().items():
            name = name.replace(".base_layer.", ".")
            parts = name.split(".")
            if parts[0] == "blocks" and int(parts[1]) >= trunk_blocks:
                continue
            if parts[0] == "neck" and tail_blocks > 0:
                continue
            state[name] = tensor
        return f"blocks<{trunk_blocks};tail={tail_blocks};img={self.image_size}", state

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.image_encoder(images)

    # --- the decoder, one image embedding per row ------------------------------------------------
    def encode_prompts(self, point_coords, point_labels, boxes):
        points = (point_coords, point_labels) if point_coords is not None else None
        return self.model.prompt_encoder(points=points, boxes=boxes, masks=None)

    def decode_rows(self, image_embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor,
                    rows: torch.Tensor | None = None):
        """MaskDecoder.predict_masks with one image embedding per row instead of one per call.

        SAM repeat-interleaves a single image embedding over the prompt rows; with an adapted tail
        (or a batch of images in pretraining) every row has its own embedding, so this takes P of
        them, or, with `rows`, n rows each naming its embedding. It reuses the decoder's own modules
        and is tested equal to MaskDecoder.forward row by row."""
        decoder = self.model.mask_decoder
        if rows is None:
            src = image_embeddings + dense  # (P, C, h, w)
        elif dense.shape[0] == 1:  # one add per embedding, then the row's copy the transformer updates
            src = (image_embeddings + dense)[rows]  # (n, C, h, w)
        else:
            src = image_embeddings[rows] + dense
        P, C, h, w = src.shape
        sparse = sparse.expand(P, -1, -1)  # (P, n', C); batch 1 when the row has no prompt
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)  # (1+M, C)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(P, -1, -1), sparse], dim=1)  # (P, 1+M+n', C)
        pos_src = self.model.prompt_encoder.get_dense_pe().expand(P, -1, -1, -1)  # (P, C, h, w)

        hs, src = decoder.transformer(src, pos_src, tokens)  # (P, 1+M+n', C), (P, h*w, C)
        iou_token_out = hs[:, 0, :]  # (P, C)
        mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]  # (P, M, C)

        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(P, C, h, w))  # (P, C/8, 4h, 4w)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
        )  # (P, M, C/8)
        _, c8, H, W = upscaled.shape
        masks = (hyper_in @ upscaled.view(P, c8, H * W)).view(P, -1, H, W)  # (P, M, 4h, 4w)
        iou_pred = decoder.iou_prediction_head(iou_token_out)  # (P, M)
        return masks, iou_pred, iou_token_out

    def reference_predictor(self):
        return _ReferencePredictor(self.model)  # LoRA layers with no adapter set run the base weights

    def automatic_mask_generator(self, **options):
        return SamAutomaticMaskGenerator(self.model, **options)

    def fast_reference_predictor(self):
        """pytorch-labs' segment-anything-fast: its `sam_model_fast_registry` builds the variant in
        bf16 with its Triton attention kernel and torch.compile; its `SamPredictor` is a drop-in one."""
        try:  # optional: pytorch-labs' package is not on PyPI
            from segment_anything_fast import SamPredictor as FastPredictor
            from segment_anything_fast import sam_model_fast_registry
        except ImportError:
            return None, ("pytorch-labs' segment-anything-fast is not importable: the PyPI project of that name is "
                          "another model (FastSAM) and pytorch-labs' package is not on PyPI; add a wheel built from "
                          "its repository to .gpu-carry/wheels/ and to manifest.json's wheels")
        if self.variant.name not in sam_model_fast_registry:
            return None, f"segment-anything-fast has no {self.variant.name}"
        return FastPredictor(sam_model_fast_registry[self.variant.name]().to(self.device)), None

    # --- LoRA targets (found by base.Backbone.find_targets) ----------------------------------------
    ENCODER_BLOCK, DECODER_LAYER, DECODER_FINAL = _ENCODER_BLOCK, _DECODER_LAYER, _DECODER_FINAL
    OUTPUT_MLP, IOU_HEAD = _OUTPUT_MLP, _IOU_HEAD

    def num_decoder_layers(self) -> int:
        return len(self.model.mask_decoder.transformer.layers)
