"""SAM 1's attention through the fused kernel equals segment_anything's own, in float64."""

import copy

import torch

from talora.backbones.sam1 import _build_sam_tiny
from talora.backbones.sam1_fused import FusedDecoderAttention, FusedEncoderAttention, fuse_attention


def test_fused_attention_equals_segment_anything_in_the_encoder_and_decoder(float64):
    torch.manual_seed(0)
    # Block 2 windowed (16 x 16 tokens padded to 18 x 18 windows of 6), the others global; rel-pos everywhere.
    plain = float64(_build_sam_tiny(256, 16, 128, 4, 4, (1, 3), 64, 256, 4, window_size=6)).eval()
    for name, p in plain.named_parameters():  # SAM initialises rel-pos tables to zero: make the bias count
        if "rel_pos" in name:
            p.data.normal_(0, 0.5)
    fused = fuse_attention(copy.deepcopy(plain))
    assert isinstance(fused.image_encoder.blocks[0].attn, FusedEncoderAttention)
    assert isinstance(fused.mask_decoder.transformer.final_attn_token_to_image, FusedDecoderAttention)
    assert fused.state_dict().keys() == plain.state_dict().keys()

    image = torch.randn(2, 3, 256, 256, dtype=torch.float64)
    with torch.no_grad():
        expected = plain.image_encoder(image)
        torch.testing.assert_close(fused.image_encoder(image), expected, atol=1e-9, rtol=0)
        coords = torch.rand(1, 3, 2) * 256
        sparse, dense = plain.prompt_encoder(points=(coords, torch.ones(1, 3, dtype=torch.int)), boxes=None, masks=None)
        pe = plain.prompt_encoder.get_dense_pe()
        ref = plain.mask_decoder(expected[:1], pe, sparse, dense, True)
        got = fused.mask_decoder(expected[:1], pe, sparse, dense, True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)
