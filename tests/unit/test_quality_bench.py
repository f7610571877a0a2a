"""The quality suite's plumbing on tiny inputs: its scoring against known answers, the stable keys,
a dataset without attributes (compositions absent, not errors). Its numbers are reported, never
asserted against a target; training oracles and hypernets needs Ray: tests/integration."""

import json
from pathlib import Path

import numpy as np
import pytest

from talora.backbones.variants import FAMILIES, cpu_preset
from talora.bench.quality import METHODS, QualityConfig, run_quality, write_results
from talora.bench.quality.runs import draw_oracle_tasks
from talora.bench.quality.scoring import MethodScores, Prepared, random_prompts, score_amg
from talora.data.coco import CocoDataset
from talora.predict.predictor import encode_mask
from talora.data.tasks import GROUPS, TaskSet, task_ground_truth
from talora.train.validate import validation_rows

REPO = Path(__file__).resolve().parents[2]
COCO3 = str(REPO / "tests/fixtures/coco3/instances.json")
PRESET = (REPO / "configs/demo_cpu.yaml").read_text()


@pytest.fixture(scope="module")
def demo():
    from talora.data.synthetic import make_split

    coco, _ = make_split(4, seed=5)
    dataset = CocoDataset.from_dict(coco, "unused")
    return dataset, TaskSet.from_dataset(dataset)


def test_method_scores_give_one_for_the_ground_truth_and_zero_for_nothing(demo):
    dataset, tasks = demo
    rows = validation_rows(list(tasks), static=False)
    category_of = {t.id: i + 1 for i, t in enumerate(tasks)}
    gt = task_ground_truth(dataset, tasks)
    perfect, empty = MethodScores(), MethodScores()
    for image_id in dataset.image_ids:
        record, instances = dataset.images[image_id], dataset.instances[image_id]
        truths = {t.id: np.zeros((record.height, record.width), bool) for t in tasks}
        for t in tasks:
            for i in instances:
                if t.matches(i):
                    truths[t.id] |= i.mask()
        image = Prepared(image_id, None, None, (0, 0), (record.height, record.width), truths)
        for task, group, _ in rows:
            found = [encode_mask(i.mask(), "instance", 0.9) for i in instances if task.matches(i)]
            if truths[task.id].any():
                found.append(encode_mask(truths[task.id], "semantic", 0.9))
            perfect.add(task.id, group, category_of[task.id], image, found)
            empty.add(task.id, group, category_of[task.id], image, [])
    good, bad = perfect.summary(gt, category_of, rows, "pycocotools"), empty.summary(gt, category_of, rows, "pycocotools")
    for group in GROUPS:
        assert good[group]["miou"] == pytest.approx(1.0) and good[group]["ap"] == pytest.approx(1.0)
        assert bad[group]["miou"] == 0.0 and bad[group]["ap"] == 0.0
        assert good[group]["tasks"] == len({t.id for t, g, _ in rows if g == group})


def test_random_text_pairs_every_prompt_with_another_task_of_its_group(demo):
    _, tasks = demo
    rows = validation_rows(list(tasks), static=False)
    swapped = random_prompts(rows, seed=0)
    task_of = {p: (t.id, g) for t, g, p in rows}
    assert set(swapped) == set(task_of)
    for prompt, other in swapped.items():
        assert task_of[other][1] == task_of[prompt][1] and task_of[other][0] != task_of[prompt][0]
    assert sorted(swapped.values()) == sorted(swapped)  # a permutation: every prompt is used once
    assert random_prompts(rows, seed=0) == swapped and random_prompts(rows, seed=1) != swapped


def test_oracle_tasks_are_drawn_across_kinds_among_present_trained_tasks(demo):
    _, tasks = demo
    present = {t.id for t in tasks}
    drawn = draw_oracle_tasks(tasks, 4, present, seed=0)
    assert [tasks.by_id[t].kind for t in drawn] == ["category", "supercategory", "attribute", "composition"]
    assert not any(tasks.by_id[t].heldout for t in drawn)
    assert draw_oracle_tasks(tasks, 4, present, seed=0) == drawn
    only = {"category:car"}
    assert draw_oracle_tasks(tasks, 6, only, seed=0) == ["category:car"]


def test_the_quality_suite_on_a_dataset_without_attributes_reports_compositions_absent(tmp_path):
    config = QualityConfig(PRESET, COCO3, COCO3, hypernet="demo://hypernet.safetensors", oracle_tasks=0,
                           val_images=2, points_per_side=4, workdir=str(tmp_path / "train"))
    results = run_quality(config)
    quality = results["quality"]
    assert quality["groups"]["heldout_composition"] is None and quality["references"]["heldout_composition"] is None
    for group in ("seen", "heldout_paraphrase"):
        methods = quality["groups"][group]
        assert set(methods) == set(METHODS)
        for name, value in methods.items():
            assert 0.0 <= value["ap"] <= 1.0 and 0.0 <= value["ap50"] <= 1.0 and value["tasks"] == 6
            assert (value["miou"] is None) == name.startswith("gt_region")
        assert set(quality["references"][group]) == {"every_object", "attribute_only", "category_only"}
    assert quality["oracles"] == [] and quality["targets"]["hypernet_vs_oracle"]["value"] is None
    assert set(quality["targets"]) == {"hypernet_vs_oracle", "ap_vs_amg", "instance_ap_vs_semantic_miou"}
    assert results["config"]["attributes"] is False and results["machine"]["cores"] >= 1

    files = write_results(results, str(tmp_path / "out"))
    assert {Path(f).name for f in files} == {"results.json", "results.md", "methods.png"}
    assert json.loads((tmp_path / "out/results.json").read_text())["quality"]["groups"]["heldout_composition"] is None
    assert "heldout_composition**: absent" in (tmp_path / "out/results.md").read_text()


