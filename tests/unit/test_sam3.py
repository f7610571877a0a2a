"""SAM 3 through the backbone seam: the package's own image path and detector, gradients,
checkpoints, targets and the predictor's detector path, on sam3_tiny. The per-row LoRA guarantees
(zero adapter, mixed batches, merge / unmerge) run on every family's preset in test_lora.py."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from talora.backbones import build_backbone, detect_variant
from talora.config import LoraConfig, default_config

ATOL = 1e-8
PROMPTS = ["segment vehicles", "segment red fruit"]


@pytest.fixture(scope="module")
def sam3_model(text_encoder):
    """An untrained sam3_tiny TaskAwareSam in float64."""
    from talora.model.loading import build_task_aware_sam
    from tests.conftest import as_float64

    torch.manual_seed(0)
    return as_float64(build_task_aware_sam(default_config("sam3_tiny"), text_encoder))


def _image(seed=0, side=224):
    return torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _package_grounding(model, images, prompts):
    """The package's own path: `SAM3VLBackbone.forward_image` / `forward_text`, then
    `Sam3Image.forward_grounding` with no geometric prompt (built in float64, as talora builds it)."""
    from sam3.model.data_misc import FindStage
    from sam3.model.geometry_encoders import Prompt

    from talora.backbones.sam3 import _package_compat

    sam, n = model.sam, len(prompts)
    backbone_out = {**sam.backbone.forward_image(images), **sam.backbone.forward_text(prompts, device="cpu")}
    find = FindStage(img_ids=torch.arange(n), text_ids=torch.arange(n), input_boxes=None, input_boxes_mask=None,
                     input_boxes_label=None, input_points=None, input_points_mask=None)
    empty = Prompt(box_embeddings=torch.zeros(0, n, 4, dtype=torch.float64), box_mask=torch.zeros(n, 0, dtype=torch.bool),
                   point_embeddings=torch.zeros(0, n, 2, dtype=torch.float64))
    with _package_compat(torch.float64):
        return sam.forward_grounding(backbone_out=backbone_out, find_input=find, find_target=None, geometric_prompt=empty)


def test_zero_adapter_equals_sam3s_own_image_path_and_detector(sam3_model, make_adapter):
    images = torch.cat([_image(0), _image(1)])
    zero = make_adapter(sam3_model.targets, rows=2, zero_b=True)
    with torch.no_grad():
        embeddings = sam3_model.embed_tail(sam3_model.embed_trunk(images), zero)
        found = sam3_model.detect(embeddings, zero, PROMPTS)
        own = _package_grounding(sam3_model, images, PROMPTS)
    assert found.masks.shape == (2, 20, 64, 64) and found.semantic.shape == (2, 64, 64)
    torch.testing.assert_close(found.masks, own["pred_masks"], atol=ATOL, rtol=0)
    torch.testing.assert_close(found.scores, own["pred_logits"][..., 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(found.boxes, own["pred_boxes"], atol=ATOL, rtol=0)
    torch.testing.assert_close(found.presence_logits, own["presence_logit_dec"][:, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(found.semantic, own["semantic_seg"][:, 0], atol=ATOL, rtol=0)
    assert not torch.allclose(found.masks[0], found.masks[1])  # two images, two prompts: the rows differ


def test_rows_index_the_embeddings_as_copies_of_them_would(sam3_model, make_adapter):
    adapter = make_adapter(sam3_model.targets, rows=3)
    with torch.no_grad():
        embedding = sam3_model.embed_tail(sam3_model.embed_trunk(_image()))  # one image, three prompts
        rows = torch.tensor([0, 0, 0])
        got = sam3_model.detect(embedding, adapter, PROMPTS + ["segment everything"], rows=rows)
        copied = sam3_model.detect(embedding[rows], adapter, PROMPTS + ["segment everything"])
    torch.testing.assert_close(got.masks, copied.masks, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.scores, copied.scores, atol=ATOL, rtol=0)


def test_detector_loss_gradients_reach_the_hypernet_and_the_sam_stays_frozen(sam3_model):
    from talora.core.lora import Adapter

    hypernet = sam3_model.hypernet
    untrained = {k: v.clone() for k, v in hypernet.state_dict().items()}
    sam3_model.train()
    try:
        with torch.no_grad():  # a non-zero Delta W, so every hypernet layer is on the gradient's path
            for head in hypernet.heads.values():
                head.weight.normal_(0, 0.01)
        text = torch.randn(2, hypernet.text_proj[0].in_features, dtype=torch.float64)
        adapter: Adapter = hypernet(text)
        trunk = sam3_model.embed_trunk(_image()).expand(2, -1, -1, -1)
        found = sam3_model.detect(sam3_model.embed_tail(trunk, adapter), adapter, PROMPTS)
        loss = F.binary_cross_entropy_with_logits(found.masks, torch.zeros_like(found.masks)) \
            + found.scores.sigmoid().mean() + found.presence_logits.sigmoid().mean()
        loss.backward()
        grads = {n: p.grad for n, p in hypernet.named_parameters() if "heads" in n}
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
        assert not any(p.grad is not None for p in sam3_model.sam.parameters())
    finally:  # the module's other tests run the untrained hypernet
        hypernet.load_state_dict(untrained)
        hypernet.zero_grad(set_to_none=True)
        sam3_model.eval()


def test_targets_span_the_kits_components_by_flag_in_module_order():
    backbone = build_backbone("sam3_tiny")
    targets = backbone.find_targets(LoraConfig(), 1)
    by_component = {}
    for t in targets:
        by_component.setdefault(t.component, []).append(t.name)
    assert by_component["image_encoder"] == [f"backbone.vision_backbone.trunk.blocks.3.{p}"
                                             for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert by_component["detr_encoder"] == ["transformer.encoder.layers.0.linear1", "transformer.encoder.layers.0.linear2"]
    assert len(by_component["detr_decoder"]) == 4 and len(by_component["mask_decoder"]) == 3
    assert all(t.row_dim == (1 if t.component == "detr_decoder" else 0) for t in targets)
    assert len({(t.depth, t.module_type) for t in targets}) == len(targets)
    assert [t.depth for t in targets] == sorted(t.depth for t in targets)
    # Each flag takes its component out; the scoring heads come in with iou_head.
    only = backbone.find_targets(LoraConfig(detr_encoder=False, detr_decoder=False), 1)
    assert {t.component for t in only} == {"image_encoder", "mask_decoder"}
    scoring = [t for t in backbone.find_targets(LoraConfig(iou_head=True), 1) if t.component == "iou_head"]
    assert {t.name for t in scoring} >= {"dot_prod_scoring.hs_proj", "dot_prod_scoring.prompt_proj"}
    assert {t.row_dim for t in scoring if t.name == "dot_prod_scoring.hs_proj"} == {1}


def test_official_style_checkpoints_load_weights_only_and_another_variant_is_refused(tmp_path, s3):
    from talora.model.loading import load_backbone, save_backbone

    torch.manual_seed(0)
    backbone = build_backbone("sam3_tiny")
    state = backbone.base_state_dict()
    assert detect_variant(state) == "sam3_tiny"
    # As the official sam3.pt: {"model": ...}, the image model under "detector.", the video tracker beside it.
    official = {"model": {**{f"detector.{k}": v for k, v in state.items()},
                          "tracker.maskmem_tpos_enc": torch.zeros(7, 1, 1, 64)}}
    torch.save(official, tmp_path / "sam3_tiny.pt")
    loaded = load_backbone("sam3_tiny", str(tmp_path / "sam3_tiny.pt"))
    assert all(torch.equal(v, state[k]) for k, v in loaded.base_state_dict().items())
    save_backbone(backbone, "s3://talora-test/sam3_tiny.safetensors", s3)
    again = load_backbone("sam3_tiny", "s3://talora-test/sam3_tiny.safetensors", s3)
    assert all(torch.equal(v, state[k]) for k, v in again.base_state_dict().items())
    with pytest.raises(ValueError, match=r"has keys for sam3_tiny, but --sam-type sam3 was given"):
        load_backbone("sam3", str(tmp_path / "sam3_tiny.pt"))
    vit_tiny = str(tmp_path / "vit_tiny.safetensors")
    save_backbone(build_backbone("vit_tiny"), vit_tiny)
    with pytest.raises(ValueError, match=r"has keys for vit_tiny, but --sam-type sam3_tiny was given"):
        load_backbone("sam3_tiny", vit_tiny)


def test_the_predictor_keeps_queries_by_score_times_presence_and_gates_absent_tasks(sam3_model):
    from talora.predict.predictor import PredictConfig, TaskAwarePredictor

    model = sam3_model.float()
    try:
        image = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
        every = TaskAwarePredictor(model, PredictConfig(score_thresh=0.0, presence_thresh=0.0, nms_thresh=1.0,
                                                        mask_nms_thresh=1.0))
        found = every.predict(image, PROMPTS)
        assert set(found) == set(PROMPTS)
        for detections in found.values():
            kinds = [d.kind for d in detections]
            assert kinds[0] == "semantic" and set(kinds[1:]) == {"instance"}
            scores = [d.score for d in detections[1:]]
            assert scores == sorted(scores, reverse=True) and all(d.rle["size"] == [90, 120] for d in detections)
        # Scored as Sam3Processor scores a query: sigmoid(logit) x presence (the untrained hypernet's
        # adapters are Delta W = 0, so the base detector gives the same numbers).
        with torch.no_grad():
            embeddings = model.embed_tail(every.trunk(every.resize(image)).expand(2, -1, -1, -1))
            raw = model.detect(embeddings, None, PROMPTS)
        expected = (raw.scores.sigmoid() * raw.presence_logits.sigmoid()[:, None])[0]
        assert max(d.score for d in found[PROMPTS[0]][1:]) == pytest.approx(float(expected.max()), abs=1e-5)
        # A presence threshold above the task's presence: no semantic mask and no instance for it.
        gated = TaskAwarePredictor(model, PredictConfig(score_thresh=0.0, prompt_thresholds=((PROMPTS[0], 1.0),)))
        assert gated.predict(image, PROMPTS)[PROMPTS[0]] == []
        with pytest.raises(ValueError, match="sam3_tiny is a detector"):
            every.predict(image, PROMPTS, boxes=[{"bbox": [0, 0, 10, 10], "prompt": None}])
    finally:
        model.double()


def test_a_sam3_hypernet_and_its_base_round_trip_through_s3_and_label_alike(s3, text_encoder):
    import dataclasses

    from talora.model.loading import build_task_aware_sam, load_task_aware_sam, save_backbone, save_hypernet
    from talora.predict.predictor import PredictConfig, TaskAwarePredictor

    torch.manual_seed(0)
    base = "s3://talora-test/sam3_tiny.safetensors"
    config = default_config("sam3_tiny")
    model = build_task_aware_sam(config, text_encoder)
    with torch.no_grad():  # a trained-looking hypernet: Delta W != 0
        for head in model.hypernet.heads.values():
            head.weight.normal_(0, 0.01)
    save_backbone(model.backbone, base, s3)
    model.config = dataclasses.replace(config, sam=dataclasses.replace(config.sam, checkpoint=base))
    save_hypernet(model, "s3://talora-test/hypernet.safetensors", s3)
    again = load_task_aware_sam("s3://talora-test/hypernet.safetensors", text_encoder=text_encoder, storage=s3)
    assert [t.name for t in again.targets] == [t.name for t in model.targets]
    image = np.random.default_rng(1).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    open_thresholds = PredictConfig(score_thresh=0.0, presence_thresh=0.0)
    first = TaskAwarePredictor(model.eval(), open_thresholds).predict(image, PROMPTS)
    second = TaskAwarePredictor(again, open_thresholds).predict(image, PROMPTS)
    assert first[PROMPTS[0]] and [[(d.kind, d.rle, round(d.score, 5)) for d in first[p]] for p in PROMPTS] == \
        [[(d.kind, d.rle, round(d.score, 5)) for d in second[p]] for p in PROMPTS]
