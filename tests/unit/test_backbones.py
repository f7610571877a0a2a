"""The backbone seam: every registered variant answers the contract the rest of talora relies on."""

import numpy as np
import pytest
import torch

from talora.backbones import build_backbone, detect_variant
from talora.backbones.frames import image_resizer
from talora.backbones.variants import FAMILIES, SAM_TYPES, VARIANTS, cpu_preset, family_of, get_variant, largest
from talora.config import LoraConfig, default_config

BUILDABLE_HERE = ("vit_tiny", "vit_b", "sam2_tiny", "sam3_tiny")  # vit_l / vit_h / hiera_l build too, but take GBs on a CPU


@pytest.fixture(scope="module")
def backbones():
    torch.manual_seed(0)
    return {name: build_backbone(name) for name in BUILDABLE_HERE}


def test_every_variant_is_registered_with_its_frame_and_default_tail():
    assert {"vit_tiny", "vit_b", "vit_l", "vit_h", "sam2_tiny", "sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+",
            "sam2.1_hiera_l", "sam3_tiny", "sam3"} <= set(SAM_TYPES)
    image = np.zeros((30, 60, 3), np.uint8)
    for name in SAM_TYPES:
        variant = get_variant(name)
        resized = image_resizer(name)(image)  # the CPU stage: no model is built
        assert max(resized.shape[:2]) == variant.image_size and resized.shape[2] == 3
        assert default_config(name).tail_blocks == variant.tail_blocks >= 1
    with pytest.raises(ValueError, match="unknown SAM variant 'vit_x'"):
        get_variant("vit_x")


@pytest.mark.parametrize("name", BUILDABLE_HERE)
def test_a_built_variant_is_frozen_and_its_weights_name_it(backbones, name):
    backbone = backbones[name]
    assert backbone.variant.name == name and backbone.image_size == get_variant(name).image_size
    assert not any(p.requires_grad for p in backbone.model.parameters()) and not backbone.model.training
    assert detect_variant(backbone.base_state_dict()) == name
    assert backbone.lowres_size == 4 * backbone.embedding_size


# The full-size vit_b's 1024-px passes (~15 s of CPU) are in the slow tier; the CPU presets in `make test`.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if not get_variant(n).cpu_preset else n
                                  for n in BUILDABLE_HERE])
