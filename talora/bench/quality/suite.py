"""The quality suite run: every method on the same base, images and tasks, the oracles beside the
hypernet, the references from the ground truth, and the targets' verdicts."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from talora.adapters.static import StaticLora
from talora.batch.cluster import init_ray
from talora.bench.demo_models import score_static_run
from talora.bench.quality.ablations import ablations
from talora.bench.quality.config import QualityConfig
from talora.bench.quality.runs import demo_annotations, draw_oracle_tasks, run_spec, train_run, trained_hypernet
from talora.bench.quality.scoring import MethodScores, prepare, random_prompts, score_adapted, score_amg, score_shared
from talora.bench.report import machine, verdicts
from talora.core.text import TextEncoder
from talora.data.coco import CocoDataset
from talora.data.tasks import GROUPS, TaskSet, task_ground_truth
from talora.eval.metrics import reference_scores
from talora.model.loading import DEMO_HYPERNET, check_checkpoint, load_task_aware_sam
from talora.predict.predictor import PredictConfig, TaskAwarePredictor
from talora.train.validate import per_task, validation_rows


def run_quality(config: QualityConfig) -> dict:
    """Every quality measurement; returns {"machine", "config", "quality"} (results.json)."""
    storage = config.storage
    train_uri, val_uri = ((config.train_annotations, config.val_annotations) if config.train_annotations
                          else demo_annotations())
    train = CocoDataset.load(train_uri, storage=storage)  # a bad URI fails here, before anything trains
    val = CocoDataset.load(val_uri, storage=storage)
    image_ids = val.image_ids[: config.val_images]
    tasks = TaskSet.from_dataset(train)
    if not len(tasks):
        raise ValueError(f"{train_uri}: no categories, so no tasks to score")
    unknown = [t for t in config.oracle_task if t not in tasks.by_id]
    if unknown:
        raise ValueError(f"--oracle-task {unknown[0]!r} is not a task of {train_uri} "
                         f"(tasks look like {', '.join(t.id for t in list(tasks)[:3])})")
    timings: dict[str, float] = {}

    start = time.perf_counter()
    hypernet = config.hypernet
    if hypernet is None and (config.hypernet_steps or config.train_annotations):
        spec = run_spec(config, train_uri, val_uri, max_steps=1)
        if spec.model.sam.checkpoint:  # a base of another variant than the preset's fails here, not in a worker
            check_checkpoint(spec.model.sam.checkpoint, spec.model.sam.sam_type, storage)
        init_ray()
        hypernet = trained_hypernet(config, train_uri, val_uri, config.hypernet_steps or 3000)
        timings["train_hypernet_s"] = time.perf_counter() - start
    hypernet = hypernet or DEMO_HYPERNET
    model = load_task_aware_sam(hypernet, config.sam_checkpoint, TextEncoder(), storage).eval()
    base = model.config.sam.checkpoint
    detector = model.backbone.detector
    # A detector's AP is scored over all its queries (score x presence, de-duplicated), as DETR-style
    # detectors are evaluated; the labelling job's 0.5 keeps what Sam3Processor keeps.
    predict_config = PredictConfig(points_per_side=config.points_per_side, **({"score_thresh": 0.0} if detector else {}))
    predictor = TaskAwarePredictor(model, predict_config)

    rows = validation_rows(list(tasks), static=False)  # (task, group, prompt)
    gt = task_ground_truth(val, tasks)
    scored = set(image_ids)
    gt = {**gt, "images": [i for i in gt["images"] if i["id"] in scored],
          "annotations": [a for a in gt["annotations"] if a["image_id"] in scored]}
    category_of = {t.id: i + 1 for i, t in enumerate(tasks)}
    images = prepare(model, val, image_ids, tasks)

    # --- the methods ------------------------------------------------------------------------------
    methods: dict[str, MethodScores] = {}
    swapped = random_prompts(rows, config.seed)
    zero_shared = StaticLora(model.targets, model.config.lora.rank, model.config.lora.scale)()  # B = 0: Delta W = 0
    zero = zero_shared.expand(1)
    # A detector (SAM 3) reads every row's prompt as its own text prompt, so with no adapter it still
    # answers per task; it has no automatic mask generator and takes no task regions.
    no_adapter = ((lambda: score_adapted(predictor, images, rows, category_of,
                                         lambda prompts: zero_shared.expand(len(prompts)))) if detector
                  else (lambda: score_shared(predictor, images, rows, category_of, zero)))
    for name, score in (
        ("amg", None if detector else lambda: score_amg(model, predict_config, images, rows, category_of)),
        ("no_adapter", no_adapter),
        ("hypernet", lambda: score_adapted(predictor, images, rows, category_of, model.adapters)),
        ("random_text", lambda: score_adapted(predictor, images, rows, category_of,
                                              lambda prompts: model.adapters([swapped[p] for p in prompts]))),
        ("gt_region", None if detector else lambda: score_adapted(predictor, images, rows, category_of,
                                                                  model.adapters, truth_regions=True)),
        ("gt_region_base", None if detector else lambda: score_adapted(
            predictor, images, rows, category_of, lambda prompts: zero_shared.expand(len(prompts)),
            truth_regions=True)),
    ):
        if score is None:
            continue
        t0 = time.perf_counter()
        methods[name] = score()
        timings[f"{name}_s"] = time.perf_counter() - t0
    groups: dict = {g: {} for g in GROUPS}
    for name, scores in methods.items():
        semantic = not name.startswith("gt_region")  # their region is the truth: no mIoU of their own
        for group, value in scores.summary(gt, category_of, rows, config.backend, semantic).items():
            groups[group][name] = value
    groups = {g: (None if all(v is None for v in m.values()) else m) for g, m in groups.items()}
    hyper_per_task = per_task(methods["hypernet"].ious)
    references = reference_scores(val, tasks, image_ids)
    references = {g: (references[g] if groups[g] is not None else None) for g in GROUPS}

    # --- oracles ----------------------------------------------------------------------------------
    present = {t.id for t in tasks if any(image.truths[t.id].any() for image in images)}
    oracle_ids = list(config.oracle_task) or draw_oracle_tasks(tasks, config.oracle_tasks, present, config.seed)
    oracles = []
    t0 = time.perf_counter()
    if oracle_ids:
        init_ray()
        oracle_model = dataclasses.replace(model.config, sam=dataclasses.replace(model.config.sam, checkpoint=base))
        for task_id in oracle_ids:
            lr = {"lr": config.oracle_lr} if config.oracle_lr else {}
            spec = run_spec(config, train_uri, val_uri, oracle_model, max_steps=config.oracle_steps, mode="static",
                            task=task_id, **lr)
            run = train_run(spec, "oracle-" + task_id.replace(":", "_").replace("+", "_"), config.workdir, storage)
            _, oracle_miou = score_static_run(run, val, image_ids, storage)
            group = "heldout_composition" if tasks.by_id[task_id].heldout else "seen"
            hyper_miou = hyper_per_task.get(group, {}).get(task_id)
            oracles.append({"task": task_id, "kind": tasks.by_id[task_id].kind, "oracle_miou": oracle_miou,
                            "hypernet_miou": hyper_miou,
                            "ratio": hyper_miou / oracle_miou if hyper_miou is not None and oracle_miou else None,
                            "collapsed": not oracle_miou, "run": run})  # collapsed: empty masks everywhere
    timings["oracles_s"] = time.perf_counter() - t0

    quality = {"groups": groups, "oracles": oracles, "references": references,
               "hypernet_per_task": hyper_per_task, "seconds": timings}
    quality["targets"] = targets(quality)
    if config.ablations:
        init_ray()
        quality["ablations"] = ablations(config, train_uri, val_uri, val, image_ids, tasks)
    describe = {"train_annotations": train_uri, "val_annotations": val_uri, "val_images": len(image_ids),
                "hypernet": hypernet, "sam_checkpoint": base, "tasks": len(tasks),
                "attributes": any(t.kind == "attribute" for t in tasks), "points_per_side": config.points_per_side,
                "oracle_steps": config.oracle_steps, "oracle_lr": config.oracle_lr,
                "hypernet_steps": config.hypernet_steps, "seed": config.seed}
    return {"machine": machine(torch.device("cpu")), "config": describe, "quality": quality}


def targets(quality: dict) -> dict:
    """The suite's targets (not assertions): each measured value, its target and whether it is met."""
    seen = (quality["groups"].get("seen") or {})
    hyper, amg = seen.get("hypernet") or {}, seen.get("amg") or {}
    ratios = [o["ratio"] for o in quality["oracles"] if o["ratio"] is not None]
    measured = {
        "hypernet_vs_oracle": (float(np.mean(ratios)) if ratios else None, 1.0),
        "ap_vs_amg": (hyper["ap"] / amg["ap"] if hyper.get("ap") is not None and amg.get("ap") else None, 3.0),
        "instance_ap_vs_semantic_miou": (hyper["ap"] / hyper["miou"] if hyper.get("miou") else None, 0.8),
    }
    out = verdicts(measured)
    out["hypernet_vs_oracle"]["median"] = float(np.median(ratios)) if ratios else None  # one easy task moves the mean
    out["hypernet_vs_oracle"]["collapsed_oracles"] = sum(o["collapsed"] for o in quality["oracles"])
    return out
