"""SAM 2.1 (the image path): Hiera trunk + FPN neck + the SAM 2 mask decoder, built with the `sam2` package.

Only what labelling an image needs is kept (`Sam2Image`): the image encoder, the prompt encoder,
the mask decoder and `no_mem_embed`; the memory attention and encoder (video) are dropped after
the package's own builder (`sam2.build_sam.build_sam2`, its hydra configs) made the model, and
their weights are ignored when a checkpoint is loaded.

Frames (as `SAM2Transforms`, base.SquareFrame): every image is resized to S x S (the aspect is not kept) and
normalised with ImageNet statistics; points and boxes scale by (S / W, S / H); low-res masks go
straight back to (H, W).

The split. Hiera has four stages (strides 4, 8, 16, 32); the FPN neck projects each to d channels
and adds the stride-32 level, upsampled, to the stride-16 one, which (+ no_mem_embed) is the image
embedding; the decoder also takes the stride-4 and stride-8 levels (through its conv_s0 / conv_s1).
- trunk (once per image): patch embedding, every block but the last k (all inside the last stage),
  the stride-4 / -8 / -16 laterals and the decoder's conv_s0 / conv_s1 of the first two;
- tail (per prompt row): the last k blocks, the stride-32 lateral, the top-down sum, no_mem_embed.

Packing. The seam carries one tensor per image: the trunk's maps of four resolutions are packed
into one (B, g, g, C) tensor at the tail's grid g = S / 32 by space-to-depth (`pixel_unshuffle`),
and the image embedding carries the decoder's high-resolution maps the same way at S / 16. It is
lossless (the same numbers, only moved) and costs nothing in memory; `decode_rows` unpacks.

Shapes: B images, P rows, S input side, g = S/32, h = S/16, d = the decoder width, C4 = the last
stage's channels; trunk (B, g, g, C4 + 16d) = [C4 | s16 4d | s8 4d | s4 8d], embedding (P, 4d, h, h) =
[embedding d | s8 d | s4 2d].
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.build_sam import build_sam2
from sam2.sam2_image_predictor import SAM2ImagePredictor
from torch import nn

from talora.backbones import base

# The package's configs per variant; sam2_tiny is the hiera_t config made small (CPU tests, demo).
CONFIGS = {
    "sam2.1_hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "sam2_tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
}
TINY_OVERRIDES = [
    "++model.image_size=256",
    "++model.image_encoder.trunk.embed_dim=32",
    "++model.image_encoder.trunk.stages=[1,1,2,2]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_spec=[8,4,4,2]",
    "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
    "++model.image_encoder.neck.d_model=64",
    "++model.image_encoder.neck.backbone_channel_list=[256,128,64,32]",
    "++model.image_encoder.neck.position_encoding.num_pos_feats=64",
    "++model.memory_attention.num_layers=1",  # built by the package, then dropped: keep it cheap
]
# (trunk embed_dim, Hiera blocks) -> variant: what a checkpoint's weights say it is.
SHAPES = {(96, 12): "sam2.1_hiera_t", (96, 16): "sam2.1_hiera_s", (112, 24): "sam2.1_hiera_b+",
          (144, 48): "sam2.1_hiera_l", (32, 6): "sam2_tiny"}
IMAGE_PATH = ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.", "no_mem_embed")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_ENCODER_BLOCK = re.compile(r"^image_encoder\.trunk\.blocks\.(\d+)\.(.+)$")
_DECODER_LAYER = re.compile(r"^sam_mask_decoder\.transformer\.layers\.(\d+)\.(.+)$")
_DECODER_FINAL = re.compile(r"^sam_mask_decoder\.transformer\.(final_attn_token_to_image\..+)$")
_OUTPUT_MLP = re.compile(r"^sam_mask_decoder\.(output_hypernetworks_mlps\.\d+\.layers\.\d+)$")
_IOU_HEAD = re.compile(r"^sam_mask_decoder\.(iou_prediction_head\.layers\.\d+)$")
# SAM 2's MLPs name their Linears layers.0 / layers.1 where SAM's are lin1 / lin2: the same
# LoraConfig patterns adapt both.
_MLP_LEAF = {"mlp.layers.0": "lin1", "mlp.layers.1": "lin2"}


class Sam2Image(nn.Module):
    """The image path of a `SAM2Base`, under the names its checkpoints use."""

    def __init__(self, model) -> None:
        super().__init__()
        self.image_encoder = model.image_encoder
        self.sam_prompt_encoder = model.sam_prompt_encoder
        self.sam_mask_decoder = model.sam_mask_decoder
        self.no_mem_embed = model.no_mem_embed  # (1, 1, d): added to the image embedding
        self.directly_add_no_mem_embed = model.directly_add_no_mem_embed
        self.image_size = model.image_size


def build_sam2_base(name: str):
    """The package's whole `SAM2Base` of variant `name` (random weights), from its builder and config."""

    overrides = TINY_OVERRIDES if name == "sam2_tiny" else []
    return build_sam2(CONFIGS[name], ckpt_path=None, device="cpu", mode="eval", hydra_overrides_extra=overrides)


