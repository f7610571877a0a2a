"""Evaluation of committed prediction rows against COCO ground truth."""


import pytest

from talora.batch.commit import RunOutput, ShardTracker
from talora.data.coco import CocoDataset
from talora.data.synthetic import write_demo_dataset
from talora.eval.evaluate import EvalConfig, evaluate
from talora.predict.predictor import encode_mask
from talora.batch.rows import SCHEMA, detection_rows
from talora.data.tasks import TaskSet, semantic_mask
from talora.batch.parts import PARQUET


@pytest.fixture
def demo(tmp_path):
    written = write_demo_dataset(str(tmp_path / "demo"), num_train=2, num_val=8, seed=2, shard_size=4)
    return CocoDataset.load(written["val"]), written["val"]


def _commit(tmp_path, dataset, prompt_tasks, drop_semantic=False):
    """A committed run whose rows are the ground truth of each prompt's task (score 1)."""
    tasks = TaskSet.from_dataset(dataset)
    run = RunOutput(str(tmp_path / "labels"), "gt", None, PARQUET)
    records = [dataset.images[i] for i in dataset.image_ids]
    tracker = ShardTracker(run, ["s0"])
    rows = []
    for r in records:
        predictions = {}
        for prompt, task_id in prompt_tasks.items():
            instances = [i for i in dataset.instances[r.id] if tasks.by_id[task_id].matches(i)]
            detections = [encode_mask(i.mask(), "instance", 1.0) for i in instances]
            union = semantic_mask(instances, r.height, r.width)
            if union.any() and not drop_semantic:
                detections.append(encode_mask(union, "semantic", 1.0))
            predictions[prompt] = detections
        rows += detection_rows(r.uri, r.id, "s0", r.width, r.height, predictions, None, "gt")
    part = run.write_part("s0", 0, rows, SCHEMA)
    for r in records:
        tracker.add("s0", r.uri, 1, part, shard_items=len(records))
    return run.root


def test_ground_truth_as_predictions_scores_ap_1_and_miou_1(tmp_path, demo):
    dataset, annotations = demo
    predictions = _commit(tmp_path, dataset, {"segment vehicles": "supercategory:vehicle",
                                              "where are the red objects?": "color:red"})
    report = evaluate(EvalConfig(predictions, annotations, str(tmp_path / "eval")))
    assert report["images_evaluated"] == 8 and report["unmapped_prompts"] == []
    assert report["per_task"]["supercategory:vehicle"]["AP"] == pytest.approx(1.0)
    assert report["per_task"]["color:red"]["AP"] == pytest.approx(1.0)
    assert report["overall"]["AP"] == pytest.approx(1.0)
    assert report["task_miou"]["seen"] == pytest.approx(1.0)
    assert report["task_miou"]["heldout_paraphrase"] == pytest.approx(1.0)  # "where are the ...?" is held out
    assert report["references"]["seen"]["every_object"] < 1.0
    for prompt in ("segment vehicles", "where are the red objects?"):  # truth as predictions: presence is exact
        assert report["presence_f1"][prompt]["best_f1"] == report["presence_f1"][prompt]["f1_at_run"] == 1.0
    for name in ("report.json", "report.md", "per_task_ap.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    assert "supercategory:vehicle" in (tmp_path / "eval" / "report.md").read_text()


def test_unmapped_prompts_are_reported_and_a_task_map_maps_them(tmp_path, demo):
    dataset, annotations = demo
    predictions = _commit(tmp_path, dataset, {"trucks please": "category:truck"})
    report = evaluate(EvalConfig(predictions, annotations, str(tmp_path / "e1")))
    assert report["unmapped_prompts"] == ["trucks please"] and report["per_task"] == {}
    assert report["overall"]["AP"] == 0.0  # nothing to score is a zero, not a crash
    mapped = evaluate(EvalConfig(predictions, annotations, str(tmp_path / "e2"), task_map={"trucks please": "category:truck"}))
    assert mapped["per_task"]["category:truck"]["AP"] == pytest.approx(1.0)


def test_missing_semantic_rows_count_as_empty_predictions(tmp_path, demo):
    dataset, annotations = demo
    predictions = _commit(tmp_path, dataset, {"segment vehicles": "supercategory:vehicle"}, drop_semantic=True)
    report = evaluate(EvalConfig(predictions, annotations, str(tmp_path / "e")))
    assert report["task_miou"]["seen"] == 0.0 and report["per_task"]["supercategory:vehicle"]["AP"] == pytest.approx(1.0)


def test_a_run_without_manifests_is_refused(tmp_path, demo):
    _, annotations = demo
    with pytest.raises(ValueError, match="no committed shard"):
        evaluate(EvalConfig(str(tmp_path / "labels" / "nothing"), annotations, str(tmp_path / "e")))


def test_faster_coco_eval_gives_the_same_stats_as_pycocotools(tmp_path, demo):
    dataset, annotations = demo
    tasks = TaskSet.from_dataset(dataset)
    # Imperfect predictions (scores vary, some instances missing, one shifted), so AP is not trivially 1.
    run = RunOutput(str(tmp_path / "labels"), "noisy", None, PARQUET)
    records = [dataset.images[i] for i in dataset.image_ids]
    tracker = ShardTracker(run, ["s0"])
    rows = []
    for n, r in enumerate(records):
        instances = [i for i in dataset.instances[r.id] if tasks.by_id["supercategory:shape"].matches(i)]
        detections = []
        for k, inst in enumerate(instances):
            mask = inst.mask()
            if (n + k) % 3 == 0:
                mask = mask[:, ::-1]  # a wrong mask
            detections.append(encode_mask(mask, "instance", 0.3 + 0.1 * ((n * 7 + k) % 7)))
        rows += detection_rows(r.uri, r.id, "s0", r.width, r.height, {"segment shapes": detections[1:]}, None, "m")
    tracker.add("s0", records[0].uri, 0, shard_items=len(records))
    part = run.write_part("s0", 0, rows, SCHEMA)
    for r in records[1:]:
        tracker.add("s0", r.uri, 1, part, shard_items=len(records))
    slow = evaluate(EvalConfig(run.root, annotations, str(tmp_path / "a")))
    fast = evaluate(EvalConfig(run.root, annotations, str(tmp_path / "b"), backend="faster-coco-eval"))
    assert 0 < slow["overall"]["AP"] < 1
    for name in ("AP", "AP50", "AP75"):
        assert fast["overall"][name] == pytest.approx(slow["overall"][name], abs=1e-6)
        assert fast["per_task"]["supercategory:shape"][name] == pytest.approx(slow["per_task"]["supercategory:shape"][name], abs=1e-6)


def test_the_best_presence_threshold_maximises_image_level_f1():
    from talora.eval.evaluate import best_f1

    truth = {1: True, 2: True, 3: False, 4: False, 5: True}
    scores = {1: 0.9, 2: 0.6, 3: 0.7, 4: 0.55}  # image 5: no semantic row (missed)
    found = best_f1(scores, truth)
    # at 0.55 every row is positive: tp 2, fp 2, fn 1 -> 4/7; at 0.9: tp 1, fn 2 -> 0.5; at 0.6: tp 2, fp 1, fn 1 -> 2/3
    assert found == {"images": 5, "positives": 3, "f1_at_run": round(4 / 7, 4), "best_threshold": 0.6,
                     "best_f1": round(2 / 3, 4)}
    assert best_f1({}, {1: True})["best_threshold"] is None
