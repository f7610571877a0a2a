"""SAM 3 (the image detector): a ViT + ViTDet neck, its text encoder, the DETR fusion encoder and
decoder and the mask head, built from the `sam3` package's own classes (`sam3.model_builder`'s parts).

SAM 3 is a detector: a noun phrase goes through its own text encoder (the concept path), a fusion
encoder lets the image attend to it, a DETR decoder turns Q queries into boxes, scores and masks,
and a presence token says whether the concept is in the image at all. talora runs the package's
own `Sam3Image.forward_grounding` on features it computes itself, so that:

- trunk (once per image): patch embedding, absolute position, every ViT block but the last k;
- tail (per (image, prompt) row, adapted): the last k ViT blocks and the neck's levels;
- detector (per row, adapted): text + geometry prompt, fusion encoder, decoder, scoring, mask head.

The prompt reaches SAM 3 twice: as its own text prompt, and through the hypernet as adapters on
the tail, the fusion encoder, the decoder and the mask head (`find_targets`, by config flags).
Instances are SAM 3's queries (mask, score x presence), not a point grid; the semantic mask is the
mask head's semantic output.

Packing. The seam carries one tensor per row: the neck's levels at strides 14/4, 14/2 and 14 (the
stride-28 level is dropped, as the package's `scalp=1` does) are packed at the stride-14 grid h by
space-to-depth (`pixel_unshuffle`), losslessly; `detect_rows` unpacks them.

Attention. SAM 3's fusion encoder, decoder and mask head use torch's MultiheadAttention, whose
input projection is one packed weight that the module reads directly, so no Linear there can be
wrapped; the Linears LoRA adapts in them are the feed-forward ones (linear1 / linear2) and the
mask head's mask MLP. The ViT blocks' qkv / proj / fc1 / fc2 are plain Linears.

Frames (as `Sam3Processor`, base.SquareFrame): every image is resized to S x S (the aspect is not kept) and
normalised to [-1, 1]; masks go bilinearly back to (H, W).

Shapes: B images, P rows, S input side, h = S / 14, C = ViT width, d = the detector width,
Q = queries; trunk (B, h, h, C), embedding (P, 21d, h, h) = [stride 14 d | stride 7 4d | stride 3.5 16d],
masks (P, Q, 4h, 4h).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

# The package's __init__ imports its video model too, whose decorators warn about CUDA autocast
# on a machine without CUDA at every import (every actor's log): not talora's path, silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from sam3.model.data_misc import FindStage
    from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer
    from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
    from sam3.model.geometry_encoders import Prompt, SequenceGeometryEncoder
    from sam3.model.maskformer_segmentation import PixelDecoder, UniversalSegmentationHead
    from sam3.model.model_misc import MLP, DotProductScoring, TransformerWrapper
    from sam3.model.model_misc import MultiheadAttentionWrapper as MultiheadAttention
    from sam3.model.necks import Sam3DualViTDetNeck
    from sam3.model.position_encoding import PositionEmbeddingSine
    from sam3.model.sam3_image import Sam3Image
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.tokenizer_ve import SimpleTokenizer
    from sam3.model.vitdet import ViT
    from sam3.model.vl_combiner import SAM3VLBackbone

from talora.backbones import base
from talora.core.lora import LoraLinear, LoraTarget

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
PATCH = 14
# The official checkpoint holds the detector under "detector." and the video tracker under "tracker.".
DETECTOR_PREFIX = "detector."


@dataclass(frozen=True)
class Sam3Spec:
    """Every constant of one SAM 3 image model (the package's builder hard-codes `sam3`'s)."""

    image_size: int  # S
    pretrain_size: int  # the absolute position embedding's side, tiled to S
    embed_dim: int  # C
    depth: int  # ViT blocks
    num_heads: int
    global_blocks: tuple[int, ...]  # the ViT blocks with global attention (the rest are windowed)
    window_size: int
    d_model: int  # d
    detr_heads: int
    ffn_dim: int  # the fusion encoder's, decoder's and geometry encoder's feed-forward width
    text_width: int
    text_heads: int
    text_layers: int
    encoder_layers: int
    decoder_layers: int
    num_queries: int  # Q
    geometry_layers: int


SPECS = {
    "sam3": Sam3Spec(1008, 336, 1024, 32, 16, (7, 15, 23, 31), 24, 256, 8, 2048, 1024, 16, 24, 6, 6, 200, 3),
    # The CPU preset: the same classes, small (tests, the demo's smoke runs).
    "sam3_tiny": Sam3Spec(224, 112, 64, 4, 2, (1, 3), 8, 64, 2, 128, 64, 2, 1, 1, 2, 20, 1),
}


def vocabulary_path() -> str:
    """The CLIP BPE vocabulary SAM 3's tokenizer reads. The sam3 wheel does not ship it; the
    open_clip_torch wheel does (the same file), and is found without importing it."""
    spec = importlib.util.find_spec("open_clip")
    path = os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz") if spec else ""
    if not os.path.exists(path):
        raise FileNotFoundError("SAM 3's tokenizer needs bpe_simple_vocab_16e6.txt.gz, which the open_clip_torch "
                                "package ships: pip install --no-deps open_clip_torch (make setup does)")
    return path


def _build_sam3(spec: Sam3Spec) -> Sam3Image:
    """`build_sam3_image_model`'s parts with `spec`'s sizes, image path only, eval mode, random weights."""
    d, heads, ffn = spec.d_model, spec.detr_heads, spec.ffn_dim
    vit = ViT(
        img_size=spec.image_size, pretrain_img_size=spec.pretrain_size, patch_size=PATCH, embed_dim=spec.embed_dim,
        depth=spec.depth, num_heads=spec.num_heads, mlp_ratio=4.625, norm_layer="LayerNorm", drop_path_rate=0.1,
        qkv_bias=True, use_abs_pos=True, tile_abs_pos=True, global_att_blocks=spec.global_blocks, rel_pos_blocks=(),
        use_rope=True, use_interp_rope=True, window_size=spec.window_size, pretrain_use_cls_token=True,
        retain_cls_token=False, ln_pre=True, ln_post=False, return_interm_layers=False, bias_patch_embed=False,
    )
    # No precompute_resolution: the package would build its cache on "cuda".
    neck = Sam3DualViTDetNeck(trunk=vit, position_encoding=_position_encoding(d), d_model=d,
                              scale_factors=[4.0, 2.0, 1.0, 0.5], add_sam2_neck=False)
    text = VETextEncoder(tokenizer=SimpleTokenizer(bpe_path=vocabulary_path()), d_model=d, width=spec.text_width,
                         heads=spec.text_heads, layers=spec.text_layers)
    backbone = SAM3VLBackbone(visual=neck, text=text, scalp=1)

    encoder = TransformerEncoderFusion(
        layer=TransformerEncoderLayer(
            activation="relu", d_model=d, dim_feedforward=ffn, dropout=0.1, pos_enc_at_attn=True,
            pos_enc_at_cross_attn_keys=False, pos_enc_at_cross_attn_queries=False, pre_norm=True,
            self_attention=MultiheadAttention(num_heads=heads, dropout=0.1, embed_dim=d, batch_first=True),
            cross_attention=MultiheadAttention(num_heads=heads, dropout=0.1, embed_dim=d, batch_first=True),
        ),
        num_layers=spec.encoder_layers, d_model=d, num_feature_levels=1, frozen=False, use_act_checkpoint=True,
        add_pooled_text_to_img_feat=False, pool_text_with_mask=True,
    )
    decoder = TransformerDecoder(
        layer=TransformerDecoderLayer(
            activation="relu", d_model=d, dim_feedforward=ffn, dropout=0.1,
            cross_attention=MultiheadAttention(num_heads=heads, dropout=0.1, embed_dim=d),
            n_heads=heads, use_text_cross_attention=True,
        ),
        num_layers=spec.decoder_layers, num_queries=spec.num_queries, return_intermediate=True, box_refine=True,
        num_o2m_queries=0, dac=True, boxRPB="log", d_model=d, frozen=False, interaction_layer=None,
        dac_use_selfatt_ln=True, use_act_checkpoint=True, presence_token=True,
        resolution=None, stride=None,  # the package's values build a coordinate cache on "cuda"
    )
    scoring = DotProductScoring(d_model=d, d_proj=d, prompt_mlp=MLP(input_dim=d, hidden_dim=ffn, output_dim=d,
                                                                   num_layers=2, dropout=0.1, residual=True,
                                                                   out_norm=nn.LayerNorm(d)))
    segmentation = UniversalSegmentationHead(
        hidden_dim=d, upsampling_stages=3, aux_masks=False, presence_head=False, dot_product_scorer=None,
        act_ckpt=True, cross_attend_prompt=MultiheadAttention(num_heads=heads, dropout=0, embed_dim=d),
        pixel_decoder=PixelDecoder(num_upsampling_stages=3, interpolation_mode="nearest", hidden_dim=d),
    )
    geometry = SequenceGeometryEncoder(
        pos_enc=_position_encoding(d), encode_boxes_as_points=False, points_direct_project=True, points_pool=True,
        points_pos_enc=True, boxes_direct_project=True, boxes_pool=True, boxes_pos_enc=True, d_model=d,
        num_layers=spec.geometry_layers, use_act_ckpt=True, add_cls=True, add_post_encode_proj=True,
        layer=TransformerEncoderLayer(
            activation="relu", d_model=d, dim_feedforward=ffn, dropout=0.1, pos_enc_at_attn=False, pre_norm=True,
            self_attention=MultiheadAttention(num_heads=heads, dropout=0.1, embed_dim=d, batch_first=False),
            pos_enc_at_cross_attn_queries=False, pos_enc_at_cross_attn_keys=True,
            cross_attention=MultiheadAttention(num_heads=heads, dropout=0.1, embed_dim=d, batch_first=False),
        ),
    )
    model = Sam3Image(
        backbone=backbone, transformer=TransformerWrapper(encoder=encoder, decoder=decoder, d_model=d),
        input_geometry_encoder=geometry, segmentation_head=segmentation, num_feature_levels=1,
        o2m_mask_predict=True, dot_prod_scoring=scoring, use_instance_query=False, multimask_output=True,
        inst_interactive_predictor=None, matcher=None,
    )
    # The text transformer leaves these two torch.empty (a checkpoint fills them): random weights
    # get open_clip's initialisation instead of whatever memory held.
    text_encoder = text.encoder
    nn.init.normal_(text_encoder.positional_embedding, std=0.01)
    nn.init.normal_(text_encoder.text_projection, std=text_encoder.width ** -0.5)
    return model.eval()


def _position_encoding(d_model: int) -> PositionEmbeddingSine:
    return PositionEmbeddingSine(num_pos_feats=d_model, normalize=True, scale=None, temperature=10000)


def build_model(name: str) -> Sam3Image:
    """Variant `name` with random weights: the package's image model at that variant's sizes."""
    return _build_sam3(SPECS[name])


def detector_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image model's weights, named as `Sam3Image` names them: an official checkpoint's detector
    (its "detector." prefix dropped, the tracker and the SAM 2 neck left out) or talora's own."""
    if any(k.startswith(DETECTOR_PREFIX) for k in state_dict):
        state_dict = {k[len(DETECTOR_PREFIX):]: v for k, v in state_dict.items() if k.startswith(DETECTOR_PREFIX)}
    return {k: v for k, v in state_dict.items() if not k.startswith("backbone.vision_backbone.sam2_convs.")}