def build_model(name: str) -> Sam2Image:
    """Variant `name` with random weights: the image path of the package's own model."""
    return Sam2Image(build_sam2_base(name))


def detect_variant(state_dict: dict[str, torch.Tensor]) -> str | None:
    pos_embed = state_dict.get("image_encoder.trunk.pos_embed")
    if pos_embed is None:
        return None
    blocks = {k.split(".")[3] for k in state_dict if k.startswith("image_encoder.trunk.blocks.")}
    return SHAPES.get((int(pos_embed.shape[1]), len(blocks)))


class Backbone(base.SquareFrame, base.Backbone):
    MEAN, STD = MEAN, STD  # the frame's pixel statistics (base.SquareFrame)

    def __init__(self, variant, model: Sam2Image) -> None:
        super().__init__(variant, model)
        trunk, neck = model.image_encoder.trunk, model.image_encoder.neck
        if neck.fpn_top_down_levels != [2, 3] or model.image_encoder.scalp != 1:
            raise ValueError(f"{variant.name}: the trunk/tail split needs the SAM 2.1 neck (top-down levels [2, 3], "
                             f"scalp 1), got {neck.fpn_top_down_levels}, scalp {model.image_encoder.scalp}")
        self.image_size = model.image_size
        self.embedding_size = self.image_size // 16  # h
        self.trunk_size = self.image_size // 32  # g
        self.decoder_dim = neck.d_model  # d
        self.num_blocks = len(trunk.blocks)
        self.last_stage = trunk.stage_ends[-2] + 1  # the first block of the last stage
        self.tail_dim = trunk.blocks[-1].dim_out  # C4
        self.trunk_dim = self.tail_dim + 16 * self.decoder_dim  # packed: C4 + d*4 (s16) + d/4*16 (s8) + d/8*64 (s4)
        self.mask_threshold = 0.0

    def check_split(self, tail_blocks: int) -> int:
        """The first tail block; the tail must lie inside the last stage (after its pooling block)."""
        first = self.num_blocks - tail_blocks
        if first <= self.last_stage and tail_blocks > 0:
            raise ValueError(f"{self.variant.name}: at most {self.num_blocks - self.last_stage - 1} tail block(s) "
                             f"(the last stage after its pooling block), got {tail_blocks}")
        return first

    # --- weights ---------------------------------------------------------------------------------
    def load_base_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        """The image path's weights (a checkpoint's memory attention and encoder are ignored)."""
        super().load_base_state_dict({k: v for k, v in state.items() if k.startswith(IMAGE_PATH)}, source)

    def trunk_state(self, tail_blocks: int) -> tuple[str, dict[str, torch.Tensor]]:
        first = self.check_split(tail_blocks)
        state = {}
        for name, tensor in self.base_state_dict().items():
            parts = name.split(".")
            if name.startswith("image_encoder.trunk.blocks.") and int(parts[3]) >= first:
                continue
            if name.startswith("image_encoder.neck.convs.0.") and tail_blocks > 0:
                continue  # the stride-32 lateral: the tail's
            if name.startswith("image_encoder.") or name.startswith(("sam_mask_decoder.conv_s0", "sam_mask_decoder.conv_s1")):
                state[name] = tensor
        return f"sam2;blocks<{first};tail={tail_blocks};img={self.image_size}", state

    # --- the encoder split -----------------------------------------------------------------------
    def embed_trunk(self, images: torch.Tensor, tail_blocks: int) -> torch.Tensor:
        first = self.check_split(tail_blocks)
        trunk, neck = self.model.image_encoder.trunk, self.model.image_encoder.neck
        decoder = self.model.sam_mask_decoder
        x = trunk.patch_embed(images)  # (B, S/4, S/4, C1)
        x = x + trunk._get_pos_embed(x.shape[1:3])
        levels = []  # stage outputs at strides 4, 8, 16
        for i, block in enumerate(trunk.blocks[:first]):
            x = block(x)
            if i in trunk.stage_ends[:-1]:
                levels.append(x.permute(0, 3, 1, 2))
        n = len(neck.convs) - 1
        s4 = decoder.conv_s0(neck.convs[n](levels[0]))  # (B, d/8, S/4, S/4)
        s8 = decoder.conv_s1(neck.convs[n - 1](levels[1]))  # (B, d/4, S/8, S/8)
        s16 = neck.convs[n - 2](levels[2])  # (B, d, S/16, S/16): the stride-16 lateral
        packed = [x.permute(0, 3, 1, 2), F.pixel_unshuffle(s16, 2), F.pixel_unshuffle(s8, 4), F.pixel_unshuffle(s4, 8)]
        return torch.cat(packed, dim=1).permute(0, 2, 3, 1)  # (B, g, g, C4 + 16d)

    def embed_tail(self, trunk_features: torch.Tensor, tail_blocks: int) -> torch.Tensor:
        first = self.check_split(tail_blocks)
        trunk, neck = self.model.image_encoder.trunk, self.model.image_encoder.neck
        d, c4 = self.decoder_dim, self.tail_dim
        x, s16, s8, s4 = trunk_features.permute(0, 3, 1, 2).split([c4, 4 * d, 4 * d, 8 * d], dim=1)  # (P, ·, g, g)
        x = x.permute(0, 2, 3, 1)  # (P, g, g, C4): Hiera's layout
        for block in trunk.blocks[first:]:
            x = block(x)
        top = neck.convs[0](x.permute(0, 3, 1, 2))  # (P, d, g, g): the stride-32 lateral
        down = F.interpolate(top.to(torch.float32), scale_factor=2.0, mode=neck.fpn_interp_model,
                             align_corners=None if neck.fpn_interp_model == "nearest" else False, antialias=False)
        embedding = F.pixel_shuffle(s16, 2) + down  # (P, d, h, h)
        if neck.fuse_type == "avg":
            embedding = embedding / 2
        if self.model.directly_add_no_mem_embed:
            embedding = embedding + self.model.no_mem_embed.view(1, d, 1, 1)
        s8 = F.pixel_unshuffle(F.pixel_shuffle(s8, 4), 2)  # (P, d, h, h): the stride-8 map, packed at h
        s4 = F.pixel_unshuffle(F.pixel_shuffle(s4, 8), 4)  # (P, 2d, h, h): the stride-4 map, packed at h
        return torch.cat([embedding, s8, s4], dim=1)  # (P, 4d, h, h)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """The package's own image path (SAM2Base.forward_image, then SAM2ImagePredictor's
        no_mem_embed), packed as `embed_tail` packs it: what trunk + tail must equal."""
        out = self.model.image_encoder(images)
        decoder, d = self.model.sam_mask_decoder, self.decoder_dim
        s4, s8 = decoder.conv_s0(out["backbone_fpn"][0]), decoder.conv_s1(out["backbone_fpn"][1])
        embedding = out["vision_features"]
        if self.model.directly_add_no_mem_embed:
            embedding = embedding + self.model.no_mem_embed.view(1, d, 1, 1)
        return torch.cat([embedding, F.pixel_unshuffle(s8, 2), F.pixel_unshuffle(s4, 4)], dim=1)

    # --- the decoder, one image embedding per row ------------------------------------------------
    def encode_prompts(self, point_coords, point_labels, boxes):
        points = (point_coords, point_labels) if point_coords is not None else None
        return self.model.sam_prompt_encoder(points=points, boxes=boxes, masks=None)

    def decode_rows(self, image_embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor,
                    rows: torch.Tensor | None = None):
        """The SAM 2 MaskDecoder.predict_masks with one (packed) image embedding per row: its own
        modules, with the high-resolution maps unpacked from the embedding (tested equal to
        MaskDecoder.forward row by row)."""
        decoder, d = self.model.sam_mask_decoder, self.decoder_dim
        embedding, s8, s4 = image_embeddings.split([d, d, 2 * d], dim=1)
        feat_s1, feat_s0 = F.pixel_shuffle(s8, 2), F.pixel_shuffle(s4, 4)  # (·, d/4, 2h, 2h), (·, d/8, 4h, 4h)
        if rows is not None:
            # Only the embedding goes per row into the transformer; the high-resolution maps stay one
            # per image until the upscaling adds them (a row's copy of all four would be 4x as large).
            embedding = embedding[rows]  # (n, d, h, h)
        src = embedding + dense  # (P, d, h, h)
        P, C, h, w = src.shape
        s = 1 if decoder.pred_obj_scores else 0  # the object-score token comes first
        weights = [decoder.obj_score_token.weight] if s else []
        output_tokens = torch.cat([*weights, decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(P, -1, -1), sparse.expand(P, -1, -1)], dim=1)
        pos_src = self.model.sam_prompt_encoder.get_dense_pe().expand(P, -1, -1, -1)  # (P, d, h, h)

        hs, src = decoder.transformer(src, pos_src, tokens)  # (P, s+1+M+n', d), (P, h*w, d)
        iou_token_out = hs[:, s, :]  # (P, d)
        mask_tokens_out = hs[:, s + 1 : s + 1 + decoder.num_mask_tokens, :]  # (P, M, d)

        dc1, ln1, act1, dc2, act2 = decoder.output_upscaling
        # Indexed at each use, so one high-resolution map at a time exists per row.
        per_row = (lambda feat: feat[rows]) if rows is not None else (lambda feat: feat)
        upscaled = act1(ln1(dc1(src.transpose(1, 2).reshape(P, C, h, w)) + per_row(feat_s1)))
        upscaled = act2(dc2(upscaled) + per_row(feat_s0))  # (P, d/8, 4h, 4w)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
        )  # (P, M, d/8)
        _, c8, H, W = upscaled.shape
        masks = (hyper_in @ upscaled.view(P, c8, H * W)).view(P, -1, H, W)  # (P, M, 4h, 4w)
        return masks, decoder.iou_prediction_head(iou_token_out), iou_token_out

    def high_res_skips(self) -> list[nn.Module]:
        decoder = self.model.sam_mask_decoder
        return [decoder.conv_s0, decoder.conv_s1] if decoder.use_high_res_features else []

    def package_model(self):
        """A whole `SAM2Base` of this variant holding this base's image-path weights: the package's
        predictor and mask generator need its own model (its video modules stay unused)."""
        model = build_sam2_base(self.variant.name)
        missing, unexpected = model.load_state_dict(self.base_state_dict(), strict=False)
        if unexpected or any(k.startswith(IMAGE_PATH) for k in missing):
            raise ValueError(f"{self.variant.name}: the base does not fit SAM2Base ({unexpected or missing})")
        return model.to(self.device)

    def fit_feature_sizes(self, predictor: SAM2ImagePredictor) -> SAM2ImagePredictor:
        """The predictor assumes 1024-px feature sizes; the CPU preset runs at 256."""
        side = self.image_size
        predictor._bb_feat_sizes = [(side // 4, side // 4), (side // 8, side // 8), (side // 16, side // 16)]
        return predictor

    def reference_predictor(self):
        """`SAM2ImagePredictor` on the package's own model with this base's weights."""
        return self.fit_feature_sizes(SAM2ImagePredictor(self.package_model()))

    def automatic_mask_generator(self, **options):
        """`SAM2AutomaticMaskGenerator` on the package's own model with this base's weights."""
        generator = SAM2AutomaticMaskGenerator(self.package_model(), **options)
        self.fit_feature_sizes(generator.predictor)
        return generator

    # --- LoRA targets (found by base.Backbone.find_targets) ----------------------------------------
    ENCODER_BLOCK, DECODER_LAYER, DECODER_FINAL = _ENCODER_BLOCK, _DECODER_LAYER, _DECODER_FINAL
    OUTPUT_MLP, IOU_HEAD = _OUTPUT_MLP, _IOU_HEAD

    def num_decoder_layers(self) -> int:
        return len(self.model.sam_mask_decoder.transformer.layers)

    def first_tail_block(self, tail_blocks: int) -> int:
        return self.check_split(tail_blocks)

    @staticmethod
    def pattern_name(path: str) -> str:
        """lin1 / lin2 for an MLP's two Linears (SAM 2 names them layers.0 / layers.1), else the last part."""
        return _MLP_LEAF.get(path, path.rsplit(".", 1)[-1])

