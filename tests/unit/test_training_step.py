"""The training step on CPU, without Ray: losses, AMP's scaler path, static LoRA."""

import numpy as np
import pytest
import torch

from talora.config import default_config
from talora.data.coco import CocoDataset
from talora.data.synthetic import make_split
from talora.model.loading import build_task_aware_sam
from talora.adapters.static import StaticLora
from talora.data.tasks import TaskSet
from talora.train.batches import _epoch_order, build_batch, epoch_images
from talora.train.config import TrainConfig, load_run_spec
from talora.train.optim import backward_and_step
from talora.train.losses import dice_loss, focal_loss, mask_losses
from talora.train.step import TrainStep


@pytest.fixture(scope="module")
def demo():
    coco, files = make_split(6, seed=11)
    dataset = CocoDataset.from_dict(coco, "root")
    from talora.io.images import decode_image

    images = {i["id"]: decode_image(files[i["file_name"]]) for i in coco["images"]}
    return dataset, images


def _batch(model, demo, rng_seed=0, tasks_per_image=2, box_share=0.0):
    dataset, images = demo
    tasks = [t for t in TaskSet.from_dataset(dataset) if not t.heldout]
    prompts_of = {t.id: t.train_prompts for t in tasks}
    records = [dataset.images[i] for i in dataset.image_ids[:2]]
    inputs = [model.preprocess(images[r.id]) for r in records]
    with torch.no_grad():
        trunk = model.embed_trunk(torch.stack([x for x, _ in inputs]))
    return build_batch(records, trunk, [s for _, s in inputs], dataset, tasks, prompts_of,
                       np.random.default_rng(rng_seed), model.backbone, tasks_per_image, 1, box_share)


def test_epoch_images_show_every_image_once_per_epoch_in_a_new_order_and_repeat_exactly():
    ids = [10 + 3 * i for i in range(10)]  # 10 images, batches of 4: step 2 spans epochs 0 and 1
    steps = [epoch_images(ids, step, 4, (0, 0)) for step in range(5)]
    drawn = [i for batch in steps for i in batch]
    first, second = drawn[:10], drawn[10:20]
    assert sorted(first) == ids and sorted(second) == ids
    assert first != second  # each epoch has its own order
    assert steps[2] == first[8:] + second[:2]
    _epoch_order.cache_clear()  # a resumed run is a new process: the order must come from the seed alone
    assert epoch_images(ids, 3, 4, (0, 0)) == steps[3]
    assert epoch_images(ids, 3, 4, (0, 1)) != steps[3]  # another worker (or seed) its own order


def test_losses_are_zero_for_a_perfect_prediction_and_fp32_under_autocast():
    target = torch.zeros(2, 8, 8)
    target[0, :4] = 1
    perfect = (target * 2 - 1) * 50
    assert focal_loss(perfect, target).max() < 1e-6 and dice_loss(perfect, target).max() < 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, iou = mask_losses(perfect[:, None].bfloat16(), torch.ones(2, 1), target, 20, 1, 1)
    assert loss.dtype == torch.float32 and torch.equal(iou, torch.ones(2))


def test_batch_has_semantic_rows_for_present_and_absent_tasks(demo):
    model = build_task_aware_sam(default_config("vit_tiny"))
    batch = _batch(model, demo, tasks_per_image=4)
    assert len(batch.image_index) == 8 and batch.semantic_target.shape == (8, 64, 64)
    assert 0 < batch.present.sum() < 8  # presence is trained on both kinds
    assert all((batch.semantic_target[i].sum() > 0) == bool(batch.present[i]) for i in range(8))
    assert len(batch.point_row) > 0 and batch.point_coords.shape[1:] == (1, 2)


