"""Validation numbers of a base SAM and a hypernet trained on it (the README's demo-models table).

    python jobs/report_demo_models.py --hypernet runs/demo-models/hypernet.safetensors \\
        --train-annotations data/demo-models/train/instances.json \\
        --val-annotations data/demo-models/val/instances.json \\
        --static-run runs/demo-models/static-category_car ... --out runs/demo-models/report

Reports, on the validation images:
- the base: point- and box-prompt mIoU (one interior point / the exact box per instance) and
  linear-probe accuracy of its trunk features (category, supercategory, colour vs chance);
- the hypernet: task mIoU per group (seen / held-out paraphrase / held-out composition) beside the
  ground-truth references (every object / attribute only / category only), and the same model
  with no adapter (Delta W = 0: one prompt-free mask for every task) as the floor;
- per-task static LoRAs (`--static-run`, a static-mode training run folder): each on its task
  beside the hypernet on the same task, and their ratio.
Writes report.json and report.md under --out; prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from talora.jobs_common import add_storage_flags, run_main, storage_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hypernet", required=True, help="hypernet file (path or URI)")
    p.add_argument("--sam-checkpoint", default=None, help="the base (default: the one the hypernet file names)")
    p.add_argument("--train-annotations", required=True, help="COCO JSON the probe is fitted on")
    p.add_argument("--val-annotations", required=True, help="COCO JSON everything is scored on")
    p.add_argument("--val-images", type=int, default=40, help="validation images scored")
    p.add_argument("--probe-train-images", type=int, default=2048, help="training images the linear probe is fitted on")
    p.add_argument("--probe-test-images", type=int, default=100, help="validation images the linear probe is scored on")
    p.add_argument("--static-run", action="append", default=[], help="a static-mode run folder (repeatable)")
    p.add_argument("--out", required=True, help="output folder: report.json, report.md")
    add_storage_flags(p)
    return p


def latest_checkpoint(run: str) -> str:
    """The newest checkpoint folder of a local training run (one holding state.json)."""
    found = sorted(d for d in os.listdir(run) if os.path.isfile(os.path.join(run, d, "state.json")))
    if not found:
        raise FileNotFoundError(f"no checkpoint folder in {run}")
    return os.path.join(run, found[-1])


def score_static_run(run: str, dataset, image_ids, storage):
    """(task id, IoU) of a static run's latest checkpoint on its task, as validated in training."""
    from talora.model import build_task_aware_sam
    from talora.static import StaticLora
    from talora.train.config import load_run_spec
    from talora.train.step import TrainStep
    from talora.train.validate import per_task, score_tasks, validation_rows
    from talora.tasks import TaskSet
    from talora.weights import read_weights

    checkpoint = latest_checkpoint(run)
    with open(os.path.join(checkpoint, "config.yaml")) as f:
        spec = load_run_spec(f.read())
    model = build_task_aware_sam(spec.model, storage=storage).eval()
    step = TrainStep(model, StaticLora(model.targets, spec.model.lora.rank, spec.model.lora.scale))
    step.load_state_dict(read_weights(os.path.join(checkpoint, "trainable.safetensors"))[0])
    task = TaskSet.from_dataset(dataset).by_id[spec.train.task]
    ious = per_task(score_tasks(step.eval(), dataset, image_ids, validation_rows([task], static=True), None))
    return task.id, ious.get("seen", {}).get(task.id)


def report(args, storage) -> dict:
    import torch

    from talora.data.coco import CocoDataset
    from talora.metrics import mean, reference_scores
    from talora.model import load_task_aware_sam
    from talora.probe import probe_base
    from talora.static import StaticLora
    from talora.tasks import TaskSet
    from talora.text import TextEncoder
    from talora.train.pretrain import ImageMemo, PretrainStep, validate_pretrain
    from talora.train.step import TrainStep
    from talora.train.validate import per_task, score_tasks, validation_rows

    train = CocoDataset.load(args.train_annotations, storage=storage)
    val = CocoDataset.load(args.val_annotations, storage=storage)
    image_ids = val.image_ids[: args.val_images]
    model = load_task_aware_sam(args.hypernet, args.sam_checkpoint, TextEncoder(), storage).eval()
    sam = model.sam
    out: dict = {"hypernet": args.hypernet, "sam_checkpoint": model.config.sam.checkpoint,
                 "val_images": len(image_ids), "val_annotations": args.val_annotations}

    # --- the base ------------------------------------------------------------------------------
    memo = ImageMemo(sam, val, {}, storage)
    sums = validate_pretrain(PretrainStep(sam, model.tail_blocks, {}).eval(), [memo(i) for i in image_ids], {})
    out["base"] = {k: s / c for k, (s, c) in sums.items() if c}
    probes = probe_base(sam, train, val, model.tail_blocks, train_images=args.probe_train_images,
                        test_images=args.probe_test_images, storage=storage)
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
    for run in args.static_run:
        task_id, iou = score_static_run(run, val, image_ids, storage)
        h = hyper.get("seen", {}).get(task_id)
        out["static"].append({"task": task_id, "static": iou, "hypernet": h,
                              "ratio": h / iou if h is not None and iou else None, "run": run})
    return out


def markdown(r: dict) -> str:
    def f(v):
        return "–" if v is None else f"{v:.3f}"

    lines = [f"Validation: {r['val_images']} images of {r['val_annotations']}", "",
             f"Base: point-prompt mIoU {f(r['base'].get('val_point_miou'))}, box-prompt mIoU "
             f"{f(r['base'].get('val_box_miou'))}", "",
             "| probe (trunk cells inside objects) | accuracy | chance |", "|---|---|---|"]
    lines += [f"| {k} | {f(v['accuracy'])} | {f(v['chance'])} |" for k, v in r["probe"].items()]
    lines += ["", "| task mIoU | hypernet | no adapter | every object | attribute only | category only | tasks |",
              "|---|---|---|---|---|---|---|"]
    for g, v in r["task_miou"].items():
        lines.append(f"| {g} | {f(v['hypernet'])} | {f(v['no_adapter'])} | {f(v.get('every_object'))} | "
                     f"{f(v.get('attribute_only'))} | {f(v.get('category_only'))} | {v['tasks']} |")
    if r["static"]:
        lines += ["", "| task (seen prompt) | static LoRA | hypernet | hypernet / static |", "|---|---|---|---|"]
        lines += [f"| {s['task']} | {f(s['static'])} | {f(s['hypernet'])} | {f(s['ratio'])} |" for s in r["static"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    storage = storage_from_args(args)

    def job() -> int:
        r = report(args, storage)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "report.json"), "w") as f:
            json.dump(r, f, indent=1)
        text = markdown(r)
        with open(os.path.join(args.out, "report.md"), "w") as f:
            f.write(text)
        print(text)
        return 0

    return run_main("report_demo_models", job, storage)


if __name__ == "__main__":
    sys.exit(main())
