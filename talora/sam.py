"""Segment Anything models: build any variant, load and save checkpoints from any URI.

``vit_h``/``vit_l``/``vit_b`` come from segment_anything's own registry; ``vit_tiny`` is a ~1.2 M
parameter preset assembled from the same modeling classes (ImageEncoderViT, PromptEncoder,
MaskDecoder, TwoWayTransformer) for CPU tests and the offline demo. Every variant shares the
decoder code, so LoRA and the hypernet never care which encoder runs.

Checkpoints load safely: safetensors, or ``torch.load(weights_only=True)``. A missing, corrupt or
wrong-variant checkpoint is an error naming the URI and what was expected.
"""

from __future__ import annotations

import hashlib
import io
from functools import partial

import numpy as np
import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide

from talora.config import SAM_TYPES
from talora.storage import StorageOptions, read_bytes
from talora.weights import parse_safetensors, write_weights

# The encoder's square input side per variant (images are resized so the long side fits it).
INPUT_SIZE = {"vit_h": 1024, "vit_l": 1024, "vit_b": 1024, "vit_tiny": 256}

# (encoder embed dim, encoder depth) -> variant; enough to tell the variants apart from a state dict.
_ENCODER_SHAPES = {"vit_h": (1280, 32), "vit_l": (1024, 24), "vit_b": (768, 12), "vit_tiny": (128, 4)}


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


def build_sam(sam_type: str, checkpoint: str | None = None, storage: StorageOptions | None = None) -> Sam:
    """SAM `sam_type` in eval mode, frozen, with weights from `checkpoint` (None = random init).

    The checkpoint is read and checked before the (possibly 2.5 GB) model is built.
    """
    if sam_type not in SAM_TYPES:
        raise ValueError(f"unknown SAM variant {sam_type!r}; expected one of {SAM_TYPES}")
    state = None if checkpoint is None else read_sam_checkpoint(checkpoint, sam_type, storage)
    sam = build_sam_vit_tiny() if sam_type == "vit_tiny" else sam_model_registry[sam_type](checkpoint=None)
    if state is not None:
        try:
            sam.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"checkpoint {checkpoint} does not match the {sam_type} architecture: {e}") from e
    sam.eval()
    sam.requires_grad_(False)
    return sam


def read_sam_checkpoint(uri: str, sam_type: str, storage: StorageOptions | None = None) -> dict[str, torch.Tensor]:
    """A SAM state dict from `uri`, checked to be for `sam_type`."""
    state = read_state_dict(uri, storage)
    found = detect_sam_type(state)
    if found is None:
        raise ValueError(f"checkpoint {uri} holds no SAM image encoder weights (expected a {sam_type} checkpoint)")
    if found != sam_type:
        raise ValueError(f"checkpoint {uri} has keys for {found}, but --sam-type {sam_type} was given")
    return state


def read_state_dict(uri: str, storage: StorageOptions | None = None) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` or a ``torch.save`` file, never unpickling code."""
    data = read_bytes(uri, storage)
    if uri.endswith(".safetensors"):
        return parse_safetensors(data, uri)[0]
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {uri} is corrupt or not a weights file: {type(e).__name__}: {e}") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # training checkpoints that wrap the weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {uri} does not hold a state dict of tensors")
    return state


def detect_sam_type(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The variant whose encoder shape matches `state_dict`, or None if it is no SAM at all."""
    patch = state_dict.get("image_encoder.patch_embed.proj.weight")
    if patch is None:
        return None
    depth = 1 + max(
        (int(k.split(".")[2]) for k in state_dict if k.startswith("image_encoder.blocks.")), default=-1
    )
    shape = (patch.shape[0], depth)
    return next((name for name, s in _ENCODER_SHAPES.items() if s == shape), None)


def save_sam(sam: Sam, uri: str, storage: StorageOptions | None = None) -> None:
    """Writes the base SAM weights as safetensors (LoRA wrappers, if injected, are looked through)."""
    state = {k.replace(".base_layer.", "."): v for k, v in sam.state_dict().items()}
    write_weights(uri, state, {"format": "talora.sam/1"}, storage)


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --- the encoder split: trunk (once per image) and tail (per prompt) ---------------------------


def preprocess_image(sam: Sam, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """HWC uint8 RGB -> (3, S, S) normalised, padded model input, and the resized (h, w)."""
    resized = ResizeLongestSide(sam.image_encoder.img_size).apply_image(image)
    x = torch.as_tensor(resized, device=sam.device).permute(2, 0, 1).contiguous().float()
    return sam.preprocess(x[None])[0], (int(resized.shape[0]), int(resized.shape[1]))


def embed_trunk(encoder: ImageEncoderViT, images: torch.Tensor, tail_blocks: int) -> torch.Tensor:
    """B x 3 x S x S -> B x h x w x C: patch embedding and every block but the last `tail_blocks`."""
    x = encoder.patch_embed(images)  # (B, h, w, C)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    for block in encoder.blocks[: len(encoder.blocks) - tail_blocks]:
        x = block(x)
    return x


def embed_tail(encoder: ImageEncoderViT, trunk_features: torch.Tensor, tail_blocks: int) -> torch.Tensor:
    """B x h x w x C trunk features -> B x C' x h x w image embeddings: the last blocks + neck."""
    x = trunk_features
    for block in encoder.blocks[len(encoder.blocks) - tail_blocks :]:
        x = block(x)
    return encoder.neck(x.permute(0, 3, 1, 2))


def predict_masks_per_row(
    sam: Sam, image_embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MaskDecoder.predict_masks with one image embedding per row instead of one per call.

    SAM repeat-interleaves a single image embedding over the prompt rows; with an adapted tail
    (or a batch of images in pretraining) every row has its own embedding, so this takes P of
    them. It reuses the decoder's own modules and is tested equal to MaskDecoder.forward row by row.

    Returns low-res mask logits (P, 1+M', 4h, 4w), IoU predictions (P, 1+M') and the IoU token (P, C).
    """
    decoder = sam.mask_decoder
    P, C, h, w = image_embeddings.shape
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)  # (1+M, C)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(P, -1, -1), sparse], dim=1)  # (P, 1+M+n', C)
    src = image_embeddings + dense  # (P, C, h, w)
    pos_src = sam.prompt_encoder.get_dense_pe().expand(P, -1, -1, -1)  # (P, C, h, w)

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


def trunk_digest(sam: Sam, tail_blocks: int) -> str:
    """Digest of exactly the weights that produce cached features (the whole encoder when k = 0,
    whose cache holds final embeddings), plus the split itself."""
    encoder = sam.image_encoder
    trunk_blocks = len(encoder.blocks) - tail_blocks
    h = hashlib.sha256(f"blocks<{trunk_blocks};tail={tail_blocks};img={encoder.img_size}".encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        name = name.replace(".base_layer.", ".")
        parts = name.split(".")
        if parts[0] == "blocks" and int(parts[1]) >= trunk_blocks:
            continue
        if parts[0] == "neck" and tail_blocks > 0:
            continue
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
