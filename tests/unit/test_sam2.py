"""SAM 2.1 through the backbone seam: the package's own image path and decoder, gradients,
checkpoints, frames, targets and the verbs, on sam2_tiny (and sam2.1_hiera_t where a 1024-px pass
is cheap). The per-row LoRA guarantees run on every family's preset in test_lora.py."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from talora.backbones import build_backbone, detect_variant
from talora.config import LoraConfig, default_config
from talora.backbones.variants import get_variant

ATOL = 1e-8


@pytest.fixture
def sam2_model(text_encoder, float64):
    """An untrained sam2_tiny TaskAwareSam in float64."""
    from talora.model.loading import build_task_aware_sam

    torch.manual_seed(0)
    return float64(build_task_aware_sam(default_config("sam2_tiny"), text_encoder))


def _image(seed=0, side=256):
    return torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _reference_decoder(backbone, embedding, coords, labels):
    """The package's MaskDecoder.forward (multimask) on one packed embedding, high-res maps unpacked."""
    from talora.core.lora import use_adapter

    d = backbone.decoder_dim
    image_embedding, s8, s4 = embedding.split([d, d, 2 * d], dim=1)
    with use_adapter(backbone.model, None):
        sparse, dense = backbone.model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        return backbone.model.sam_mask_decoder(
            image_embeddings=image_embedding, image_pe=backbone.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
            repeat_image=True, high_res_features=[F.pixel_shuffle(s4, 4), F.pixel_shuffle(s8, 2)])[:2]


