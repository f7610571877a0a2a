"""Per-image prediction, rows and post-processing (no Ray)."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from pycocotools import mask as mask_utils

from talora.predictor import PredictConfig, deduplicate, encode_mask, filter_masks
from talora.predictions import SCHEMA, detection_rows, error_row, validate_table


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
    from talora.loading import build_task_aware_sam
    from talora.predictor import TaskAwarePredictor

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
    from talora.predictions import coco_results

    def row(kind, uri, prompt, score=0.5):
        return {"kind": kind, "image_uri": uri, "prompt": prompt, "score": score,
                "segmentation": {"size": [4, 4], "counts": "04L4"} if kind != "error" else None}

    rows = [row("instance", "a.jpg", "cars", 0.9), row("semantic", "a.jpg", "cars"), row("error", "a.jpg", None),
            row("instance", "unknown.jpg", "cars"), row("instance", "a.jpg", "unmapped prompt")]
    results = coco_results(rows, lambda r: {"a.jpg": 7}.get(r["image_uri"]), lambda r: {"cars": 3}.get(r["prompt"]))
    assert results == [{"image_id": 7, "category_id": 3, "score": 0.9, "segmentation": {"size": [4, 4], "counts": "04L4"}}]


def test_a_run_written_in_another_part_format_reads_back_through_the_one_reader(tmp_path, monkeypatch):
    from talora.commit import RunOutput, ShardTracker
    from talora.predictions import PART_FORMATS, read_run
    from tests.unit.test_commit import JsonLinesParts

    jsonl = JsonLinesParts()
    monkeypatch.setitem(PART_FORMATS, jsonl.suffix, jsonl)
    run = RunOutput(str(tmp_path), "k", None, jsonl)
    detection = encode_mask(np.eye(4, dtype=bool), "instance", 0.7)
    rows = detection_rows("s/a.jpg", 1, "s", 4, 4, {"cars": [detection]}, None, "m")
    ShardTracker(run, {"s": ["s/a.jpg"]}).add("s", "s/a.jpg", 1, run.write_part("s", 0, rows, SCHEMA))
    got = read_run(run.root)
    assert got.processed == ["s/a.jpg"] and got.table.schema == SCHEMA
    (row,) = got.table.to_pylist()  # cast to the schema: the score is float32
    assert row["segmentation"] == detection.rle and abs(row["score"] - 0.7) < 1e-6 and row["kind"] == "instance"


def test_given_regions_replace_the_predicted_ones_in_the_instance_pass_only(tiny_config, text_encoder):
    from talora.loading import build_task_aware_sam
    from talora.predictor import TaskAwarePredictor

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
    from talora.predictor import unmatched_parts

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
    from talora.loading import load_model, model_spec
    from talora.predictor import TaskAwarePredictor

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
