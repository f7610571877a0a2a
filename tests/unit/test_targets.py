import pytest
import torch
from torch import nn

from talora.config import LoraConfig, ModelConfig, SamConfig, default_config
from talora.model.loading import build_task_aware_sam, load_backbone


@pytest.fixture(scope="module")
def vit_b():
    torch.manual_seed(0)
    return load_backbone("vit_b")  # random init, no checkpoint


def _linears(sam, prefix):
    return {n: m for n, m in sam.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix)}


@pytest.mark.parametrize("sam_type, tail", [("vit_tiny", 1), ("vit_b", 2)])
def test_discovery_finds_every_decoder_linear_and_the_tail_blocks(sam_type, tail, vit_b):
    backbone = vit_b if sam_type == "vit_b" else load_backbone("vit_tiny")
    sam = backbone.model
    targets = backbone.find_targets(LoraConfig(), tail)
    names = {t.name for t in targets}
    decoder = _linears(sam, "mask_decoder.transformer.")
    assert set(decoder) <= names  # every attention projection and MLP Linear of the decoder
    assert len(decoder) == 2 * (4 + 4 + 4 + 2) + 4

    depth = len(sam.image_encoder.blocks)
    tail_blocks = range(depth - tail, depth)
    encoder = {n for n in names if n.startswith("image_encoder.")}
    expected = {f"image_encoder.blocks.{b}.{leaf}" for b in tail_blocks for leaf in ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2")}
    assert encoder == expected
    assert len(targets) == len(decoder) + len(expected)
    for t in targets:  # shapes are read from the model, never assumed
        module = sam.get_submodule(t.name)
        assert (t.in_features, t.out_features) == (module.in_features, module.out_features)


def test_cross_attention_targets_have_the_downsampled_shape(vit_b):
    targets = {t.name: t for t in vit_b.find_targets(LoraConfig(), 2)}
    q = targets["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj"]
    out = targets["mask_decoder.transformer.layers.0.cross_attn_token_to_image.out_proj"]
    assert (q.in_features, q.out_features) == (256, 128)
    assert (out.in_features, out.out_features) == (128, 256)
    qkv = targets["image_encoder.blocks.11.attn.qkv"]
    assert (qkv.in_features, qkv.out_features) == (768, 2304)


def test_component_flags_add_and_remove_targets(vit_b):
    decoder_only = vit_b.find_targets(LoraConfig(image_encoder=False), 0)
    assert not any(t.name.startswith("image_encoder") for t in decoder_only)
    with_heads = vit_b.find_targets(LoraConfig(output_mlps=True, iou_head=True), 2)
    extra = {t.name for t in with_heads} - {t.name for t in vit_b.find_targets(LoraConfig(), 2)}
    assert extra == set(_linears(vit_b.model, "mask_decoder.output_hypernetworks_mlps")) | set(
        _linears(vit_b.model, "mask_decoder.iou_prediction_head")
    )
    assert len(extra) == 4 * 3 + 3


def test_no_base_parameter_is_trainable_and_counts_add_up():
    model = build_task_aware_sam(default_config("vit_tiny"))
    assert not any(p.requires_grad for p in model.sam.parameters())
    counts = model.parameter_counts()
    trainable = sum(p.numel() for p in model.trainable_modules().parameters())
    assert counts["trainable_params"] == trainable > 0
    assert counts["total_params"] == counts["sam_params"] + trainable
    assert 1_000_000 < counts["sam_params"] < 1_400_000  # the ~1.2 M vit_tiny preset


def test_train_mode_keeps_the_frozen_sam_in_eval_mode():
    model = build_task_aware_sam(ModelConfig(sam=SamConfig("vit_tiny")))
    model.train()
    assert model.hypernet.training and not model.sam.training
