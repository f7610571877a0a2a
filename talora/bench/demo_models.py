"""Validation numbers of a base SAM and a hypernet trained on it (`jobs/report_demo_models.py`).

On the validation images:
- the base: point- and box-prompt mIoU (one interior point / the exact box per instance; a
  detector's semantic mIoU and presence accuracy under category names instead) and linear-probe
  accuracy of its trunk features (category, supercategory, colour vs chance);
- the hypernet: task mIoU per group (seen / held-out paraphrase / held-out composition) beside the
  ground-truth references (every object / attribute only / category only), and the same model
  with no adapter (Delta W = 0: one prompt-free mask for every task) as the floor;
- per-task static LoRAs (static-mode training runs): each on its task beside the hypernet on the
  same task, and their ratio.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from talora.adapters.static import StaticLora
from talora.core.text import TextEncoder
from talora.data.coco import CocoDataset
from talora.data.tasks import TaskSet
from talora.eval.metrics import mean, reference_scores
from talora.eval.probe import probe_base
from talora.io.storage import StorageOptions, join, read_bytes
from talora.io.weights import read_weights
from talora.markdown import fmt, table
from talora.model.loading import build_task_aware_sam, load_task_aware_sam
from talora.train.checkpoint import run_checkpoint
from talora.train.config import load_run_spec
from talora.train.pretrain import ImageMemo, build_pretrain_step
from talora.train.step import TrainStep
from talora.train.validate import per_task, score_tasks, validation_rows


@dataclass(frozen=True)
class DemoReportConfig:
    hypernet: str
    train_annotations: str  # the probe is fitted on these
    val_annotations: str  # everything is scored on these
    sam_checkpoint: str | None = None  # default: the base the hypernet file names
    val_images: int = 40
    probe_train_images: int = 2048
    probe_test_images: int = 100
    static_runs: tuple[str, ...] = ()  # static-mode training run folders
    storage: StorageOptions = field(default_factory=StorageOptions)


def score_static_run(run: str, dataset, image_ids, storage: StorageOptions | None):
    """(task id, IoU) of a finished static run's latest checkpoint on its task, as validated in training."""
    checkpoint = run_checkpoint(run, "latest", storage)
    spec = load_run_spec(read_bytes(join(checkpoint, "config.yaml"), storage).decode())
    model = build_task_aware_sam(spec.model, storage=storage).eval()
    step = TrainStep(model, StaticLora(model.targets, spec.model.lora.rank, spec.model.lora.scale))
    step.load_state_dict(read_weights(join(checkpoint, "trainable.safetensors"), storage)[0])
    task = TaskSet.from_dataset(dataset).by_id[spec.train.task]
    ious = per_task(score_tasks(step.eval(), dataset, image_ids, validation_rows([task], static=True), None))
    return task.id, ious.get("seen", {}).get(task.id)


def demo_models_report(config: DemoReportConfig) -> dict:
    storage = config.storage
    train = CocoDataset.load(config.train_annotations, storage=storage)
    val = CocoDataset.load(config.val_annotations, storage=storage)
    image_ids = val.image_ids[: config.val_images]
    model = load_task_aware_sam(config.hypernet, config.sam_checkpoint, TextEncoder(), storage).eval()
    out: dict = {"hypernet": config.hypernet, "sam_checkpoint": model.config.sam.checkpoint,
                 "val_images": len(image_ids), "val_annotations": config.val_annotations}

    # --- the base ------------------------------------------------------------------------------
    memo = ImageMemo(model.backbone, val, {}, storage)
    step = build_pretrain_step(model.backbone, model.tail_blocks, {}, train).eval()  # prompted as it was pretrained
    sums = step.validate([memo(i) for i in image_ids], [val.images[i] for i in image_ids], val)
    out["base"] = {k: s / c for k, (s, c) in sums.items() if c}
    probes = probe_base(model.backbone, train, val, model.tail_blocks, train_images=config.probe_train_images,
                        test_images=config.probe_test_images, storage=storage)
    out["probe"] = {r.key: {"accuracy": r.accuracy, "chance": r.chance, "test_cells": r.test_cells} for r in probes}

    # --- the hypernet, its floor and the references -------------------------------------------
    tasks = TaskSet.from_dataset(train)
    rows = validation_rows(list(tasks), static=False)
    with torch.no_grad():
        text = model.text_encoder.encode([p for _, _, p in rows])
    hyper = per_task(score_tasks(TrainStep(model, model.hypernet).eval(), val, image_ids, rows, text))
    no_adapter = StaticLora(model.targets, model.config.lora.rank, model.config.lora.scale)  # B = 0: Delta W = 0
    floor = per_task(score_tasks(TrainStep(model, no_adapter).eval(), val, image_ids, rows, None))
    references = reference_scores(val, tasks, image_ids)
    out["task_miou"] = {g: {"hypernet": mean(hyper.get(g, {}).values()), "no_adapter": mean(floor.get(g, {}).values()),
                            **(references.get(g) or {}), "tasks": len(hyper.get(g, {}))} for g in hyper}
    out["hypernet_per_task"] = hyper

    # --- static oracles --------------------------------------------------------------------------
    out["static"] = []
    for run in config.static_runs:
        task_id, iou = score_static_run(run, val, image_ids, storage)
        h = hyper.get("seen", {}).get(task_id)
        out["static"].append({"task": task_id, "static": iou, "hypernet": h,
                              "ratio": h / iou if h is not None and iou else None, "run": run})
    return out


def markdown(r: dict) -> str:
    base = r["base"]
    lines = [f"Validation: {r['val_images']} images of {r['val_annotations']}", "",
             f"Base: point-prompt mIoU {fmt(base.get('val_point_miou'))}, box-prompt mIoU "
             f"{fmt(base.get('val_box_miou'))}" if "val_semantic_miou" not in base else
             f"Base (a detector, prompted by category names): semantic mIoU {fmt(base['val_semantic_miou'])}, "
             f"presence accuracy {fmt(base.get('val_presence_accuracy'))}", ""]
    lines += table(["probe (trunk cells inside objects)", "accuracy", "chance"],
                   [[k, v["accuracy"], v["chance"]] for k, v in r["probe"].items()])
    lines += [""] + table(["task mIoU", "hypernet", "no adapter", "every object", "attribute only", "category only",
                           "tasks"],
                          [[g, v["hypernet"], v["no_adapter"], v.get("every_object"), v.get("attribute_only"),
                            v.get("category_only"), v["tasks"]] for g, v in r["task_miou"].items()])
    if r["static"]:
        lines += [""] + table(["task (seen prompt)", "static LoRA", "hypernet", "hypernet / static"],
                              [[s["task"], s["static"], s["hypernet"], s["ratio"]] for s in r["static"]])
    return "\n".join(lines) + "\n"