def detect_variant(state_dict: dict[str, torch.Tensor]) -> str | None:
    state = detector_state(state_dict)
    pos_embed = state.get("backbone.vision_backbone.trunk.pos_embed")
    if pos_embed is None:
        return None
    blocks = {k.split(".")[4] for k in state if k.startswith("backbone.vision_backbone.trunk.blocks.")}
    for name, spec in SPECS.items():
        if (int(pos_embed.shape[-1]), len(blocks)) == (spec.embed_dim, spec.depth):
            return name
    return None


@contextlib.contextmanager
def _package_compat(dtype: torch.dtype):
    """Two spots where the package's geometry encoder assumes a CUDA float32 run, mended for the
    duration of one detector pass (the pass is single-threaded): it pins a 4-number tensor on every
    call, which fails where no CUDA driver is (pinning becomes a no-op without CUDA); and it casts
    its boxes to float32 for roi_align, which refuses float64 features (in a float64 pass only, the
    equivalence tests', the boxes follow the features instead)."""
    import torchvision

    pin, roi_align = torch.Tensor.pin_memory, torchvision.ops.roi_align
    if not torch.cuda.is_available():
        torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    if dtype == torch.float64:
        torchvision.ops.roi_align = lambda features, boxes, *args, **kwargs: roi_align(
            features, [b.to(features.dtype) for b in boxes], *args, **kwargs)
    try:
        yield
    finally:
        torch.Tensor.pin_memory, torchvision.ops.roi_align = pin, roi_align