def test_a_detectors_batch_holds_every_instance_of_each_row_and_no_point_rows(demo):
    dataset, _ = demo
    model = build_task_aware_sam(default_config("sam3_tiny"))
    batch = _batch(model, demo, tasks_per_image=4)
    assert len(batch.point_row) == 0 and len(batch.box_row) == 0
    assert len(batch.instance_row) > 0 and batch.instance_target.shape[1:] == (64, 64)
    for r in range(len(batch.image_index)):  # a row's instances make up its semantic target
        mine = batch.instance_target[batch.instance_row == r]  # (n, L, L) area shares
        assert bool(batch.present[r]) == (len(mine) > 0)
        if len(mine):  # a pixel's union share lies between its largest instance share and their sum
            semantic = batch.semantic_target[r]
            assert (mine.max(0).values <= semantic + 1e-6).all() and (semantic <= mine.sum(0) + 1e-6).all()
        else:
            assert batch.semantic_target[r].max() == 0
    boxes = batch.instance_box
    assert boxes.shape[1] == 4 and (boxes >= 0).all() and (boxes <= 1).all()  # normalised cx, cy, w, h


def test_the_detector_loss_is_low_for_matched_perfect_queries_and_matches_one_to_one(demo):
    from talora.backbones.sam3 import Detections
    from talora.train.detector import detector_losses, match

    model = build_task_aware_sam(default_config("sam3_tiny"))
    batch = _batch(model, demo, tasks_per_image=4)
    # Binary targets, so that a saturated prediction of them is a perfect one.
    batch.instance_target, batch.semantic_target = (batch.instance_target > 0.5).float(), (batch.semantic_target > 0.5).float()
    rows, queries, side = len(batch.image_index), 20, 64
    masks, scores = torch.full((rows, queries, side, side), -50.0), torch.full((rows, queries), -20.0)
    boxes = torch.full((rows, queries, 4), 0.5)
    slots = {}
    for k, r in enumerate(batch.instance_row.tolist()):  # instance k of row r answered by query 3 + its slot
        q = 3 + slots.setdefault(r, 0)
        slots[r] += 1
        masks[r, q] = (batch.instance_target[k] * 2 - 1) * 50
        scores[r, q] = 20.0
        boxes[r, q] = batch.instance_box[k]
    semantic = (batch.semantic_target * 2 - 1) * 50
    presence = (batch.present * 2 - 1) * 20
    perfect = Detections(masks, scores, boxes, presence, semantic)
    matcher = model.backbone.matcher()
    row, query, instance = match(matcher, perfect, batch)
    assert sorted(instance.tolist()) == list(range(len(batch.instance_row)))  # every instance once
    assert torch.equal(batch.instance_row[instance], row)  # each to a query of its own row
    assert len(set(zip(row.tolist(), query.tolist()))) == len(row)  # one to one
    config = TrainConfig(train_annotations="x")
    loss, metrics = detector_losses(perfect, batch, matcher, config)
    assert loss < 1e-3 and metrics["iou_instances"] == 1.0 and metrics["iou_semantic"] == 1.0
    shuffled = Detections(masks.roll(1, dims=1), scores, boxes.roll(1, dims=1), presence, semantic)
    assert detector_losses(shuffled, batch, matcher, config)[0] > 10 * loss + 1.0  # wrong queries cost


