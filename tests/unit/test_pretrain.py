"""Pretraining pieces: label vocabularies, per-cell targets, prompt sampling, the step's gradients."""

import types

import numpy as np
import pytest
import torch

from talora.data.coco import CocoDataset
from talora.data.synthetic import write_demo_dataset
from talora.model.loading import load_backbone
from talora.io.storage import StorageOptions
from talora.train.config import TrainConfig, load_run_spec
from talora.train.loop import drop_gradients
from talora.train.modes import PretrainMode
from talora.train.optim import backward_and_step, build_optimizer, grad_scaler
from talora.train.pretrain import (
    BACKGROUND,
    ImageMemo,
    PretrainStep,
    build_pretrain_batch,
    interior_point,
    jitter_box,
    label_vocab,
    validate_pretrain,
)


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return write_demo_dataset(str(out), num_train=4, num_val=1, seed=5)


@pytest.fixture(scope="module")
def demo(demo_files):
    return CocoDataset.load(demo_files["train"])


@pytest.fixture(scope="module")
def memo(demo):
    torch.manual_seed(0)
    backbone = load_backbone("vit_tiny")
    return ImageMemo(backbone, demo, label_vocab(demo), None)


def test_vocab_has_background_first_categories_and_every_attribute_key(demo):
    vocab = label_vocab(demo)
    assert list(vocab) == ["category", "color"]
    assert vocab["category"][0] == BACKGROUND and vocab["category"][1:4] == ["car", "bus", "truck"]
    assert vocab["color"] == [BACKGROUND, "blue", "green", "purple", "red", "yellow"]


def test_cell_targets_are_area_shares_that_sum_to_one(demo, memo):
    image_id = demo.image_ids[0]
    entry = memo(image_id)
    grid = memo.grid
    for key, share in entry.cells.items():
        assert share.shape == (grid * grid, len(memo.vocab[key]))
        assert torch.allclose(share.sum(1), torch.ones(grid * grid), atol=1e-4)
    # the cell most covered by the first object carries that object's category
    first = demo.instances[image_id][0]
    column = memo.vocab["category"].index(first.category)
    instances = [i for i in demo.instances[image_id] if not i.iscrowd]
    cover = torch.nn.functional.adaptive_avg_pool2d(entry.masks[instances.index(first)].float()[None, None], grid).flatten()
    assert entry.cells["category"][int(cover.argmax()), column] >= float(cover.max()) - 1e-3
    assert entry.masks.shape[0] == len(instances) == entry.boxes.shape[0]


def test_points_fall_inside_their_instance_and_boxes_stay_near_theirs(demo, memo):
    rng = np.random.default_rng(0)
    entry = memo(demo.image_ids[1])
    L, size = entry.masks.shape[-1], memo.backbone.image_size
    for mask in entry.masks.float():
        for _ in range(20):
            x, y = interior_point(mask, rng, size)
            assert mask[int(y * L / size), int(x * L / size)] > 0.5
    for box in entry.boxes:
        jittered = jitter_box(box, rng, size)
        assert (jittered - box).abs().max() <= 5.0 + 1e-4
        assert jittered[0] <= jittered[2] and jittered[1] <= jittered[3]


def test_batches_split_prompts_into_point_and_box_rows(demo, memo):
    entries = [memo(i) for i in demo.image_ids]
    rng = np.random.default_rng(1)
    batch = build_pretrain_batch(entries, rng, prompts_per_image=3, box_fraction=0.5, size=memo.backbone.image_size)
    expected = sum(min(3, len(e.masks)) for e in entries)
    assert len(batch.point_image) + len(batch.box_image) == expected > 0
    assert batch.point_coords.shape == (len(batch.point_image), 1, 2)
    assert batch.boxes.shape == (len(batch.box_image), 4)
    only_boxes = build_pretrain_batch(entries, rng, 3, 1.0, memo.backbone.image_size)
    assert len(only_boxes.point_image) == 0 and len(only_boxes.box_image) == expected