@dataclass
class Detections:
    """SAM 3's outputs for n rows: masks (n, Q, 4h, 4h) logits, scores (n, Q) logits (before
    presence), boxes (n, Q, 4) normalised cx, cy, w, h, presence (n,) logits, semantic (n, 4h, 4h) logits."""

    masks: torch.Tensor
    scores: torch.Tensor
    boxes: torch.Tensor
    presence_logits: torch.Tensor
    semantic: torch.Tensor


_VIT_BLOCK = re.compile(r"^backbone\.vision_backbone\.trunk\.blocks\.(\d+)\.(.+)$")
_DETR_ENCODER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(linear1|linear2)$")
_DETR_DECODER = re.compile(r"^transformer\.decoder\.layers\.(\d+)\.(linear1|linear2)$")
_MASK_HEAD = re.compile(r"^segmentation_head\.mask_predictor\.(mask_embed\.layers\.\d+)$")
_SCORING = re.compile(r"^(dot_prod_scoring\.(?:hs_proj|prompt_proj)|transformer\.decoder\.presence_token_head\.layers\.\d+)$")
# The decoder runs sequence-first ((queries, P, d)), and the scoring head reads its (layers, P, Q, d) output.
_SEQUENCE_FIRST = re.compile(r"^(transformer\.decoder\.|dot_prod_scoring\.hs_proj$)")
# The ViT's MLP (timm's fc1 / fc2) and the DETR layers' feed-forward (linear1 / linear2) are the
# MLPs LoraConfig's lin1 / lin2 name, as SAM's are.
_MLP_LEAF = {"mlp.fc1": "lin1", "mlp.fc2": "lin2", "linear1": "lin1", "linear2": "lin2"}