@pytest.mark.parametrize("sam_type", ["vit_tiny", "sam2_tiny", "sam3_tiny"])
@pytest.mark.parametrize("mode", ["hypernet", "static"])
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(demo, sam_type, mode):
    torch.manual_seed(0)
    model = build_task_aware_sam(default_config(sam_type))
    static = mode == "static"
    step = TrainStep(model, StaticLora(model.targets, 4, 2.0) if static else model.hypernet)
    batch = _batch(model, demo)
    text = None if static else torch.randn(len(batch.prompts), 384)
    config = TrainConfig(train_annotations="x")
    # A smooth descent, not one float-exact path; a static LoRA starts at B = 0 and takes a larger step.
    optimiser = torch.optim.AdamW(step.parameters(), lr=1e-2 if static else 3e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = []
    for _ in range(20):
        out = step(batch, text, config)
        losses.append(out["loss"].item())
        assert backward_and_step(out["loss"], scaler, optimiser, step.parameters(), 1.0)
    assert losses[-1] < 0.85 * losses[0], losses


def test_amp_scaler_on_cpu_skips_a_step_with_an_injected_inf(demo):
    torch.manual_seed(0)
    model = build_task_aware_sam(default_config("vit_tiny"))
    source = StaticLora(model.targets, 4, 2.0)
    step = TrainStep(model, source)
    batch = _batch(model, demo)
    config = TrainConfig(train_annotations="x", amp=True)
    optimiser = torch.optim.AdamW(step.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    params = list(step.parameters())

    with torch.autocast("cpu", dtype=torch.float16):
        out = step(batch, None, config)
    assert out["loss"].dtype == torch.float32  # losses in fp32 under autocast
    before = [p.detach().clone() for p in params]

    def inject():
        params[0].grad.view(-1)[0] = float("inf")

    assert not backward_and_step(out["loss"], scaler, optimiser, params, 1.0, before_step=inject)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # the step was skipped
    assert scaler.get_scale() < 1024.0  # and the scale backed off

    with torch.autocast("cpu", dtype=torch.float16):
        out = step(batch, None, config)
    assert backward_and_step(out["loss"], scaler, optimiser, params, 1.0)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))  # a clean step does update


def test_run_spec_is_strict_and_checks_values_before_any_worker():
    with pytest.raises(ValueError, match=r"train\.rnak"):
        load_run_spec("train:\n  train_annotations: a.json\n  rnak: 1\n")
    with pytest.raises(ValueError, match=r"train\.max_steps must be >= 1"):
        load_run_spec("train:\n  train_annotations: a.json\n  max_steps: 0\n")
    with pytest.raises(ValueError, match=r"model\.lora\.rank must be >= 1|lora\.rank must be >= 1"):
        load_run_spec("model:\n  lora:\n    rank: 0\ntrain:\n  train_annotations: a.json\n")
    spec = load_run_spec("model:\n  sam:\n    sam_type: vit_b\ntrain:\n  train_annotations: a.json\n",
                         {"train": {"max_steps": 7}})
    assert spec.train.max_steps == 7 and spec.model.hypernet.hidden_dim == 512  # the variant's defaults


def test_training_flags_override_one_field_and_keep_the_rest_of_the_config():
    from tests.conftest import job_module

    job = job_module("train_hypernet")
    # Neither the YAML's variant nor its hidden_dim is a default, so a flag that replaced a whole
    # section would show here.
    text = "model:\n  sam:\n    sam_type: sam2_tiny\n    checkpoint: base.safetensors\n  hypernet:\n    hidden_dim: 64\n" \
           "train:\n  train_annotations: a.json\n"
    args = job.build_parser().parse_args(["--config", "c.yaml", "--sam-type", "vit_b", "--adapter-type", "tucker",
                                          "--lr", "1e-4"])
    spec = load_run_spec(text, job.overrides_from_args(args))
    assert spec.model.sam.sam_type == "vit_b" and spec.model.sam.checkpoint == "base.safetensors"
    assert spec.train.lr == 1e-4 and spec.train.train_annotations == "a.json"
    assert spec.model.hypernet.adapter_type == "tucker" and spec.model.hypernet.hidden_dim == 64
    args = job.build_parser().parse_args(["--config", "c.yaml", "--sam-checkpoint", "other.safetensors"])
    spec = load_run_spec(text, job.overrides_from_args(args))
    assert (spec.model.sam.sam_type, spec.model.sam.checkpoint) == ("sam2_tiny", "other.safetensors")