def test_every_part_of_sam_and_the_heads_get_gradients(demo, memo):
    step = PretrainStep(memo.backbone, 1, memo.vocab)
    memo.backbone.model.requires_grad_(True)
    batch = build_pretrain_batch([memo(i) for i in demo.image_ids], np.random.default_rng(2), 4, 0.5, memo.backbone.image_size)
    config = TrainConfig(train_annotations="x", mode="pretrain")
    out = step(batch, config)
    out["loss"].backward()
    assert {"loss_aux_category", "loss_aux_color", "loss_points", "loss_boxes"} <= set(out)
    sam = memo.backbone.model
    for name, p in (("trunk", sam.image_encoder.blocks[0].attn.qkv.weight),
                    ("patch embedding", sam.image_encoder.patch_embed.proj.weight),
                    ("point embedding", sam.prompt_encoder.point_embeddings[1].weight),
                    ("box corner embedding", sam.prompt_encoder.point_embeddings[2].weight),
                    ("decoder", sam.mask_decoder.transformer.layers[0].self_attn.q_proj.weight),
                    ("category head", step.heads["category"].weight)):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    step.zero_grad(set_to_none=True)

    # aux_weight 0: the masks still train the trunk, the heads get nothing
    zero = types.SimpleNamespace(**{**config.__dict__, "aux_weight": 0.0})
    step(batch, zero)["loss"].backward()
    assert step.heads["category"].weight.grad.abs().sum() == 0
    assert sam.image_encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    step.zero_grad(set_to_none=True)
    memo.backbone.model.requires_grad_(False)


def test_validation_scores_a_perfect_head_and_reports_every_metric(demo, memo):
    step = PretrainStep(memo.backbone, 1, memo.vocab).eval()
    entries = [memo(i) for i in demo.image_ids]
    sums = validate_pretrain(step, entries)
    assert set(sums) == {"val_point_miou", "val_box_miou", "val_head_category", "val_head_color"}
    n_instances = sum(len(e.masks) for e in entries)
    assert sums["val_point_miou"][1] == sums["val_box_miou"][1] == n_instances
    assert 0 <= sums["val_head_category"][0] <= sums["val_head_category"][1] > 0


@pytest.mark.parametrize("sam_type, num_skips", [("sam2_tiny", 2), ("vit_tiny", 0)])
def test_high_res_skips_of_a_random_base_start_at_zero_and_move_only_after_the_hold(demo_files, sam_type, num_skips):
    """SAM 2's conv_s0 / conv_s1 are zero and get no update for `high_res_hold_steps`, then train like
    the rest; SAM 1 has no such skips, so the setting changes nothing there."""
    spec = load_run_spec(f"""
model: {{sam: {{sam_type: {sam_type}}}}}
train: {{mode: pretrain, train_annotations: {demo_files["train"]}, high_res_hold_steps: 1, lr: 0.01, warmup_steps: 0}}
""")
    torch.manual_seed(0)
    mode = PretrainMode(spec, StorageOptions(), 0, 1, torch.device("cpu"))
    skips = [p for skip in mode.backbone.high_res_skips() for p in skip.parameters()]
    assert len(mode.backbone.high_res_skips()) == num_skips
    assert all(p.abs().sum() == 0 for p in skips)
    assert mode.held_parameters(0) == skips and mode.held_parameters(1) == []

    optimizer = build_optimizer(mode.module.parameters(), spec.train, 1)
    scaler = grad_scaler(spec.train, torch.device("cpu"))
    first_block = next(p for name, p in mode.backbone.model.named_parameters() if "blocks.0.attn.qkv.weight" in name)
    for step in range(2):
        before = [p.detach().clone() for p in skips], first_block.detach().clone()
        held = mode.held_parameters(step)
        loss = mode.loss(mode.module, mode.batch(step, np.random.default_rng(step)))["loss"]
        backward_and_step(loss, scaler, optimizer, mode.module.parameters(), 1.0,
                          before_step=(lambda: drop_gradients(held)) if held else None)
        assert not torch.equal(first_block, before[1])  # everything else trains at every step
        moved = [not torch.equal(p, b) for p, b in zip(skips, before[0])]
        assert not any(moved) if step == 0 else all(moved)