def test_trunk_then_tail_is_the_whole_encoder_at_every_split(backbones, name):
    backbone = backbones[name]
    x, input_size = backbone.preprocess(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    assert x.shape == (3, backbone.image_size, backbone.image_size)
    with torch.no_grad():
        whole = backbone.embed_image(x[None])  # the family's own image path
        # Every split on the CPU presets; the full-size vit_b (seven 1024-px passes otherwise) at its default one.
        splits = (0, 1, get_variant(name).tail_blocks) if get_variant(name).cpu_preset else (get_variant(name).tail_blocks,)
        for k in splits:
            trunk = backbone.embed_trunk(x[None], k)
            assert trunk.shape[1:] == (backbone.trunk_size, backbone.trunk_size, backbone.trunk_dim)
            torch.testing.assert_close(backbone.embed_tail(trunk, k), whole, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", BUILDABLE_HERE)
def test_targets_cover_the_tail_blocks_and_the_decoder_only(backbones, name):
    backbone = backbones[name]
    k = get_variant(name).tail_blocks
    targets = backbone.find_targets(LoraConfig(), k)
    blocks = {"sam1": "image_encoder.blocks", "sam2": "image_encoder.trunk.blocks",
              "sam3": "backbone.vision_backbone.trunk.blocks"}[get_variant(name).family]
    tail = {f"{blocks}.{b}." for b in range(backbone.num_blocks - k, backbone.num_blocks)}
    encoder = [t for t in targets if t.component == "image_encoder"]
    assert encoder and all(any(t.name.startswith(p) for p in tail) for t in encoder)
    # SAM 3's detector: its fusion encoder and DETR decoder too (the SAM3-LoRA kit's components).
    detr = {"detr_encoder", "detr_decoder"} if backbone.detector else set()
    assert {t.component for t in targets} == {"image_encoder", "mask_decoder"} | detr
    assert len({(t.depth, t.module_type) for t in targets}) == len(targets)  # the hypernet tells them apart
    assert not backbone.find_targets(LoraConfig(image_encoder=False, mask_decoder=False, detr_encoder=False,
                                                detr_decoder=False), k)


def test_the_trunk_digest_follows_exactly_the_trunk_weights(backbones):
    backbone = build_backbone("vit_tiny", backbones["vit_tiny"].base_state_dict())
    before = backbone.trunk_digest(1)
    assert backbone.trunk_digest(2) != before  # another split caches other features
    with torch.no_grad():
        backbone.model.image_encoder.blocks[-1].mlp.lin1.weight.add_(1.0)  # a tail weight
        backbone.model.mask_decoder.iou_token.weight.add_(1.0)
    assert backbone.trunk_digest(1) == before
    with torch.no_grad():
        backbone.model.image_encoder.blocks[0].attn.qkv.weight.add_(1.0)  # a trunk weight
    assert backbone.trunk_digest(1) != before


def test_frames_map_points_boxes_and_masks_where_the_image_went(backbones):
    backbone = backbones["vit_tiny"]
    original = (64, 128)  # H, W: resized to 128 x 256, padded to 256 x 256 at the bottom
    assert np.allclose(backbone.apply_coords(np.array([[128.0, 32.0]]), original), [[256.0, 64.0]])
    assert np.allclose(backbone.apply_boxes(np.array([[0.0, 0.0, 64.0, 32.0]]), original), [[0, 0, 128, 64]])
    mask = np.zeros(original, bool)
    mask[:32] = True  # the top half of the image
    target = backbone.lowres_target(mask, (128, 256))  # (L, L) = (64, 64)
    assert target.shape == (64, 64)
    # the image fills rows 0-127 of 256, so its top half is rows 0-63: low-res rows 0-15 (one row blurred)
    assert target[:15].min() == 1.0 and 0 < target[15].min() < 1 and target[17:].max() == 0.0


def test_the_cpu_resize_gives_segment_anythings_pixels_without_importing_torch():
    import subprocess
    import sys

    from segment_anything.utils.transforms import ResizeLongestSide

    rng = np.random.default_rng(0)
    for shape in ((30, 60, 3), (333, 257, 3), (1000, 999, 3)):
        image = (rng.random(shape) * 255).astype(np.uint8)
        for side in (256, 1024):
            assert np.array_equal(image_resizer("vit_tiny" if side == 256 else "vit_h")(image),
                                  ResizeLongestSide(side).apply_image(image))
    # What a decode task's worker imports: no torch (its import would slow every fresh worker).
    code = ("import sys, numpy as np; from talora.backbones.frames import decode_stage, image_resizer; "
            "from talora.batch.pipeline import read_image_bytes; image_resizer('vit_h')(np.zeros((8, 8, 3), np.uint8)); "
            "decode_stage({'bytes': [b'x'], 'error': [''], 'uri': ['a']}, 100, 'vit_h'); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_family_entry_names_what_its_module_and_the_frames_provide():
    import importlib

    from talora.backbones.frames import FRAMES

    assert {v.family for v in VARIANTS.values()} == set(FAMILIES)
    for name, family in FAMILIES.items():
        module = importlib.import_module(f"talora.backbones.{name}")
        assert issubclass(module.Backbone, __import__("talora.backbones.base", fromlist=["Backbone"]).Backbone)
        assert callable(module.build_model) and callable(module.detect_variant)
        assert family.frame in FRAMES and all(importlib.util.find_spec(m) for m in family.modules)
        tiny, big = get_variant(cpu_preset(name)), get_variant(largest(name))
        assert tiny.cpu_preset and tiny.family == big.family == name and not big.cpu_preset and big.image_size >= 1008
        assert family_of(big.name) is family and big.name in family.peft_base.format(variant=big.name)


def test_a_family_installed_without_its_dependencies_is_in_make_setup_and_named_when_missing(monkeypatch):
    import dataclasses
    from pathlib import Path

    from talora.backbones import family_module
    from talora.backbones import variants

    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    no_deps = [f for f in FAMILIES.values() if f.no_deps]
    assert no_deps and all(f"'{r}'" in makefile for f in no_deps for r in f.requirements)
    family = no_deps[0]
    monkeypatch.setitem(variants.FAMILIES, family.name,
                        dataclasses.replace(family, modules=(*family.modules, "talora_no_such_module")))
    with pytest.raises(ModuleNotFoundError, match=f"{family.title} needs talora_no_such_module.*pip install --no-deps"):
        family_module(family.name)
    vit_tiny = build_backbone("vit_tiny").base_state_dict()
    assert detect_variant(vit_tiny) == "vit_tiny"  # the other families' checkpoints are still told apart
