"""SAM 1's attention through `torch.nn.functional.scaled_dot_product_attention`.

segment_anything computes attention as softmax(q k^T / sqrt(d)) v in separate ops (and, in the
image encoder, adds the decomposed relative-position bias to the materialised attention map). The
same math through PyTorch's fused kernel (flash / memory-efficient on CUDA, a fused CPU kernel) is
what segment-anything-fast does first. `fuse_attention` swaps the class of every attention module
of a built SAM for a subclass whose forward only differs in that call: parameters, state-dict
names and checkpoints are untouched, and the outputs agree to float rounding (tested).
"""

from __future__ import annotations

import torch
from segment_anything.modeling import image_encoder, transformer
from segment_anything.modeling.image_encoder import get_rel_pos
from torch import nn
from torch.nn import functional as F


class FusedDecoderAttention(transformer.Attention):
    """The mask decoder's attention (segment_anything.modeling.transformer.Attention)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self._separate_heads(self.q_proj(q), self.num_heads)  # (B, heads, N_q, c)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        return self.out_proj(self._recombine_heads(F.scaled_dot_product_attention(q, k, v)))


class FusedEncoderAttention(image_encoder.Attention):
    """The image encoder's attention (segment_anything.modeling.image_encoder.Attention), with the
    relative-position bias passed to the kernel as its additive mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, heads, HW, c)
        q, k, v = qkv.unbind(0)
        bias = relative_position_bias(q, self.rel_pos_h, self.rel_pos_w, (H, W)) if self.use_rel_pos else None
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)  # (B, heads, HW, c)
        return self.proj(x.view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1))


def relative_position_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                           size: tuple[int, int]) -> torch.Tensor:
    """segment_anything's add_decomposed_rel_pos without the attention map: the (B, heads, HW, HW)
    bias it adds, for q (B, heads, HW, c) (unscaled, as SAM uses it)."""
    h, w = size
    B, heads, _, c = q.shape
    r_q = q.reshape(B * heads, h, w, c)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(h, h, rel_pos_h))  # (B*heads, h, w, h)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(w, w, rel_pos_w))  # (B*heads, h, w, w)
    bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]  # (B*heads, h, w, h, w)
    return bias.reshape(B, heads, h * w, h * w).to(q.dtype)


_FUSED = {transformer.Attention: FusedDecoderAttention, image_encoder.Attention: FusedEncoderAttention}


def fuse_attention(model: nn.Module) -> nn.Module:
    """Every segment_anything attention module of `model` through the fused kernel (in place)."""
    for module in model.modules():
        fused = _FUSED.get(type(module))
        if fused is not None:
            module.__class__ = fused
    return model