def test_a_base_of_another_variant_is_refused_before_any_worker_starts(tmp_path):
    from talora.backbones import build_backbone
    from talora.data.synthetic import write_demo_dataset
    from talora.model.loading import save_backbone
    from talora.train.trainer import run_training

    written = write_demo_dataset(str(tmp_path / "demo"), num_train=2, num_val=1, seed=3)
    base = str(tmp_path / "vit_tiny.safetensors")
    save_backbone(build_backbone("vit_tiny"), base)
    spec = load_run_spec(f"model:\n  sam:\n    sam_type: sam2_tiny\n    checkpoint: {base}\n"
                         f"train:\n  train_annotations: {written['train']}\n  val_annotations: {written['val']}\n  storage_path: {tmp_path / 'runs'}\n")
    with pytest.raises(ValueError, match=r"vit_tiny.safetensors has keys for vit_tiny, but --sam-type sam2_tiny"):
        run_training(spec)
    assert not (tmp_path / "runs").exists()  # nothing started


def test_a_non_finite_loss_stops_training_with_advice_instead_of_skipping_forever(demo):
    torch.manual_seed(0)
    model = build_task_aware_sam(default_config("vit_tiny"))
    step = TrainStep(model, StaticLora(model.targets, 4, 2.0))
    out = step(_batch(model, demo), None, TrainConfig(train_annotations="x"))
    optimiser = torch.optim.AdamW(step.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with pytest.raises(FloatingPointError, match="amp_dtype: bfloat16"):
        backward_and_step(out["loss"] * float("inf"), scaler, optimiser, step.parameters(), 1.0)


def test_bf16_amp_runs_without_a_scaler_and_fp16_with_one(monkeypatch):
    import talora.train.optim as optim

    cpu = torch.device("cpu")
    fp16, bf16 = TrainConfig(train_annotations="x", amp=True), TrainConfig(train_annotations="x", amp=True, amp_dtype="bfloat16")
    monkeypatch.setattr(optim, "cpu_has_native", lambda dtype: True)  # a CPU with AMX-FP16 and AVX512-BF16
    assert optim.grad_scaler(fp16, cpu).is_enabled() and optim.amp_dtype(fp16, cpu) == torch.float16
    assert not optim.grad_scaler(bf16, cpu).is_enabled() and optim.amp_dtype(bf16, cpu) == torch.bfloat16
    assert not optim.grad_scaler(TrainConfig(train_annotations="x", amp=False), cpu).is_enabled()
    assert optim.amp_note(bf16, cpu) is None
    with pytest.raises(ValueError, match="amp_dtype"):
        TrainConfig(train_annotations="x", amp_dtype="float8")


def test_amp_on_a_cpu_that_would_emulate_the_dtype_runs_in_float32_and_says_so(monkeypatch):
    import talora.train.optim as optim

    cpu = torch.device("cpu")
    bf16 = TrainConfig(train_annotations="x", amp=True, amp_dtype="bfloat16")
    monkeypatch.setattr(optim, "cpu_has_native", lambda dtype: False)
    assert optim.amp_dtype(bf16, cpu) is None and not optim.grad_scaler(bf16, cpu).is_enabled()
    with optim.autocast(bf16, cpu):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    assert "runs in float32 here: this CPU has no bfloat16 instructions" in optim.amp_note(bf16, cpu)
    assert optim.amp_dtype(bf16, torch.device("cuda")) == torch.bfloat16  # GPUs are not second-guessed


def test_a_onednn_isa_limit_without_bf16_makes_bf16_emulated(monkeypatch):
    from talora.core.precision import cpu_has_native

    assert cpu_has_native(torch.float32)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # what a CPU without AVX512-BF16 / AMX runs
    assert not cpu_has_native(torch.bfloat16) and not cpu_has_native(torch.float16)


def test_empty_share_counts_rows_with_a_target_whose_every_candidate_is_empty():
    from talora.train.losses import empty_share

    target = torch.zeros(3, 4, 4)
    target[0, :2], target[1, 1:] = 1, 1  # rows 0 and 1 have pixels, row 2 is an absent task
    logits = -torch.ones(3, 3, 4, 4)
    logits[1, 2, 0, 0] = 1.0  # row 1: one candidate says something
    assert empty_share(logits, target).item() == 0.5  # row 0 of the two; row 2 does not count
    assert empty_share(logits, torch.zeros(3, 4, 4)).item() == 0.0


def test_a_step_whose_masks_are_all_empty_reports_it_and_the_watch_says_collapse_once(demo):
    import dataclasses

    from talora.train.collapse import CollapseWatch

    torch.manual_seed(0)
    model = build_task_aware_sam(default_config("vit_tiny"))
    step = TrainStep(model, model.hypernet)
    batch = _batch(model, demo)
    text = torch.randn(len(batch.prompts), 384)
    healthy = step(batch, text, TrainConfig(train_annotations="x"))
    decode = model.decode
    model.decode = lambda *a, **k: dataclasses.replace(out := decode(*a, **k), masks=out.masks - 1e4)  # collapsed
    collapsed = step(batch, text, TrainConfig(train_annotations="x"))
    assert collapsed["empty_semantic"] == 1.0 and collapsed["empty_points"] == 1.0
    assert healthy["empty_semantic"] < 1.0

    watch = CollapseWatch(window=3, warmup_steps=2, lr=3e-4)
    assert watch.update(1, {"empty_semantic": 1.0}) == [] and watch.update(2, {"empty_semantic": 1.0}) == []  # warm-up
    lines = watch.update(3, {"empty_semantic": 1.0, "empty_points": 0.2, "loss": 1.0})
    assert len(lines) == 1 and lines[0].startswith("collapse: step 3: 100% of the semantic masks")
    assert "lower train.lr (now 0.0003)" in lines[0]
    assert watch.update(4, {"empty_semantic": 1.0}) == []  # said once
    fine = CollapseWatch(window=3, warmup_steps=0, lr=3e-4)
    assert not any(fine.update(s, {"empty_points": v}) for s, v in enumerate((1.0, 0.6, 1.0, 0.8), 1))


def test_box_share_prompts_positive_samples_by_their_box_and_the_step_trains_them(demo):
    torch.manual_seed(0)
    model = build_task_aware_sam(default_config("vit_tiny"))
    plain, boxed = _batch(model, demo), _batch(model, demo, box_share=1.0)
    assert len(plain.box_row) == 0 and plain.boxes.shape == (0, 4)
    assert torch.equal(_batch(model, demo, box_share=0.0).point_coords, plain.point_coords)  # no draw at 0
    # every positive became a box row (its target non-empty), the negatives stay points (empty targets)
    assert len(boxed.box_row) > 0 and bool((boxed.box_target.flatten(1).amax(1) > 0).all())
    assert not bool((boxed.point_target.flatten(1).amax(1) > 0).any())
    assert len(boxed.box_row) + len(boxed.point_row) == len(plain.point_row)
    x0, y0, x1, y1 = boxed.boxes.unbind(1)
    assert bool(((x1 > x0) & (y1 > y0) & (x0 >= 0) & (y1 <= model.backbone.image_size)).all())  # input frame

    step = TrainStep(model, model.hypernet)
    text = torch.randn(len(boxed.prompts), 384)
    config = TrainConfig(train_annotations="x", box_share=1.0)
    out = step(boxed, text, config)
    assert {"loss_boxes", "iou_boxes", "empty_boxes"} <= set(out)
    parts = out["loss_semantic"] + config.presence_weight * out["loss_presence"] + out["loss_boxes"]
    parts = parts + out.get("loss_points", 0.0)
    assert torch.allclose(out["loss"].detach(), parts, rtol=1e-5)  # the boxes' loss is in what is minimised
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.hypernet.parameters())
    with pytest.raises(ValueError, match="train.box_share must be in"):
        TrainConfig(train_annotations="x", box_share=1.5)