@pytest.mark.parametrize("name, images", [("sam2_tiny", 2), ("sam2.1_hiera_t", 1)])
def test_trunk_then_tail_is_the_packages_own_image_path_at_every_split(name, images):
    torch.manual_seed(0)
    backbone = build_backbone(name)
    side = backbone.image_size
    x = torch.cat([_image(i, side).float() for i in range(images)])
    with torch.no_grad():
        whole = backbone.embed_image(x)  # SAM2Base.forward_image + no_mem_embed, packed
        assert whole.shape == (images, 4 * backbone.decoder_dim, side // 16, side // 16)
        for k in (0, get_variant(name).tail_blocks):
            trunk = backbone.embed_trunk(x, k)
            assert trunk.shape == (images, side // 32, side // 32, backbone.trunk_dim)  # one tensor per image
            torch.testing.assert_close(backbone.embed_tail(trunk, k), whole, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at most 1 tail block"):
        backbone.embed_trunk(x, 2)  # the tail stays inside the last stage


def test_zero_adapter_equals_the_base_sam2_in_the_tail_and_the_decoder(sam2_model, make_adapter):
    backbone = sam2_model.backbone
    image = _image()
    zero = make_adapter(sam2_model.targets, rows=3, zero_b=True)
    embeddings = sam2_model.embed_tail(sam2_model.embed_trunk(image).expand(3, -1, -1, -1), zero)
    torch.testing.assert_close(embeddings, backbone.embed_image(image).expand(3, -1, -1, -1), atol=ATOL, rtol=0)

    coords = torch.rand(3, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 256
    labels = torch.tensor([[1, 0]] * 3)
    out = sam2_model.decode(embeddings, zero, coords, labels)
    masks, iou = _reference_decoder(backbone, embeddings[:1], coords, labels)
    assert out.masks.shape == masks.shape == (3, 3, 64, 64)
    torch.testing.assert_close(out.masks, masks, atol=1e-6, rtol=0)  # points are encoded in float32 by both
    torch.testing.assert_close(out.iou_predictions, iou, atol=1e-6, rtol=0)


def test_mask_loss_gradients_reach_the_hypernet(sam2_model):
    sam2_model.train()
    adapter = sam2_model.adapters(["segment vehicles", "segment fruit"])
    with torch.no_grad():  # a non-zero Delta W, so every hypernet layer is on the gradient's path
        for head in sam2_model.hypernet.heads.values():
            head.weight.normal_(0, 0.01)
    adapter = sam2_model.adapters(["segment vehicles", "segment fruit"])
    out = sam2_model.decode(sam2_model.embed_tail(sam2_model.embed_trunk(_image()).expand(2, -1, -1, -1), adapter),
                            adapter)
    F.binary_cross_entropy_with_logits(out.masks[:, 0], torch.zeros_like(out.masks[:, 0])).backward()
    grads = {n: p.grad for n, p in sam2_model.hypernet.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "heads" in n)
    assert not any(p.grad is not None for p in sam2_model.sam.parameters())  # the SAM stays frozen


def test_targets_are_the_tail_blocks_and_the_decoder_with_the_same_patterns_as_sam():
    backbone = build_backbone("sam2_tiny")
    targets = backbone.find_targets(LoraConfig(), 1)
    encoder = [t.name for t in targets if t.component == "image_encoder"]
    assert encoder == [f"image_encoder.trunk.blocks.5.{p}" for p in ("attn.qkv", "attn.proj", "mlp.layers.0",
                                                                     "mlp.layers.1")]
    decoder = [t for t in targets if t.component == "mask_decoder"]
    assert decoder and all(t.name.startswith("sam_mask_decoder.transformer.") for t in decoder)
    assert any(t.name.endswith("mlp.layers.0") for t in decoder)  # "lin1" names SAM 2's MLP Linears too
    assert len({(t.depth, t.module_type) for t in targets}) == len(targets)


def test_official_style_checkpoints_load_weights_only_and_another_variant_is_refused(tmp_path, s3):
    from talora.model.loading import load_backbone, save_backbone

    torch.manual_seed(0)
    backbone = build_backbone("sam2_tiny")
    state = backbone.base_state_dict()
    assert detect_variant(state) == "sam2_tiny"
    # As the official sam2.1_hiera_*.pt: {"model": ...} with the video modules' weights too.
    official = {"model": {**state, "memory_attention.layers.0.linear1.weight": torch.zeros(2, 2),
                          "maskmem_tpos_enc": torch.zeros(7, 1, 1, 64)}}
    torch.save(official, tmp_path / "sam2_tiny.pt")
    loaded = load_backbone("sam2_tiny", str(tmp_path / "sam2_tiny.pt"))
    for k, v in loaded.base_state_dict().items():
        assert torch.equal(v, state[k])
    save_backbone(backbone, "s3://talora-test/sam2_tiny.safetensors", s3)
    again = load_backbone("sam2_tiny", "s3://talora-test/sam2_tiny.safetensors", s3)
    assert all(torch.equal(v, state[k]) for k, v in again.base_state_dict().items())
    with pytest.raises(ValueError, match=r"has keys for sam2_tiny, but --sam-type sam2.1_hiera_t was given"):
        load_backbone("sam2.1_hiera_t", str(tmp_path / "sam2_tiny.pt"))
    with pytest.raises(ValueError, match=r"has keys for vit_tiny, but --sam-type sam2_tiny was given"):
        load_backbone("sam2_tiny", _vit_tiny_checkpoint(tmp_path))  # another family's checkpoint


def _vit_tiny_checkpoint(tmp_path):
    from talora.model.loading import save_backbone

    path = str(tmp_path / "vit_tiny.safetensors")
    save_backbone(build_backbone("vit_tiny"), path)
    return path


def test_frames_stretch_to_the_square_input_and_map_points_boxes_and_masks_there():
    from talora.backbones.frames import image_resizer

    backbone = build_backbone("sam2_tiny")
    assert image_resizer("sam2_tiny")(np.zeros((30, 60, 3), np.uint8)).shape == (256, 256, 3)
    original = (64, 128)  # H, W -> 256 x 256: x scales by 2, y by 4
    assert np.allclose(backbone.apply_coords(np.array([[128.0, 32.0]]), original), [[256.0, 128.0]])
    assert np.allclose(backbone.apply_boxes(np.array([[0.0, 0.0, 64.0, 32.0]]), original), [[0, 0, 128, 128]])
    mask = np.zeros(original, bool)
    mask[:32] = True  # the top half of the image is the top half of the frame
    target = backbone.lowres_target(mask, (256, 256))
    assert target.shape == (64, 64) and target[:31].min() == 1.0 and target[33:].max() == 0.0
    logits = torch.zeros(1, 1, 64, 64)
    assert backbone.postprocess_masks(logits, (256, 256), original).shape == (1, 1, 64, 128)


def test_talora_info_lists_the_sam2_targets(capsys):
    from talora.cli.main import main

    assert main(["info", "--sam-type", "sam2.1_hiera_t", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    names = [t["name"] for t in info["targets"]]
    assert "image_encoder.trunk.blocks.11.attn.qkv" in names and "image_encoder.trunk.blocks.10.attn.qkv" not in names
    assert any(n.startswith("sam_mask_decoder.transformer.layers.0.") for n in names)


def test_a_pretraining_step_on_sam2_tiny_trains_every_part_and_the_heads(tmp_path):
    from talora.data.coco import CocoDataset
    from talora.data.synthetic import write_demo_dataset
    from talora.train.config import TrainConfig
    from talora.train.pretrain import ImageMemo, PretrainStep, build_pretrain_batch, label_vocab

    dataset = CocoDataset.load(write_demo_dataset(str(tmp_path), num_train=3, num_val=1, seed=5)["train"])
    torch.manual_seed(0)
    backbone = build_backbone("sam2_tiny")
    memo = ImageMemo(backbone, dataset, label_vocab(dataset), None)  # cell targets on the packed trunk's grid
    step = PretrainStep(backbone, 1, memo.vocab)
    backbone.model.requires_grad_(True)
    batch = build_pretrain_batch([memo(i) for i in dataset.image_ids], np.random.default_rng(2), 4, 0.5,
                                 backbone.image_size)
    out = step(batch, TrainConfig(train_annotations="x", mode="pretrain"))
    out["loss"].backward()
    assert {"loss_aux_category", "loss_points", "loss_boxes"} <= set(out)
    sam = backbone.model
    for name, p in (("trunk", sam.image_encoder.trunk.blocks[0].attn.qkv.weight),
                    ("tail", sam.image_encoder.trunk.blocks[-1].attn.qkv.weight),
                    ("high-res path", sam.sam_mask_decoder.conv_s0.weight),
                    ("decoder", sam.sam_mask_decoder.transformer.layers[0].self_attn.q_proj.weight),
                    ("category head", step.heads["category"].weight)):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_talora_adapter_and_predict_take_sam2_tiny(tmp_path, capsys):
    from PIL import Image

    from talora.model.files import load_adapter
    from talora.cli.main import main

    out = tmp_path / "adapter.safetensors"
    assert main(["adapter", "--prompt", "segment vehicles", "--sam-type", "sam2_tiny", "--untrained", "--out", str(out)]) == 0
    adapter, header = load_adapter(str(out), sam_type="sam2_tiny")
    assert any("image_encoder.trunk.blocks.5." in n for n in adapter.weights)  # the tail block of sam2_tiny
    assert all(torch.count_nonzero(adapter.delta_weight(n)) == 0 for n in adapter.weights)
    with pytest.raises(ValueError, match="sam2_tiny"):
        load_adapter(str(out), sam_type="vit_tiny")  # an adapter names its base variant

    image = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)).save(image)
    capsys.readouterr()
    assert main(["predict", "--image", str(image), "--prompt", "segment vehicles", "--sam-type", "sam2_tiny",
                 "--untrained", "--box", "10,5,30,20", "--presence-thresh", "1", "--out", str(tmp_path / "o.png")]) == 0
    assert "'segment vehicles': 0 semantic mask, 1 instance(s)" in capsys.readouterr().out