@pytest.mark.parametrize("kwargs, message", [
    ({"train_annotations": COCO3}, "go together"),
    ({"hypernet": "h.safetensors", "hypernet_steps": 5}, "exclude each other"),
    ({"oracle_steps": 0}, "--oracle-steps"),
])
def test_bad_quality_flags_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QualityConfig(PRESET, **kwargs)


def test_an_unknown_oracle_task_is_refused_before_anything_trains(tmp_path):
    config = QualityConfig(PRESET, COCO3, COCO3, hypernet="demo://hypernet.safetensors", oracle_task=("color:red",),
                           val_images=1, points_per_side=2, workdir=str(tmp_path))
    with pytest.raises(ValueError, match="'color:red' is not a task"):
        run_quality(config)
    assert not (tmp_path / "oracle").exists() and not list(tmp_path.iterdir())


# A detector family (SAM 3) has no automatic mask generator: its own text prompts are its baseline.
@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if not FAMILIES[f].detector))
def test_amg_runs_the_familys_own_generator_and_scores_every_mask_for_every_task(family, demo):
    import torch

    from talora.model.loading import load_model, model_spec
    from talora.predict.predictor import PredictConfig

    dataset, tasks = demo
    torch.manual_seed(0)
    model = load_model(model_spec(cpu_preset(family), untrained=True))
    assert type(model.backbone.automatic_mask_generator()).__module__.split(".")[0] == FAMILIES[family].modules[0]
    # Every threshold open: random weights still give masks, so each is scored under every task.
    config = PredictConfig(points_per_side=8, score_thresh=0.0, stability_thresh=0.0)
    rows = validation_rows(list(tasks), static=False)
    image_id = dataset.image_ids[0]
    record = dataset.images[image_id]
    image = np.random.default_rng(0).integers(0, 256, (record.height, record.width, 3), dtype=np.uint8)
    truths = {t.id: np.zeros((record.height, record.width), bool) for t in tasks}
    prepared = Prepared(image_id, image, None, (0, 0), (record.height, record.width), truths)
    scores = score_amg(model, config, [prepared], rows, {t.id: i + 1 for i, t in enumerate(tasks)})
    for group in GROUPS:
        group_rows = [r for r in rows if r[1] == group]
        found = scores.results[group]
        assert found and len(found) % len(group_rows) == 0
        assert {r["category_id"] for r in found} == {i + 1 for i, t in enumerate(tasks) if (t, group) in
                                                     {(r[0], r[1]) for r in group_rows}}


def test_a_detector_is_scored_by_its_own_text_prompts_in_the_suite_and_the_demo_report(tmp_path, text_encoder):
    """SAM 3 (sam3_tiny): the suite scores no_adapter per row (its text prompt still names the task)
    and leaves out what a detector has no answer for (amg, ground-truth regions); the demo report
    scores the base under category names."""
    import dataclasses

    import torch

    from talora.bench.demo_models import DemoReportConfig, demo_models_report, markdown
    from talora.config import default_config
    from talora.data.synthetic import write_demo_dataset
    from talora.model.loading import build_task_aware_sam, save_backbone, save_hypernet

    torch.manual_seed(0)
    config = default_config("sam3_tiny")
    model = build_task_aware_sam(config, text_encoder)
    base, hypernet = str(tmp_path / "sam3.safetensors"), str(tmp_path / "hypernet.safetensors")
    save_backbone(model.backbone, base)
    model.config = dataclasses.replace(config, sam=dataclasses.replace(config.sam, checkpoint=base))
    save_hypernet(model, hypernet)

    results = run_quality(QualityConfig(PRESET, COCO3, COCO3, hypernet=hypernet, oracle_tasks=0, val_images=2,
                                        workdir=str(tmp_path / "train")))
    quality = results["quality"]
    for group in ("seen", "heldout_paraphrase"):
        methods = quality["groups"][group]
        assert set(methods) == {"no_adapter", "hypernet", "random_text"}
        assert all(0.0 <= v["miou"] <= 1.0 and 0.0 <= v["ap"] <= 1.0 for v in methods.values())
    assert quality["targets"]["ap_vs_amg"]["value"] is None and "amg_s" not in quality["seconds"]

    files = write_demo_dataset(str(tmp_path / "demo"), num_train=4, num_val=2, seed=3)
    report = demo_models_report(DemoReportConfig(hypernet, files["train"], files["val"], val_images=2,
                                                 probe_train_images=4, probe_test_images=2))
    assert set(report["base"]) == {"val_semantic_miou", "val_presence_accuracy"}
    assert set(report["task_miou"]) == set(GROUPS) and "semantic mIoU" in markdown(report)