def test_a_detector_pretrains_whole_but_its_text_encoder_on_category_names(demo_files):
    """SAM 3 is pretrained as it is used: (image, category) rows prompted by the category's name,
    each answered by every instance of it; its trunk, DETR layers, heads and the per-cell heads
    train, its text encoder does not, and a few steps on one batch lower the loss."""
    from talora.train.batches import epoch_images
    from talora.train.pretrain import validate_detector_pretrain

    spec = load_run_spec(f"""
model: {{sam: {{sam_type: sam3_tiny}}}}
train: {{mode: pretrain, train_annotations: {demo_files["train"]}, val_annotations: {demo_files["val"]},
        batch_images: 4, prompts_per_image: 4, lr: 0.0015, warmup_steps: 0}}
""")
    torch.manual_seed(0)
    mode = PretrainMode(spec, StorageOptions(), 0, 1, torch.device("cpu"))
    tasks = mode.module.tasks
    names = {t.singular for t in tasks}
    assert {t.kind for t in tasks} == {"category"} and {"car", "bus", "apple"} <= names
    batch = mode.batch(0, np.random.default_rng(0))
    rows = batch.rows
    assert set(rows.row_prompts) <= names and rows.trunk.shape == (4, 3, 224, 224)
    ids = epoch_images(mode.mine, 0, 4, (spec.train.seed, 0))
    for r, prompt in enumerate(rows.row_prompts):  # each row carries every instance of its category
        instances = mode.train_set.instances[ids[int(rows.image_index[r])]]
        wanted = sum(i.category == prompt and not i.iscrowd for i in instances)
        assert int((rows.instance_row == r).sum()) == wanted and bool(rows.present[r]) == (wanted > 0)

    out = mode.loss(mode.module, batch)
    out["loss"].backward()
    assert {"loss_aux_category", "loss_scores", "loss_boxes", "loss_instances", "loss_presence"} <= set(out)
    sam = mode.backbone.model
    for name, p in (("ViT block 0", sam.backbone.vision_backbone.trunk.blocks[0].attn.qkv.weight),
                    ("patch embedding", sam.backbone.vision_backbone.trunk.patch_embed.proj.weight),
                    ("fusion encoder", sam.transformer.encoder.layers[0].linear1.weight),
                    ("decoder", sam.transformer.decoder.layers[0].linear1.weight),
                    ("mask head", sam.segmentation_head.mask_predictor.mask_embed.layers[0].weight),
                    ("category head", mode.module.heads["category"].weight)):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in sam.backbone.language_backbone.parameters())

    optimizer = build_optimizer(mode.module.parameters(), spec.train, 1)
    scaler = grad_scaler(spec.train, torch.device("cpu"))
    optimizer.zero_grad(set_to_none=True)
    first = float(out["loss"].detach())
    for _ in range(6):
        loss = mode.loss(mode.module, batch)["loss"]
        backward_and_step(loss, scaler, optimizer, mode.module.parameters(), 1.0)
    assert float(mode.loss(mode.module, batch)["loss"].detach()) < 0.7 * first

    mode.module.eval()
    sums = validate_detector_pretrain(mode.module, mode.val_entries, [mode.val_set.images[i] for i in mode.val_ids],
                                      mode.val_set)
    assert set(sums) == {"val_semantic_miou", "val_presence_accuracy", "val_head_category", "val_head_color"}
    assert sums["val_presence_accuracy"][1] == len(mode.val_ids) * len(tasks)
    present = sum(any(t.matches(i) for i in mode.val_set.instances[v]) for v in mode.val_ids for t in tasks)
    assert sums["val_semantic_miou"][1] == present > 0
    assert set(mode.validate()) == {"val_semantic_miou", "val_presence_accuracy", "val_head_category",
                                    "val_head_color", "val_score"}
