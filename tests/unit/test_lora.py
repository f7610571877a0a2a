"""Equivalence tests for per-row LoRA on the tiny presets of every backbone family, in float64 (atol 1e-8)."""

import copy

import pytest
import torch
from torch import nn

from talora.core.lora import (
    Adapter,
    LoraLinear,
    inject_lora,
    lora_layers,
    merge_adapter,
    remove_lora,
    unmerge_adapter,
    use_adapter,
)
from talora.config import LoraConfig
from talora.backbones.variants import FAMILIES, VARIANTS
from talora.backbones.sam1 import Backbone, _build_sam_tiny, build_sam_vit_tiny

ATOL = 1e-8


def _plain_sam(model):
    """The base SAM without LoRA layers, as segment_anything built it."""
    sam = copy.deepcopy(model.sam)
    remove_lora(sam)
    return sam


def _points(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(rows, 2, 2, generator=g, dtype=torch.float64) * 256
    labels = torch.tensor([[1, 0]] * rows)
    return coords, labels


def _image(seed=0, side=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, side, side, generator=g, dtype=torch.float64)


PRESETS = [v.name for v in VARIANTS.values() if v.cpu_preset]
DECODER_PRESETS = [n for n in PRESETS if not FAMILIES[VARIANTS[n].family].detector]  # point and box prompts
PROMPTS = ("segment vehicles", "segment red fruit", "segment everything")


def _build(name, float64):
    from talora.config import default_config
    from talora.model.loading import build_task_aware_sam

    torch.manual_seed(0)
    model = float64(build_task_aware_sam(default_config(name)))
    model.image = lambda seed=0: _image(seed, model.backbone.image_size)  # an input of this preset's side
    return model


@pytest.fixture(params=PRESETS)
def preset_model(request, float64):
    """An untrained TaskAwareSam of each CPU preset (one per backbone family), in float64: the
    guarantees below hold for every family."""
    return _build(request.param, float64)


@pytest.fixture(params=DECODER_PRESETS)
def decoder_model(request, float64):
    """The presets whose decoder takes point prompts (a detector, SAM 3, takes none)."""
    return _build(request.param, float64)


def _heads(model, embeddings, adapter=None):
    """What follows the tail for rows of prompt-free queries, per family: the decoder's semantic
    rows (masks, IoU, presence) or the detector's (masks, scores, boxes, presence, semantic mask),
    row i with prompt i."""
    if model.backbone.detector:
        found = model.detect(embeddings, adapter, list(PROMPTS[: len(embeddings)]))
        return {k: getattr(found, k) for k in ("masks", "scores", "boxes", "presence_logits", "semantic")}
    out = model.decode(embeddings, adapter)
    return {"masks": out.masks, "iou_predictions": out.iou_predictions, "presence_logits": out.presence_logits}


def test_zero_adapter_trunk_plus_tail_equals_the_familys_own_image_path(preset_model, make_adapter):
    images = torch.cat([preset_model.image(0), preset_model.image(1)])
    zero = make_adapter(preset_model.targets, rows=2, zero_b=True)
    got = preset_model.embed_tail(preset_model.embed_trunk(images), zero)
    torch.testing.assert_close(got, preset_model.backbone.embed_image(images), atol=ATOL, rtol=0)


def test_zero_adapter_decoder_output_equals_base_sam(tiny_model, make_adapter):
    sam = _plain_sam(tiny_model)
    embedding = torch.randn(1, 64, 16, 16, dtype=torch.float64)
    coords, labels = _points(3)
    sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    ref_masks, ref_iou = sam.mask_decoder(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, True)

    zero = make_adapter(tiny_model.targets, rows=3, zero_b=True)
    out = tiny_model.decode(embedding.expand(3, -1, -1, -1), zero, coords, labels)
    assert out.masks.shape == ref_masks.shape == (3, 3, 64, 64)
    torch.testing.assert_close(out.masks, ref_masks, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.iou_predictions, ref_iou, atol=ATOL, rtol=0)


def test_zero_adapter_trunk_plus_tail_equals_base_image_encoder(tiny_model, make_adapter):
    sam = _plain_sam(tiny_model)
    images = torch.cat([_image(0), _image(1)])
    expected = sam.image_encoder(images)
    zero = make_adapter(tiny_model.targets, rows=2, zero_b=True)
    got = tiny_model.embed_tail(tiny_model.embed_trunk(images), zero)
    assert got.shape == expected.shape == (2, 64, 16, 16)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_nonzero_adapter_changes_tail_and_decoder(preset_model, make_adapter):
    trunk = preset_model.embed_trunk(preset_model.image())
    adapter = make_adapter(preset_model.targets)
    assert not torch.allclose(preset_model.embed_tail(trunk, adapter), preset_model.embed_tail(trunk))
    embedding = preset_model.embed_tail(trunk)
    assert not torch.allclose(_heads(preset_model, embedding, adapter)["masks"], _heads(preset_model, embedding)["masks"])


def test_a_detector_refuses_point_prompts_naming_itself(float64):
    detector = next(n for n in PRESETS if n not in DECODER_PRESETS)
    model = _build(detector, float64)
    embedding = model.embed_tail(model.embed_trunk(model.image()))
    coords, labels = _points(1)
    with pytest.raises(ValueError, match=f"{detector} is a detector"):
        model.decode(embedding, None, coords, labels)


def _run_rows(model, images, adapter, coords, labels):
    """Tail + decoder for P (image, prompt) rows with a per-row (or no) adapter."""
    trunk = model.embed_trunk(images)
    embeddings = model.embed_tail(trunk.expand(coords.shape[0], -1, -1, -1), adapter)
    return model.decode(embeddings, adapter, coords, labels)


def test_mixed_batch_rows_equal_each_row_alone_with_its_adapter_merged(preset_model, make_adapter):
    # Semantic rows (no point prompt): every op is float64, so single-row runs compare exactly.
    # A detector's rows also differ by their own text prompt: each row alone gets the same one.
    rows = [make_adapter(preset_model.targets, seed=s) for s in range(3)]
    trunk = preset_model.embed_trunk(preset_model.image())
    batched = _heads(preset_model, preset_model.embed_tail(trunk.expand(3, -1, -1, -1), Adapter.stack(rows)),
                     Adapter.stack(rows))
    detector = preset_model.backbone.detector
    for i, row in enumerate(rows):
        merge_adapter(preset_model.sam, row)
        embedding = preset_model.embed_tail(trunk)
        alone = (_heads(preset_model, embedding) if not detector else
                 vars(preset_model.detect(embedding, None, [PROMPTS[i]])))
        unmerge_adapter(preset_model.sam)
        for key, value in alone.items():
            torch.testing.assert_close(batched[key][i : i + 1], value, atol=ATOL, rtol=0, msg=key)
    # The rows really differ: a test of identical rows would prove nothing.
    assert not torch.allclose(batched["masks"][0], batched["masks"][1])


def test_mixed_batch_with_point_prompts_equals_the_merged_adapter_row_by_row(decoder_model, make_adapter):
    # SAM's PromptEncoder encodes points in float32 whatever the model dtype, and float32 rounding
    # depends on the batch shape; so each merged run uses the same 3-row batch and keeps row i.
    rows = [make_adapter(decoder_model.targets, seed=s) for s in range(3)]
    coords, labels = _points(3)
    batched = _run_rows(decoder_model, decoder_model.image(), Adapter.stack(rows), coords, labels)
    for i, row in enumerate(rows):
        merge_adapter(decoder_model.sam, row)
        merged = _run_rows(decoder_model, decoder_model.image(), None, coords, labels)
        unmerge_adapter(decoder_model.sam)
        torch.testing.assert_close(batched.masks[i], merged.masks[i], atol=ATOL, rtol=0)
        torch.testing.assert_close(batched.iou_predictions[i], merged.iou_predictions[i], atol=ATOL, rtol=0)
    assert not torch.allclose(batched.masks[0], batched.masks[1])


def test_shared_adapter_equals_the_same_adapter_expanded_per_row(decoder_model, make_adapter):
    shared = make_adapter(decoder_model.targets, seed=5)
    coords, labels = _points(2)
    a = _run_rows(decoder_model, decoder_model.image(), shared, coords, labels)
    b = _run_rows(decoder_model, decoder_model.image(), shared.expand(2), coords, labels)
    torch.testing.assert_close(a.masks, b.masks, atol=ATOL, rtol=0)


def test_per_row_tail_with_windowed_attention_equals_each_row_alone(make_adapter, float64):
    # SAM's windowed blocks fold windows into the batch axis (P-major); per-row LoRA must follow.
    from talora.config import ModelConfig
    from talora.model.task_aware_sam import TaskAwareSam, build_presence_head
    from talora.adapters.hypernet import TaskAwareHyperNet
    from talora.config import HyperNetConfig

    torch.manual_seed(0)
    sam = _build_sam_tiny(256, 16, 128, 4, 4, (1,), 64, 256, 4, window_size=6)  # block 3 windowed, padded 16->18
    backbone = Backbone(VARIANTS["vit_tiny"], sam)
    config = ModelConfig()
    targets = backbone.find_targets(config.lora, 1)
    hypernet = TaskAwareHyperNet(targets, HyperNetConfig(hidden_dim=32, num_layers=1, num_heads=4), 4, 2.0)
    model = float64(TaskAwareSam(backbone, targets, hypernet, build_presence_head(64), config))
    assert model.sam.image_encoder.blocks[3].window_size == 6

    rows = [make_adapter(targets, seed=s) for s in range(3)]
    trunk = model.embed_trunk(torch.cat([_image(0), _image(1), _image(2)]))
    batched = model.embed_tail(trunk, Adapter.stack(rows))
    for i, row in enumerate(rows):
        torch.testing.assert_close(batched[i : i + 1], model.embed_tail(trunk[i : i + 1], row), atol=ATOL, rtol=0)


def test_merge_then_unmerge_restores_the_weights(preset_model, make_adapter):
    before = {k: v.clone() for k, v in preset_model.sam.state_dict().items()}
    merge_adapter(preset_model.sam, make_adapter(preset_model.targets, seed=1))
    changed = [k for k, v in preset_model.sam.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(preset_model.targets)  # exactly one weight per target moved
    unmerge_adapter(preset_model.sam)
    for k, v in preset_model.sam.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-12, rtol=0)


def test_merge_refuses_non_finite_weights_and_leaves_the_model_unchanged(preset_model, make_adapter):
    adapter = make_adapter(preset_model.targets)
    last = preset_model.targets[-1].name
    a, b = adapter.weights[last]
    adapter.weights[last] = (a, torch.full_like(b, float("nan")))
    before = {k: v.clone() for k, v in preset_model.sam.state_dict().items()}
    with pytest.raises(ValueError, match="non-finite"):
        merge_adapter(preset_model.sam, adapter)
    for k, v in preset_model.sam.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_inject_and_remove_leave_the_base_module_exactly_as_it_was():
    torch.manual_seed(0)
    sam = build_sam_vit_tiny()
    targets = Backbone(VARIANTS["vit_tiny"], sam).find_targets(LoraConfig(), 1)  # the backbone as built
    reference = copy.deepcopy(sam)
    layers = inject_lora(sam, targets)
    assert len(layers) == len(targets) and all(isinstance(m, LoraLinear) for m in layers.values())
    assert inject_lora(sam, targets).keys() == layers.keys()  # idempotent
    remove_lora(sam)
    assert not lora_layers(sam)
    assert [type(m) for m in sam.modules()] == [type(m) for m in reference.modules()]
    ref_state = reference.state_dict()
    assert sam.state_dict().keys() == ref_state.keys()
    assert all(torch.equal(v, ref_state[k]) for k, v in sam.state_dict().items())


def test_use_adapter_clears_the_adapter_even_when_the_block_raises(preset_model, make_adapter):
    with pytest.raises(RuntimeError, match="boom"):
        with use_adapter(preset_model.sam, make_adapter(preset_model.targets)):
            raise RuntimeError("boom")
    assert all(layer.lora_A is None and layer.lora_B is None for layer in lora_layers(preset_model.sam).values())


def test_adapter_with_wrong_shapes_is_refused_naming_the_target(preset_model, make_adapter):
    adapter = make_adapter(preset_model.targets)
    name = preset_model.targets[0].name
    a, b = adapter.weights[name]
    adapter.weights[name] = (a[:, :-1], b)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        with use_adapter(preset_model.sam, adapter):
            pass


def test_lora_linear_without_adapter_is_the_base_linear():
    base = nn.Linear(8, 5).double()
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    assert torch.equal(LoraLinear(base)(x), base(x))


def test_decoder_rows_index_embeddings_and_a_grouped_adapter_equals_the_per_row_copies(decoder_model, make_adapter):
    # The instance pass: many point rows of a few (embedding, adapter) pairs, without copying either per row.
    # Three images, so a row reading another image's high-resolution maps (SAM 2) would show.
    decoder_model.eval()
    adapter = make_adapter(decoder_model.targets, rows=3)
    trunk = torch.cat([decoder_model.embed_trunk(decoder_model.image(seed)) for seed in range(3)])
    embeddings = decoder_model.embed_tail(trunk, adapter)
    rows = torch.tensor([0, 0, 1, 2, 2, 2])
    coords, labels = _points(len(rows))
    got = decoder_model.decode(embeddings, adapter, coords, labels, rows=rows)
    copied = decoder_model.decode(embeddings[rows], adapter.select(rows), coords, labels)
    torch.testing.assert_close(got.masks, copied.masks, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.iou_predictions, copied.iou_predictions, atol=ATOL, rtol=0)
    assert adapter.grouped(rows).groups == (0, 2, 3, 6)
    assert not torch.allclose(got.masks[0], got.masks[2])  # rows of different prompts differ


def test_a_grouped_adapter_takes_sorted_rows_for_inference_only(tiny_model, make_adapter):
    adapter = make_adapter(tiny_model.targets, rows=2)
    with pytest.raises(ValueError, match="sorted"):
        adapter.grouped(torch.tensor([1, 0]))
    layer = next(iter(lora_layers(tiny_model.sam).values()))
    layer.train()
    with use_adapter(tiny_model.sam, adapter.grouped(torch.tensor([0, 1]))), pytest.raises(RuntimeError, match="inference"):
        layer(torch.zeros(2, 1, layer.in_features, dtype=torch.float64))
