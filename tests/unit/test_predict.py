"""Per-image prediction, rows and post-processing (no Ray)."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from pycocotools import mask as mask_utils

from talora.predict.predictor import PredictConfig, deduplicate, encode_mask, filter_masks
from talora.batch.rows import SCHEMA, detection_rows, error_row, validate_table


def test_rows_match_pycocotools_rle_bbox_and_area():
    mask = np.zeros((30, 40), bool)
    mask[5:12, 8:30] = True
    mask[20:25, 2:4] = True
    d = encode_mask(mask, "instance", 0.9)
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert d.rle == {"size": [30, 40], "counts": rle["counts"].decode()}
    assert d.bbox == [float(v) for v in mask_utils.toBbox(rle)] == [2.0, 5.0, 28.0, 20.0]
    assert d.area == mask.sum() == float(mask_utils.area(rle))
    decoded = mask_utils.decode({"size": d.rle["size"], "counts": d.rle["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), mask)

    rows = detection_rows("s3://b/img 1.jpg", 7, "s0", 40, 30, {"segment cars": [d]}, None, "vit_tiny+x")
    rows.append(error_row("s3://b/bad.jpg", 8, "s0", "cannot identify image", "vit_tiny+x"))
    table = validate_table(pa.Table.from_pylist(rows, schema=SCHEMA), "part")
    assert table.num_rows == 2 and table.column("kind").to_pylist() == ["instance", "error"]


def test_a_malformed_shard_is_rejected_naming_it():
    with pytest.raises(ValueError, match=r"part-1: not a prediction shard, missing column\(s\) \['image_id'"):
        validate_table(pa.table({"image_uri": ["x"]}), "part-1")
    rows = [error_row("u", 1, "s", "e", "m")]
    rows[0]["kind"] = "blob"
    with pytest.raises(ValueError, match="unknown row kind"):
        validate_table(pa.Table.from_pylist(rows, schema=SCHEMA), "part-2")


def _logits(*boxes, size=32, strength=10.0):
    """Hand-made low-res logits: +strength inside each (x0, y0, x1, y1), -strength outside."""
    out = torch.full((len(boxes), size, size), -strength)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        out[i, y0:y1, x0:x1] = strength
    return out


def test_filters_drop_low_scores_and_unstable_masks_and_nms_keeps_the_best_duplicate():
    stable = _logits((2, 2, 12, 12), (2, 2, 12, 13), (20, 20, 30, 30))  # two near-duplicates + another object
    unstable = _logits((5, 5, 25, 25), strength=0.5)  # logits within the stability offset of the threshold
    lowres = torch.cat([stable, unstable])[None].reshape(2, 2, 32, 32)  # n = 2 points x 2 candidates
    iou = torch.tensor([[0.9, 0.95], [0.8, 0.99]])
    config = PredictConfig(score_thresh=0.85, stability_thresh=0.9, nms_thresh=0.7)
    kept = filter_masks(lowres, iou, config, 0.0)
    # the object at (20, 20) scores 0.8 < 0.85; the unstable mask scores 0.99 but is unstable
    assert sorted(kept["iou_preds"].tolist()) == pytest.approx([0.9, 0.95])
    final = deduplicate(kept, config)
    assert final["iou_preds"].tolist() == pytest.approx([0.95])  # the duplicates collapse to the best one
    assert final["boxes"].tolist() == [[2, 2, 11, 12]]


def test_predictor_gates_semantic_masks_by_presence_and_keeps_instances_in_the_task_region(tiny_config, text_encoder):
    from talora.model.loading import build_task_aware_sam
    from talora.predict.predictor import TaskAwarePredictor

    torch.manual_seed(0)
    model = build_task_aware_sam(tiny_config, text_encoder)
    image = (np.random.default_rng(0).random((90, 140, 3)) * 255).astype(np.uint8)
    config = PredictConfig(score_thresh=0.0, stability_thresh=0.0, points_per_side=4)
    with torch.no_grad():
        model.presence_head.layers[-1].bias.fill_(-20.0)  # "absent": no mask may come out
        absent = TaskAwarePredictor(model, config).predict(image, ["segment vehicles"])
        model.presence_head.layers[-1].bias.fill_(20.0)
        present = TaskAwarePredictor(model, config).predict(image, ["segment vehicles", "segment fruit"])
    assert absent == {"segment vehicles": []}
    for detections in present.values():
        semantic = [d for d in detections if d.kind == "semantic"]
        assert len(semantic) <= 1 and all(d.rle["size"] == [90, 140] for d in detections)
        assert all(d.kind in ("semantic", "instance") for d in detections)


def test_coco_results_keep_instances_of_known_images_and_categories_only():
    from talora.batch.rows import coco_results

    def row(kind, uri, prompt, score=0.5):
        return {"kind": kind, "image_uri": uri, "prompt": prompt, "score": score,
                "segmentation": {"size": [4, 4], "counts": "04L4"} if kind != "error" else None}

    rows = [row("instance", "a.jpg", "cars", 0.9), row("semantic", "a.jpg", "cars"), row("error", "a.jpg", None),
            row("instance", "unknown.jpg", "cars"), row("instance", "a.jpg", "unmapped prompt")]
    results = coco_results(rows, lambda r: {"a.jpg": 7}.get(r["image_uri"]), lambda r: {"cars": 3}.get(r["prompt"]))
    assert results == [{"image_id": 7, "category_id": 3, "score": 0.9, "segmentation": {"size": [4, 4], "counts": "04L4"}}]


def test_a_run_written_in_another_part_format_reads_back_through_the_one_reader(tmp_path, monkeypatch):
    from talora.batch.commit import RunOutput, ShardTracker
    from talora.batch.parts import PART_FORMATS
    from talora.batch.rows import read_run
    from tests.unit.test_commit import JsonLinesParts

    jsonl = JsonLinesParts()
    monkeypatch.setitem(PART_FORMATS, jsonl.name, jsonl)
    run = RunOutput(str(tmp_path), "k", None, jsonl)
    detection = encode_mask(np.eye(4, dtype=bool), "instance", 0.7)
    rows = detection_rows("s/a.jpg", 1, "s", 4, 4, {"cars": [detection]}, None, "m")
    ShardTracker(run, ["s"]).add("s", "s/a.jpg", 1, run.write_part("s", 0, rows, SCHEMA), shard_items=1)
    got = read_run(run.root)
    assert got.processed == ["s/a.jpg"] and got.table.schema == SCHEMA
    (row,) = got.table.to_pylist()  # cast to the schema: the score is float32
    assert row["segmentation"] == detection.rle and abs(row["score"] - 0.7) < 1e-6 and row["kind"] == "instance"


def test_given_regions_replace_the_predicted_ones_in_the_instance_pass_only(tiny_config, text_encoder):
    from talora.model.loading import build_task_aware_sam
    from talora.predict.predictor import TaskAwarePredictor

    torch.manual_seed(0)
    model = build_task_aware_sam(tiny_config, text_encoder)
    predictor = TaskAwarePredictor(model, PredictConfig(score_thresh=0.0, stability_thresh=0.0, points_per_side=4))
    image = (np.random.default_rng(1).random((64, 96, 3)) * 255).astype(np.uint8)
    resized = predictor.resize(image)
    with torch.no_grad():
        model.presence_head.layers[-1].bias.fill_(20.0)  # present: the predicted region is the semantic mask
        trunk = predictor.trunk(resized)
        adapter = model.adapters(["segment vehicles"])
        own = predictor.predict_rows(trunk, adapter, resized.shape[:2], (64, 96))
        nowhere = predictor.predict_rows(trunk, adapter, resized.shape[:2], (64, 96), [torch.zeros(64, 96, dtype=torch.bool)])
        left = torch.zeros(64, 96, dtype=torch.bool)
        left[:, :20] = True
        inside = predictor.predict_rows(trunk, adapter, resized.shape[:2], (64, 96), [left])
    assert own == list(predictor.predict(image, ["segment vehicles"]).values())
    semantic = [d for d in own[0] if d.kind == "semantic"]
    assert [d for d in nowhere[0]] == semantic  # no region: no instance, the semantic mask stays
    assert [d for d in inside[0] if d.kind == "semantic"] == semantic
    assert any(d.kind == "instance" for d in inside[0])


def test_mask_nms_drops_a_part_nested_in_its_whole_that_box_nms_keeps():
    from segment_anything.utils.amg import MaskData, batched_mask_to_box

    whole = torch.zeros(32, 32, dtype=torch.bool)
    whole[4:28, 4:28] = True
    nested = torch.zeros_like(whole)
    nested[4:28, 4:24] = True  # box IoU and mask IoU with the whole: 0.83
    other = torch.zeros_like(whole)
    other[8:20, 8:20] = True  # inside the whole, mask IoU 0.25: a separate object on top of it
    masks = torch.stack([whole, nested, other, nested]).float() * 20 - 10  # logits
    # The last mask is another prompt's (owner 1): prompts never suppress each other's instances.
    data = MaskData(masks=masks, iou_preds=torch.tensor([0.9, 0.8, 0.7, 0.6]), owner=torch.tensor([0, 0, 0, 1]))
    data["boxes"] = batched_mask_to_box(masks > 0)
    only_boxes = deduplicate(MaskData(**{k: v.clone() for k, v in data.items()}),
                             PredictConfig(nms_thresh=0.9, mask_nms_thresh=1.0))  # box NMS at 0.9 keeps all
    assert only_boxes["iou_preds"].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])
    both = deduplicate(data, PredictConfig(nms_thresh=0.9, mask_nms_thresh=0.5))
    assert both["iou_preds"].tolist() == pytest.approx([0.9, 0.7, 0.6])  # the nested near-copy goes, the object stays
    assert both["owner"].tolist() == [0, 0, 1]
    capped = deduplicate(MaskData(**{k: v.clone() for k, v in data.items()}),
                         PredictConfig(nms_thresh=0.9, mask_nms_thresh=1.0, max_instances=1))
    assert capped["iou_preds"].tolist() == pytest.approx([0.9, 0.6])  # max_instances per prompt


def test_a_part_of_the_task_region_no_instance_matches_becomes_an_instance():
    from talora.predict.predictor import unmatched_parts

    region = np.zeros((40, 60), dtype=bool)
    region[2:12, 2:12] = True  # covered by a kept instance below
    region[20:35, 30:50] = True  # no instance: the point prompts missed it
    region[38, 0] = True  # one pixel: noise, under min_area
    instance = np.zeros_like(region)
    instance[2:12, 2:13] = True  # IoU 100/110 with the first part
    parts = unmatched_parts(region, instance[None], score=0.4, min_area=0.001)
    assert len(parts) == 1
    part, score = parts[0]
    assert score == 0.4 and part.sum() == 15 * 20 and part[20:35, 30:50].all()
    assert len(unmatched_parts(region, np.zeros((0, 40, 60), bool), 0.4, 0.001)) == 2
    assert unmatched_parts(np.zeros((40, 60), bool), instance[None], 0.4, 0.001) == []


def test_a_prompts_detections_do_not_depend_on_the_other_prompts_decoded_with_it(tmp_path):
    # Every prompt's grid points share decoder batches; each prompt must still get what it gets alone.
    from pycocotools import mask as mask_utils

    from talora.data.coco import CocoDataset
    from talora.data.synthetic import write_demo_dataset
    from talora.model.loading import load_model, model_spec
    from talora.predict.predictor import TaskAwarePredictor

    dataset = CocoDataset.load(write_demo_dataset(str(tmp_path), num_train=0, num_val=2, seed=3)["val"])
    predictor = TaskAwarePredictor(load_model(model_spec("vit_tiny")), PredictConfig(points_per_side=8,
                                                                                     points_per_batch=16))
    prompts = ["segment vehicles", "segment red objects", "segment all circles"]
    instances = 0
    for image_id in dataset.image_ids:
        image = dataset.load_image(image_id)
        together = predictor.predict(image, prompts)
        for prompt in prompts:
            alone = predictor.predict(image, [prompt])[prompt]
            assert [d.kind for d in together[prompt]] == [d.kind for d in alone]
            assert [d.score for d in together[prompt]] == pytest.approx([d.score for d in alone], abs=1e-4)
            if alone:
                ious = mask_utils.iou([d.rle for d in together[prompt]], [d.rle for d in alone], [0] * len(alone))
                assert ious.diagonal().min() > 0.98
            instances += sum(d.kind == "instance" for d in alone)
    assert instances > 0


def _demo_predictor(points_per_side=8, **config):
    from talora.model.loading import load_model, model_spec
    from talora.predict.predictor import TaskAwarePredictor

    return TaskAwarePredictor(load_model(model_spec("vit_tiny")), PredictConfig(points_per_side=points_per_side, **config))


def test_a_prompts_own_presence_threshold_overrides_the_jobs(tiny_config, text_encoder):
    from talora.model.loading import build_task_aware_sam
    from talora.predict.predictor import TaskAwarePredictor

    torch.manual_seed(0)
    model = build_task_aware_sam(tiny_config, text_encoder)
    image = (np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)
    config = PredictConfig(score_thresh=0.0, stability_thresh=0.0, points_per_side=4, presence_thresh=0.5,
                           prompt_thresholds=(("segment fruit", 1.0),))
    assert config.presence_thresh_of("segment fruit") == 1.0 and config.presence_thresh_of("segment cars") == 0.5
    with torch.no_grad():
        model.presence_head.layers[-1].bias.fill_(5.0)  # presence ~0.993 for every prompt
        found = TaskAwarePredictor(model, config).predict(image, ["segment vehicles", "segment fruit"])
    assert any(d.kind == "semantic" for d in found["segment vehicles"]) and found["segment fruit"] == []
    with pytest.raises(ValueError, match="--prompt-thresh for 'segment fruit'"):
        PredictConfig(prompt_thresholds=(("segment fruit", 1.5),))


def test_prompt_thresholds_from_flags_and_a_prompts_file_name_what_is_wrong(tmp_path):
    from talora.label.job import parse_prompt_thresholds, read_prompts_file

    prompts = ["segment cars", "segment a=b"]
    assert parse_prompt_thresholds(["segment cars=0.7", "segment a=b=0.2"], prompts) == (
        ("segment cars", 0.7), ("segment a=b", 0.2))
    for bad, message in (("segment cars", "expected PROMPT=THRESHOLD"), ("segment cars=high", "'high' is not a number"),
                         ("segment dogs=0.5", "'segment dogs' is not one of the prompts")):
        with pytest.raises(ValueError, match=message):
            parse_prompt_thresholds([bad], prompts)
    (tmp_path / "prompts.yaml").write_text('- segment cars\n- {prompt: "segment fruit", presence_thresh: 0.8}\n')
    assert read_prompts_file(str(tmp_path / "prompts.yaml")) == (["segment cars", "segment fruit"],
                                                                  (("segment fruit", 0.8),))
    (tmp_path / "bad.yaml").write_text("- {prompt: segment cars, thresh: 0.8}\n")
    with pytest.raises(ValueError, match="bad.yaml: entry 0"):
        read_prompts_file(str(tmp_path / "bad.yaml"))


def test_very_thin_and_very_tall_images_are_labelled_at_their_original_size(tiny_config, text_encoder):
    from talora.model.loading import build_task_aware_sam
    from talora.predict.predictor import TaskAwarePredictor

    torch.manual_seed(0)
    model = build_task_aware_sam(tiny_config, text_encoder)
    config = PredictConfig(score_thresh=0.0, stability_thresh=0.0, points_per_side=4)
    with torch.no_grad():
        model.presence_head.layers[-1].bias.fill_(20.0)  # "present": the semantic mask always comes out
        for shape in ((4, 3000), (3000, 4)):  # the short side would round to 0 pixels in the model frame
            image = (np.random.default_rng(0).random((*shape, 3)) * 255).astype(np.uint8)
            found = TaskAwarePredictor(model, config).predict(image, ["segment vehicles"])["segment vehicles"]
            assert any(d.kind == "semantic" for d in found)
            assert all(d.rle["size"] == list(shape) for d in found)
            assert all(mask_utils.decode(d.rle).shape == shape for d in found)


def test_the_frame_keeps_one_pixel_of_a_thin_image_and_maps_its_points_into_it(tiny_config):
    from talora.model.loading import load_backbone

    backbone = load_backbone("vit_tiny")
    thin = np.zeros((4, 3000, 3), np.uint8)
    assert backbone.resize(thin).shape == (1, 256, 3)
    x, y = backbone.apply_coords(np.array([[2999.0, 3.9]]), (4, 3000))[0]
    assert 255 <= x < 256 and 0 <= y < 1  # inside the one-pixel row, not past it
    assert backbone.resize(np.zeros((90, 140, 3), np.uint8)).shape == (165, 256, 3)  # others as SAM rounds them


def test_error_rows_read_as_sentences_naming_the_file(tmp_path):
    from talora.backbones.frames import decode_stage

    batch = {"uri": ["s3://b/imgs/s/notes.jpg", "s3://b/imgs/s/zero.jpg", "s3://b/imgs/s/gone.jpg"],
             "bytes": [b"this is not an image\n" * 10, b"", b""],
             "error": ["", "", "gone.jpg: no such file: s3://b/imgs/s/gone.jpg"]}
    errors = list(decode_stage(batch, 10_000, "vit_tiny")["error"])
    assert errors[0] == "notes.jpg: cannot identify image format: not an image, or a format Pillow cannot read"
    assert errors[1] == "zero.jpg: empty file (0 bytes)"
    assert errors[2] == "gone.jpg: no such file: s3://b/imgs/s/gone.jpg"  # the read stage's sentence, kept
    assert not any("0x" in e or "<" in e for e in errors)


def test_a_batch_of_images_of_different_sizes_gives_what_each_gives_alone(tmp_path):
    from talora.data.coco import CocoDataset
    from talora.data.synthetic import write_demo_dataset

    dataset = CocoDataset.load(write_demo_dataset(str(tmp_path), num_train=0, num_val=3, seed=3)["val"])
    predictor = _demo_predictor()
    images = [dataset.load_image(i) for i in dataset.image_ids]
    images[1] = images[1][:, :180]  # the trunk pads each to the square input: sizes may differ in a batch
    items = [(predictor.resize(image), image.shape[:2]) for image in images]
    prompts = ["segment vehicles", "segment red objects"]
    batched = predictor.predict_batch(items, prompts)
    found = 0
    for (resized, size), got in zip(items, batched):
        alone = predictor.predict_resized(resized, size, prompts)
        for prompt in prompts:
            assert [(d.kind, d.rle["size"]) for d in got[prompt]] == [(d.kind, d.rle["size"]) for d in alone[prompt]]
            assert [d.score for d in got[prompt]] == pytest.approx([d.score for d in alone[prompt]], abs=1e-4)
            found += len(alone[prompt])
    assert found > 0


def test_bf16_autocast_gives_the_fp32_masks(tmp_path, monkeypatch):
    # The CPU twin of the GPU path's --precision bf16: same detections, semantic masks at IoU >= 0.98.
    import talora.predict.predictor as predictor

    monkeypatch.setattr(predictor, "cpu_has_native", lambda dtype: True)  # bf16 even where this CPU emulates it
    from pycocotools import mask as mask_utils

    from talora.data.coco import CocoDataset
    from talora.data.synthetic import write_demo_dataset

    dataset = CocoDataset.load(write_demo_dataset(str(tmp_path), num_train=0, num_val=6, seed=3)["val"])
    fp32, bf16 = _demo_predictor(), _demo_predictor(precision="bf16")
    assert bf16.dtype == torch.bfloat16 and fp32.dtype is None
    prompts = ["segment vehicles", "segment red objects"]
    semantic, instance, score_changes = [], [], []
    for image_id in dataset.image_ids:
        image = dataset.load_image(image_id)
        a, b = fp32.predict(image, prompts), bf16.predict(image, prompts)
        for prompt in prompts:
            assert [d.kind for d in a[prompt]] == [d.kind for d in b[prompt]]
            score_changes += [abs(x.score - y.score) for x, y in zip(a[prompt], b[prompt])]
            for kind, ious in (("semantic", semantic), ("instance", instance)):
                x = [d.rle for d in a[prompt] if d.kind == kind]
                y = [d.rle for d in b[prompt] if d.kind == kind]
                if x:
                    ious += list(mask_utils.iou(x, y, [0] * len(y)).max(1))
    assert len(semantic) >= 3 and min(semantic) >= 0.98
    assert len(instance) >= 3 and np.median(instance) >= 0.98  # a small instance's edge pixels weigh more
    assert 0 < max(score_changes) < 0.05  # bf16 really ran: scores moved, a little


def test_bf16_on_a_cpu_without_bf16_instructions_runs_as_fp32(monkeypatch):
    import talora.predict.predictor as predictor

    monkeypatch.setattr(predictor, "cpu_has_native", lambda dtype: False)
    assert predictor.autocast_dtype("bf16", torch.device("cpu")) is None
    assert predictor.autocast_dtype("fp32", torch.device("cpu")) is None


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="--precision"):
        PredictConfig(precision="int8")


def test_an_image_the_model_fails_on_is_an_error_row_and_the_rest_of_its_batch_is_labelled(tmp_path):
    from talora.batch.commit import RunOutput
    from talora.label.job import LabelActor
    from talora.model.loading import model_spec
    from talora.batch.parts import PARQUET
    from talora.io.storage import StorageOptions

    actor = LabelActor(model_spec("vit_tiny"), ["segment vehicles"], PredictConfig(points_per_side=4), None, "m",
                       RunOutput(str(tmp_path / "out"), "k", None, PARQUET), StorageOptions())
    from talora.data.coco import CocoDataset
    from talora.data.synthetic import write_demo_dataset

    dataset = CocoDataset.load(write_demo_dataset(str(tmp_path / "demo"), num_train=0, num_val=1, seed=3)["val"])
    good = dataset.load_image(dataset.image_ids[0])  # vehicles in it: rows come out
    four_channels = np.zeros((256, 256, 4), np.uint8)  # decoded, yet not an RGB image: the trunk raises
    batch = {"uri": ["s/a.jpg", "s/b.jpg", "s/c.jpg"], "image_id": [1, 2, 3], "shard": ["s"] * 3,
             "resized": [good, four_channels, np.zeros((1, 1, 3), np.uint8)], "height": [256, 256, 0],
             "width": [256, 256, 0], "error": ["", "", "OSError: truncated"]}
    (rows_a, error_a), (rows_b, error_b), (rows_c, error_c) = actor.process(batch)
    assert error_a == "" and rows_a and all(r["kind"] != "error" for r in rows_a)
    assert error_b.startswith("b.jpg: RuntimeError") and [(r["image_uri"], r["kind"]) for r in rows_b] == [("s/b.jpg", "error")]
    assert error_c == "OSError: truncated" and rows_c[0]["error"] == "OSError: truncated"


def test_coarse_to_fine_decodes_fewer_points_and_finds_the_same_objects(tmp_path):
    from pycocotools import mask as mask_utils

    from talora.data.coco import CocoDataset
    from talora.data.synthetic import write_demo_dataset

    dataset = CocoDataset.load(write_demo_dataset(str(tmp_path), num_train=0, num_val=4, seed=3)["val"])
    fine, every = _demo_predictor(16), _demo_predictor(16, coarse_to_fine=False)
    prompts = ["segment vehicles", "segment red objects"]
    decoded = {True: 0, False: 0}
    matched = total = 0
    for image_id in dataset.image_ids:
        image = dataset.load_image(image_id)
        resized = fine.resize(image)
        with torch.no_grad():
            adapter = fine.model.adapters(prompts)
            embeddings = fine.tail(fine.trunk(resized), adapter)
            regions = fine.task_regions(*fine.semantic(embeddings, adapter, resized.shape[:2], image.shape[:2]))
            for predictor in (fine, every):
                rows = predictor.instance_candidates(embeddings, adapter, regions, image.shape[:2])
                decoded[predictor.config.coarse_to_fine] += sum(len(r) for r, _, _ in rows)
        a, b = fine.predict(image, prompts), every.predict(image, prompts)
        for prompt in prompts:
            x = [d.rle for d in a[prompt] if d.kind == "instance" and d.score > 0.5]
            y = [d.rle for d in b[prompt] if d.kind == "instance" and d.score > 0.5]
            if y:  # the full grid's point instances are found coarse to fine
                total += len(y)
                matched += int((mask_utils.iou(y, x, [0] * len(x)).max(1) > 0.8).sum()) if x else 0
    assert decoded[True] < 0.75 * decoded[False]  # 157 of 231 rows here
    assert total >= 4 and matched >= 0.9 * total


def test_box_prompts_give_one_mask_per_box_of_the_boxed_object_as_the_prompt_sees_it(tmp_path):
    from talora.data.coco import CocoDataset
    from talora.data.synthetic import write_demo_dataset

    dataset = CocoDataset.load(write_demo_dataset(str(tmp_path), num_train=0, num_val=4, seed=5)["val"])
    predictor = _demo_predictor()
    vehicle = {c for c, v in dataset.categories.items() if v["supercategory"] == "vehicle"}
    image_id = next(i for i in dataset.image_ids if any(x.category_id in vehicle for x in dataset.instances[i]))
    vehicles = [x for x in dataset.instances[image_id] if x.category_id in vehicle]
    boxes = [{"bbox": list(x.bbox), "prompt": None} for x in vehicles]  # no prompt: a mask under every prompt
    boxes.append({"bbox": list(vehicles[0].bbox), "prompt": "segment vehicles"})  # this one under one prompt
    found = predictor.predict(dataset.load_image(image_id), ["segment vehicles", "segment fruit"], boxes)
    cars = [d for d in found["segment vehicles"] if d.kind == "instance"]
    fruit = [d for d in found["segment fruit"] if d.kind == "instance"]
    assert len(cars) == len(vehicles) + 1 and len(fruit) == len(vehicles)  # one per box, in box order; no grid
    ious = [mask_utils.iou([d.rle | {"counts": d.rle["counts"].encode()}],
                           [mask_utils.encode(np.asfortranarray(x.mask().astype(np.uint8)))], [0])[0, 0]
            for d, x in zip(cars, vehicles + vehicles[:1])]
    assert np.mean(ious) >= 0.5, ious  # the boxed vehicle
    assert sum(d.area for d in fruit) < 0.2 * sum(d.area for d in cars[:-1])  # under "fruit", a car box is ~empty