class Backbone(base.SquareFrame, base.Backbone):
    MEAN, STD = MEAN, STD  # the frame's pixel statistics (base.SquareFrame)

    def __init__(self, variant, model: Sam3Image) -> None:
        super().__init__(variant, model)
        vit = self.vit
        if model.backbone.scalp != 1 or list(model.backbone.vision_backbone.scale_factors) != [4.0, 2.0, 1.0, 0.5]:
            raise ValueError(f"{variant.name}: the packed embedding needs the SAM 3 neck (scales 4, 2, 1, 0.5; scalp 1)")
        self.image_size = variant.image_size
        self.embedding_size = self.image_size // PATCH  # h
        self.trunk_size = self.embedding_size
        self.trunk_dim = vit.blocks[0].attn.qkv.in_features  # C
        self.decoder_dim = model.hidden_dim  # d
        self.num_blocks = len(vit.blocks)
        self.scales = (1, 2, 4)  # the kept neck levels, coarsest first, as upsampling factors of the h grid
        self.mask_threshold = 0.0
        self._text_cache: dict[tuple, dict[str, dict]] = {}  # text_features: (dtype, device) -> prompt -> features
        # One-to-one queries only: talora's loss (talora.train.detector) has no one-to-many term, so
        # the decoder's DAC queries, which run only in training mode, would be computed and dropped.
        model.transformer.decoder.dac = False

    @property
    def vit(self) -> ViT:
        return self.model.backbone.vision_backbone.trunk

    def check_split(self, tail_blocks: int) -> int:
        if not 0 <= tail_blocks <= self.num_blocks:
            raise ValueError(f"{self.variant.name}: tail_blocks must be in [0, {self.num_blocks}], got {tail_blocks}")
        return self.num_blocks - tail_blocks

    # --- weights ---------------------------------------------------------------------------------
    def load_base_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        super().load_base_state_dict(detector_state(state), source)
        self._text_cache.clear()

    def trunk_state(self, tail_blocks: int) -> tuple[str, dict[str, torch.Tensor]]:
        first = self.check_split(tail_blocks)
        trunk = "backbone.vision_backbone.trunk."
        state = {}
        for name, tensor in self.base_state_dict().items():
            if not name.startswith("backbone.vision_backbone."):
                continue
            if name.startswith(trunk + "blocks.") and int(name.split(".")[4]) >= first:
                continue
            if not name.startswith(trunk) and tail_blocks > 0:
                continue  # the neck is the tail's
            state[name] = tensor
        return f"sam3;blocks<{first};tail={tail_blocks};img={self.image_size}", state

    # --- the encoder split -----------------------------------------------------------------------
    def embed_trunk(self, images: torch.Tensor, tail_blocks: int) -> torch.Tensor:
        """The ViT's own forward up to block S - k (`ViT.forward`, without its tail)."""
        first = self.check_split(tail_blocks)
        vit = self.vit
        x = vit.patch_embed(images)  # (B, h, h, C)
        x = x + get_abs_pos(vit, x.shape[1:3])
        x = vit.ln_pre(x)
        for i, block in enumerate(vit.blocks[:first]):
            x = self._after_block(i, block(x))
        return x

    def embed_tail(self, trunk_features: torch.Tensor, tail_blocks: int) -> torch.Tensor:
        first = self.check_split(tail_blocks)
        x = trunk_features
        for i, block in enumerate(self.vit.blocks[first:], start=first):
            x = self._after_block(i, block(x))
        convs = self.model.backbone.vision_backbone.convs
        x = x.permute(0, 3, 1, 2)  # (P, C, h, h)
        levels = [convs[i](x) for i in range(len(convs) - self.model.backbone.scalp)]  # strides 3.5, 7, 14
        return self.pack(levels)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """The package's own image path (`SAM3VLBackbone.forward_image`), packed as `embed_tail` packs it."""
        return self.pack(self.model.backbone.forward_image(images)["backbone_fpn"])

    def _after_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        return vit.ln_post(x) if i == vit.full_attn_ids[-1] else x

    def pack(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """The neck's levels (finest first: (P, d, 4h, 4h), (P, d, 2h, 2h), (P, d, h, h)) -> (P, 21d, h, h)."""
        return torch.cat([F.pixel_unshuffle(level, scale) if scale > 1 else level
                          for level, scale in zip(levels[::-1], self.scales)], dim=1)

    def unpack(self, embeddings: torch.Tensor) -> list[torch.Tensor]:
        """`pack`'s inverse: the levels finest first, as the package's `backbone_fpn`."""
        d = self.decoder_dim
        parts = embeddings.split([d * s * s for s in self.scales], dim=1)
        return [F.pixel_shuffle(part, scale) if scale > 1 else part for part, scale in zip(parts, self.scales)][::-1]

    # --- the detector, one image embedding per row -----------------------------------------------
    def text_features(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """SAM 3's own text encoder on `prompts` (the package's language features), cached per
        prompt and per dtype and device of the encoder. The text encoder is frozen and never adapted
        (so training needs no gradient through it), and its tokenizer pads every prompt to one
        length (so a prompt's features do not depend on the prompts beside it). Loading base
        weights empties the cache."""
        weight = next(self.model.backbone.language_backbone.parameters())
        cache = self._text_cache.setdefault((weight.dtype, weight.device), {})  # a cast or moved model encodes anew
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            with torch.no_grad():
                text = self.model.backbone.forward_text(missing, device=self.device)
            for i, p in enumerate(missing):
                cache[p] = {k: (v[i : i + 1] if k == "language_mask" else v[:, i : i + 1]) for k, v in text.items()}
        rows = [cache[p] for p in prompts]
        return {k: torch.cat([r[k] for r in rows], dim=0 if k == "language_mask" else 1) for k in rows[0]}

    def detect_rows(self, image_embeddings: torch.Tensor, text: dict[str, torch.Tensor],
                    rows: torch.Tensor | None = None) -> Detections:
        """The package's `Sam3Image.forward_grounding` on packed image embeddings (P) and the text of
        n prompts, row i of the n on image_embeddings[rows[i]] (rows None: row i on embedding i)."""
        n = text["language_mask"].shape[0]
        rows = torch.arange(n, device=self.device) if rows is None else rows.to(self.device)
        levels = self.unpack(image_embeddings)
        encoding = self.model.backbone.vision_backbone.position_encoding
        backbone_out = {
            "backbone_fpn": levels,
            "vision_pos_enc": [encoding(level).to(level.dtype) for level in levels],
            "vision_features": levels[-1],
            **text,
        }
        find = FindStage(img_ids=rows, text_ids=torch.arange(n, device=self.device), input_boxes=None,
                         input_boxes_mask=None, input_boxes_label=None, input_points=None, input_points_mask=None)
        # No geometric prompt (`Sam3Image._get_dummy_prompt`), in the features' dtype: the package's
        # defaults are float32, which a float64 model (the equivalence tests) cannot multiply.
        dtype = image_embeddings.dtype
        empty = Prompt(box_embeddings=torch.zeros(0, n, 4, device=self.device, dtype=dtype),
                       box_mask=torch.zeros(n, 0, device=self.device, dtype=torch.bool),
                       point_embeddings=torch.zeros(0, n, 2, device=self.device, dtype=dtype))
        # In training, `forward_grounding` also matches queries to targets in the package's own
        # target format; talora matches them itself (talora.train.detector). So the top module
        # answers as in eval while its layers (dropout, activation checkpointing) keep their mode.
        training, self.model.training = self.model.training, False
        try:
            with _package_compat(dtype):
                out = self.model.forward_grounding(backbone_out=backbone_out, find_input=find, find_target=None,
                                                   geometric_prompt=empty)
        finally:
            self.model.training = training
        return Detections(out["pred_masks"], out["pred_logits"][..., 0], out["pred_boxes"],
                          out["presence_logit_dec"].reshape(n), out["semantic_seg"][:, 0])

    def encode_prompts(self, point_coords, point_labels, boxes):
        raise ValueError(f"{self.variant.name} is a detector: it finds every instance of a text prompt and takes "
                         "no point or box prompts (use a SAM 1 or SAM 2.1 variant for --boxes)")

    def decode_rows(self, image_embeddings, sparse, dense, rows=None):
        raise ValueError(f"{self.variant.name} is a detector: use detect_rows")

    # --- LoRA targets ----------------------------------------------------------------------------
    @staticmethod
    def pattern_name(path: str) -> str:
        return _MLP_LEAF.get(path, path.rsplit(".", 1)[-1])

    def num_decoder_layers(self) -> int:
        return len(self.model.transformer.decoder.layers)

    def first_tail_block(self, tail_blocks: int) -> int:
        return self.check_split(tail_blocks)

    def find_targets(self, lora, tail_blocks: int) -> list[LoraTarget]:
        """The Linears `lora` adapts, in module order, by component: the ViT tail (image_encoder), the
        fusion encoder's feed-forward (detr_encoder), the decoder's (detr_decoder), the mask head's
        mask MLP (mask_decoder) and the scoring heads (iou_head). Depth runs tail, encoder layers,
        decoder layers, mask head, scoring."""
        first = self.check_split(tail_blocks)
        num_encoder = len(self.model.transformer.encoder.layers)
        heads_depth = tail_blocks + num_encoder + self.num_decoder_layers()
        patterns = set(lora.target_patterns)
        found_targets = []
        for name, module in self.model.named_modules():
            linear = module.base_layer if isinstance(module, LoraLinear) else module
            if not isinstance(linear, nn.Linear) or name.endswith(".base_layer"):
                continue
            found: tuple[str, int, str] | None = None
            if m := _VIT_BLOCK.match(name):
                if lora.image_encoder and int(m[1]) >= first and self.pattern_name(m[2]) in patterns:
                    found = ("image_encoder", int(m[1]) - first, "encoder." + self.pattern_name(m[2]))
            elif m := _DETR_ENCODER.match(name):
                if lora.detr_encoder and self.pattern_name(m[2]) in patterns:
                    found = ("detr_encoder", tail_blocks + int(m[1]), "detr_encoder." + self.pattern_name(m[2]))
            elif m := _DETR_DECODER.match(name):
                if lora.detr_decoder and self.pattern_name(m[2]) in patterns:
                    found = ("detr_decoder", tail_blocks + num_encoder + int(m[1]),
                             "detr_decoder." + self.pattern_name(m[2]))
            elif m := _MASK_HEAD.match(name):
                if lora.mask_decoder:
                    found = ("mask_decoder", heads_depth, "mask_head." + m[1])
            elif m := _SCORING.match(name):
                if lora.iou_head:
                    found = ("iou_head", heads_depth + 1, "scoring." + m[1])
            if found:
                component, depth, module_type = found
                found_targets.append(LoraTarget(name, linear.in_features, linear.out_features, component, depth,
                                                module_type, row_dim=1 if _SEQUENCE_FIRST.match(name) else 0))
        return found_targets

    # --- training ---------------------------------------------------------------------------------
    def frozen_in_pretraining(self) -> list[nn.Module]:
        return [self.model.backbone.language_backbone]

    def matcher(self):
        """SAM 3's own query-to-instance matching (the package's `BinaryHungarianMatcherV2`, with the
        costs `build_sam3_image_model` gives it): `matcher(outputs, targets)` -> (row, query, instance)
        indices; outputs {"pred_logits": (n, Q, 1), "pred_boxes": (n, Q, 4)}, targets {"num_boxes":
        (n,), "boxes_padded": (n, T, 4)}, boxes as normalised cx, cy, w, h."""
        from sam3.train.matcher import BinaryHungarianMatcherV2

        return BinaryHungarianMatcherV2(focal=True, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25,
                                        gamma=2, stable=False)

    # --- references ------------------------------------------------------------------------------
    def automatic_mask_generator(self, **options):
        raise ValueError(f"{self.variant.name} has no automatic mask generator: SAM 3 finds what a text prompt "
                         "names, and with no adapter that is its own baseline")

    def reference_predictor(self) -> ProcessorReference:
        """The package's `Sam3Processor` on this base with LoRA inactive: `set_image(image)`, then
        `predict_text(prompt)` (the speed suite's reference)."""
        return ProcessorReference(self)


class ProcessorReference:
    """The package's own image predictor (`Sam3Processor`), one HWC uint8 image, then one text
    prompt: what a SAM 3 user runs per image and noun phrase."""

    def __init__(self, backbone: Backbone) -> None:
        from sam3.model.sam3_image_processor import Sam3Processor

        self.processor = Sam3Processor(backbone.model, resolution=backbone.image_size, device=backbone.device.type,
                                       confidence_threshold=0.5)
        self.state: dict | None = None

    def set_image(self, image: np.ndarray) -> None:
        with _package_compat(torch.float32):
            self.state = self.processor.set_image(Image.fromarray(image))

    def predict_text(self, prompt: str) -> dict:
        """The processor's state: masks, boxes and scores of the instances it keeps."""
        if self.state is None:
            raise ValueError("set_image before predict_text")
        with _package_compat(torch.float32):
            return self.processor.set_text_prompt(prompt, self.state)


def get_abs_pos(vit: ViT, hw: tuple[int, int]) -> torch.Tensor:
    """The ViT's absolute position embedding at grid hw, as its forward adds it."""
    from sam3.model.vitdet import get_abs_pos as package_get_abs_pos

    return package_get_abs_pos(vit.pos_embed, vit.pretrain_use_cls_token, hw, vit.retain_cls_token,
                               tiling=vit.tile_abs_pos)
