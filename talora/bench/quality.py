"""The quality suite (`jobs/benchmark.py --suite quality`): talora against what a user would do
instead, on the same frozen SAM, the same validation images and the same tasks.

Methods, each scored per group (seen prompt, held-out paraphrase, held-out composition) by task
mIoU (its semantic masks) and mask AP / AP50 (its instances; COCOeval with the tasks as categories):

- amg: no adapter at all: the family's own automatic mask generator on the same base (the
  same grid and filters as the instance pass), every mask labelled with every task and scored by
  its predicted IoU; its semantic mask is the union of its masks;
- no_adapter: the task-aware model with Delta W = 0 (one prompt-free answer for every task);
- hypernet: the given (or shipped, or freshly trained) hypernet;
- random_text: the same hypernet fed another task's prompt (seeded): does the text matter?
- gt_region: the hypernet's instance pass inside the ground-truth task region instead of its own:
  the instance stage's ceiling under perfect recognition (mIoU: n/a);
- gt_region_base: the base's instance pass (Delta W = 0) inside the ground-truth task region: what
  the adapter adds to the point masks;
- oracles: one static LoRA per drawn task, trained for `oracle_steps` on the same base, beside the
  hypernet's mIoU on the same task (seen prompt) and their ratio;
- references from the ground truth: every object, attribute only, category only (task mIoU);
- ablations (opt-in, they train): lora vs tucker adapters at equal steps with the values the
  hypernet generates per adapter; decoder-only vs encoder tail k = 1, 2 with the per-prompt cost.

A dataset whose categories carry no attributes has category and supercategory tasks only; the
composition group is then reported as absent (None), not as an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from pycocotools import mask as mask_utils

from talora.adapters.static import StaticLora
from talora.bench.demo_models import score_static_run
from talora.bench.report import machine, verdicts, write_files
from talora.bench.timing import median_seconds
from talora.batch.cluster import init_ray
from talora.config import ModelConfig, from_dict, to_dict
from talora.core.text import TextEncoder
from talora.data.coco import CocoDataset
from talora.data.synthetic import ensure_demo_dataset
from talora.data.tasks import GROUPS, TaskSet, semantic_mask, task_ground_truth
from talora.eval.evaluate import coco_stats
from talora.eval.metrics import TaskIoU, mean, reference_scores
from talora.io.images import figure_png, pyplot
from talora.io.storage import StorageOptions, join, read_bytes
from talora.markdown import fmt, table
from talora.model.loading import DEMO_HYPERNET, check_checkpoint, load_task_aware_sam
from talora.predict.predictor import Detection, PredictConfig, TaskAwarePredictor, encode_mask
from talora.train.checkpoint import SUMMARY, run_checkpoint
from talora.train.config import dump_run_spec, load_run_spec
from talora.train.step import TrainStep
from talora.train.trainer import run_training
from talora.train.validate import per_task, score_tasks, validation_rows

METHODS = ("amg", "no_adapter", "hypernet", "random_text", "gt_region", "gt_region_base")
DEMO_MODELS_DATA = "data/demo-models"  # the shipped hypernet's training and validation data (make demo-models)
KINDS = ("category", "supercategory", "attribute", "composition")  # oracle tasks are drawn across these in turn


@dataclass(frozen=True)
class QualityConfig:
    preset: str  # YAML text of a training preset: how oracles (and a hypernet, ablations) are trained
    train_annotations: str | None = None  # None: the demo domain (DEMO_MODELS_DATA, generated if missing)
    val_annotations: str | None = None
    sam_checkpoint: str | None = None  # the frozen base; default: the one the hypernet names (the demo base)
    hypernet: str | None = None  # None: the shipped one on the demo domain, else one trained for hypernet_steps
    hypernet_steps: int | None = None  # train a hypernet for this many steps (default 3000 when one is trained)
    oracle_tasks: int = 6
    oracle_task: tuple[str, ...] = ()  # explicit task ids (instead of drawing oracle_tasks)
    oracle_steps: int = 1000
    # A static LoRA starts at B = 0 and learns one task; at the hypernet preset's 3e-4, 3 of 6 demo
    # oracles ended at empty masks within 1000 steps; at 1e-3 they learn (docs/results.md).
    oracle_lr: float | None = 1e-3  # None: the preset's
    val_images: int = 40
    points_per_side: int = 16  # the instance grid (the labelling job's default)
    ablations: bool = False
    ablation_steps: int | None = None  # default: hypernet_steps, else 1000
    seed: int = 0
    workdir: str = "runs/bench/train"  # training runs; a run with the same config is reused, not retrained
    backend: str = "pycocotools"
    storage: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self) -> None:
        for name, least in (("oracle_tasks", 0), ("oracle_steps", 1), ("val_images", 1), ("points_per_side", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(self, name)}")
        for name in ("hypernet_steps", "ablation_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if (self.train_annotations is None) != (self.val_annotations is None):
            raise ValueError("--train-annotations and --val-annotations go together (neither: the demo domain)")
        if self.hypernet and self.hypernet_steps:
            raise ValueError("--hypernet and --hypernet-steps exclude each other: score a given hypernet, or train one")


# --- data, models and training runs -------------------------------------------------------------


def demo_annotations(root: str = DEMO_MODELS_DATA) -> tuple[str, str]:
    """(train, val) annotations of the demo models' data (3000 + 100 images, seed 0), written on first use."""
    train, val = (os.path.join(root, split, "instances.json") for split in ("train", "val"))
    ensure_demo_dataset(val)
    return train, val


def train_run(spec, name: str, workdir: str, storage: StorageOptions) -> str:
    """Trains `spec` under `workdir`/`name`-<digest of the spec> (Ray Train) and returns the run URI.
    A finished run of the same spec is reused: training is the expensive part of a rerun."""
    digest = hashlib.sha256(dump_run_spec(spec).encode()).hexdigest()[:10]
    name = f"{name}-{digest}"
    run = join(workdir, name)
    try:
        read_bytes(join(run, SUMMARY), storage)
        return run
    except FileNotFoundError:
        pass
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, storage_path=workdir, name=name))
    run_training(spec, storage)
    return run


def run_spec(config: QualityConfig, train: str, val: str, model=None, **train_fields):
    """The preset's spec for one training run: these annotations, `model` (default: the preset's, on
    the base), one validation at the last step, and `train_fields`."""
    spec = load_run_spec(config.preset)
    if model is None and config.sam_checkpoint:
        model = dataclasses.replace(spec.model, sam=dataclasses.replace(spec.model.sam, checkpoint=config.sam_checkpoint))
    steps = train_fields.pop("max_steps")
    trained = dataclasses.replace(spec.train, train_annotations=train, val_annotations=val, max_steps=steps,
                                  val_every=steps, val_images=config.val_images, warmup_steps=min(
                                      spec.train.warmup_steps, max(1, steps // 10)), **train_fields)
    return dataclasses.replace(spec, model=model or spec.model, train=trained)


def trained_hypernet(config: QualityConfig, train: str, val: str, steps: int, name: str = "hypernet", **model_fields):
    """The hypernet file of a hypernet run of `steps` steps (model overrides: {section: {field: value}})."""
    spec = run_spec(config, train, val, max_steps=steps, mode="hypernet")
    if model_fields:
        data = to_dict(spec.model)
        for section, values in model_fields.items():
            data[section] = {**data[section], **values}
        spec = dataclasses.replace(spec, model=from_dict(ModelConfig, data, "model."))
    run = train_run(spec, name, config.workdir, config.storage)
    return join(run_checkpoint(run, "latest", config.storage), "hypernet.safetensors")


def draw_oracle_tasks(tasks, count: int, present: set[str], seed: int) -> list[str]:
    """`count` task ids drawn (seeded) across KINDS in turn, among trained tasks present in the scored images."""
    rng = random.Random(seed)
    pools = {kind: sorted(t.id for t in tasks if t.kind == kind and not t.heldout and t.id in present) for kind in KINDS}
    for pool in pools.values():
        rng.shuffle(pool)
    drawn: list[str] = []
    while len(drawn) < count and any(pools.values()):
        for kind in KINDS:
            if pools[kind] and len(drawn) < count:
                drawn.append(pools[kind].pop())
    return drawn


# --- scoring ------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """One validation image, encoded once and shared by every method."""

    image_id: int
    image: np.ndarray  # HWC uint8 RGB
    trunk: torch.Tensor  # (1, h, w, C)
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    truths: dict[str, np.ndarray]  # task id -> (H, W) bool semantic ground truth


class MethodScores:
    """Task IoU and COCO results of one method, by group."""

    def __init__(self) -> None:
        self.ious = TaskIoU()
        self.results: dict[str, list[dict]] = {g: [] for g in GROUPS}

    def add(self, task_id: str, group: str, category_id: int, image: Prepared, detections) -> None:
        semantic = [d for d in detections if d.kind == "semantic"]
        pred = decode_rle(semantic[0].rle) if semantic else np.zeros_like(image.truths[task_id])
        self.ious.add((task_id, group), pred, image.truths[task_id])
        self.results[group] += [{"image_id": image.image_id, "category_id": category_id, "segmentation": d.rle,
                                 "score": d.score} for d in detections if d.kind == "instance"]

    def summary(self, gt: dict, category_of: dict[str, int], rows, backend: str, semantic: bool = True) -> dict:
        """{group: {miou, ap, ap50, tasks}} for each group with rows; None for a group without."""
        per_key = self.ious.per_key()
        out = {}
        for group in GROUPS:
            task_ids = sorted({t.id for t, g, _ in rows if g == group})
            if not task_ids:
                out[group] = None
                continue
            stats = coco_stats(gt, self.results[group], [category_of[t] for t in task_ids], backend)
            out[group] = {"miou": mean(v for (t, g), v in per_key.items() if g == group) if semantic else None,
                          "ap": stats["AP"], "ap50": stats["AP50"], "tasks": len(task_ids)}
        return out


def decode_rle(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def prepare(model, dataset, image_ids: list[int], tasks) -> list[Prepared]:
    prepared = []
    with torch.no_grad():
        for image_id in image_ids:
            record, image = dataset.images[image_id], dataset.load_image(image_id)
            resized = model.backbone.resize(image)
            trunk = model.embed_trunk(model.backbone.normalize(resized))
            truths = {t.id: semantic_mask([i for i in dataset.instances[image_id] if t.matches(i)], record.height,
                                          record.width) for t in tasks}
            prepared.append(Prepared(image_id, image, trunk, tuple(resized.shape[:2]), (record.height, record.width),
                                     truths))
    return prepared


def score_adapted(predictor, images: list[Prepared], rows, category_of, adapter_of, truth_regions: bool = False,
                  chunk: int = 32) -> MethodScores:
    """A method that runs the task-aware predictor: `adapter_of(prompts)` gives one adapter row per
    row of a chunk (rows: (task, group, prompt)); `truth_regions` runs the instance pass in the
    ground-truth task region."""
    scores = MethodScores()
    device = predictor.device
    for image in images:
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            regions = [torch.as_tensor(image.truths[t.id], device=device) for t, _, _ in part] if truth_regions else None
            detections = predictor.predict_rows(image.trunk, adapter_of([p for _, _, p in part]), image.input_size,
                                                image.original_size, regions)
            for (task, group, _), found in zip(part, detections):
                scores.add(task.id, group, category_of[task.id], image, found)
    return scores


def score_shared(predictor, images: list[Prepared], rows, category_of, adapter) -> MethodScores:
    """A method whose answer does not depend on the task (one adapter row): predicted once per image,
    scored for every row."""
    scores = MethodScores()
    for image in images:
        (found,) = predictor.predict_rows(image.trunk, adapter, image.input_size, image.original_size)
        for task, group, _ in rows:
            scores.add(task.id, group, category_of[task.id], image, found)
    return scores


def score_amg(model, predict_config, images: list[Prepared], rows, category_of) -> MethodScores:
    """The family's own automatic mask generator on the frozen base (no adapter is set outside
    talora's adapter contexts), with the instance pass's grid and filters."""
    generator = model.backbone.automatic_mask_generator(
        points_per_side=predict_config.points_per_side, points_per_batch=predict_config.points_per_batch,
        pred_iou_thresh=predict_config.score_thresh, stability_score_thresh=predict_config.stability_thresh,
        stability_score_offset=predict_config.stability_offset, box_nms_thresh=predict_config.nms_thresh,
        output_mode="coco_rle")
    scores = MethodScores()
    for image in images:
        with torch.no_grad():
            masks = generator.generate(image.image)
        found = [Detection("instance", m["segmentation"], m["bbox"], m["area"], m["predicted_iou"]) for m in masks]
        union = np.zeros(image.original_size, dtype=bool)
        for m in masks:
            union |= decode_rle(m["segmentation"])
        if union.any():
            found.append(encode_mask(union, "semantic", 1.0))
        for task, group, _ in rows:
            scores.add(task.id, group, category_of[task.id], image, found)
    return scores


def random_prompts(rows, seed: int) -> dict[str, str]:
    """Each row's prompt -> the same-group prompt of another task (a seeded derangement of tasks)."""
    rng = random.Random(seed)
    swapped = {}
    for group in GROUPS:
        part = [(t, p) for t, g, p in rows if g == group]
        if len(part) < 2:
            swapped.update({p: p for _, p in part})
            continue
        order = list(range(len(part)))
        while any(part[i][0].id == part[j][0].id for i, j in enumerate(order)):
            rng.shuffle(order)
        swapped.update({part[i][1]: part[j][1] for i, j in enumerate(order)})
    return swapped


# --- the suite ----------------------------------------------------------------------------------


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
    predict_config = PredictConfig(points_per_side=config.points_per_side)
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
    for name, score in (
        ("amg", lambda: score_amg(model, predict_config, images, rows, category_of)),
        ("no_adapter", lambda: score_shared(predictor, images, rows, category_of, zero)),
        ("hypernet", lambda: score_adapted(predictor, images, rows, category_of, model.adapters)),
        ("random_text", lambda: score_adapted(predictor, images, rows, category_of,
                                              lambda prompts: model.adapters([swapped[p] for p in prompts]))),
        ("gt_region", lambda: score_adapted(predictor, images, rows, category_of, model.adapters, truth_regions=True)),
        ("gt_region_base", lambda: score_adapted(predictor, images, rows, category_of,
                                                 lambda prompts: zero_shared.expand(len(prompts)), truth_regions=True)),
    ):
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


def ablations(config: QualityConfig, train_uri: str, val_uri: str, val, image_ids, tasks) -> dict:
    """Hypernets trained side by side at equal steps: lora vs tucker adapters, decoder-only vs
    encoder tail k = 1, 2; each with its task mIoU per group, the values its hypernet generates per
    adapter, and the seconds per prompt of the adapted part (tail + semantic decode) on one image."""
    steps = config.ablation_steps or config.hypernet_steps or 1000
    variants = {"lora": {}, "tucker": {"hypernet": {"adapter_type": "tucker"}},
                "decoder_only": {"lora": {"image_encoder": False}}}
    default_k = run_spec(config, train_uri, val_uri, max_steps=1).model.tail_blocks
    for k in (1, 2):  # the preset's own k is the `lora` run itself
        variants[f"tail_k{k}"] = {} if k == default_k else {"lora": {"tail_blocks": k}}
    rows = validation_rows(list(tasks), static=False)
    encoder = TextEncoder()
    out = {"steps": steps}
    for name, fields in variants.items():
        file = trained_hypernet(config, train_uri, val_uri, steps, name="ablation", **fields)  # a repeated spec trains once
        model = load_task_aware_sam(file, config.sam_checkpoint, encoder, config.storage).eval()
        kind, rank = model.config.hypernet.adapter_type, model.config.lora.rank
        with torch.no_grad():
            text = encoder.encode([p for _, _, p in rows])
            ious = per_task(score_tasks(TrainStep(model, model.hypernet).eval(), val, image_ids, rows, text))
            # lora: A and B per target (r x (in + out)); tucker: an r x r core per target
            generated = (sum(a.numel() + b.numel() for a, b in model.hypernet(text[:1]).weights.values())
                         if kind == "lora" else rank * rank * len(model.targets))
            adapter = model.adapters([rows[0][2]])
            x, _ = model.preprocess(val.load_image(image_ids[0]))
            trunk = model.embed_trunk(x[None])

            def adapted(trunk=trunk, adapter=adapter, model=model) -> None:
                model.decode(model.embed_tail(trunk, adapter), adapter, multimask_output=False)

            per_prompt = median_seconds(adapted, 1.0)[0]
        out[name] = {"tail_blocks": model.tail_blocks, "adapter_type": kind, "generated_values_per_adapter": generated,
                     "s_per_prompt": per_prompt, **{f"miou_{g}": mean(ious.get(g, {}).values()) for g in GROUPS}}
    return out


# --- output -------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    """results.md: one table per group (methods x mIoU / AP / AP50), the oracles, the targets."""
    q, c, m = results["quality"], results["config"], results["machine"]
    lines = [f"# Quality suite: {c['val_images']} images of {c['val_annotations']}", "",
             f"Hypernet {c['hypernet']} on {c['sam_checkpoint']}; {c['tasks']} tasks; "
             f"{c['points_per_side']}x{c['points_per_side']} instance grid; {m['name']}, torch {m['torch']}.", ""]
    for group, methods in q["groups"].items():
        if methods is None:
            lines += [f"**{group}**: absent (no such tasks in this dataset)", ""]
            continue
        refs = q["references"].get(group) or {}
        lines += [f"**{group}** ({next(v for v in methods.values() if v)['tasks']} tasks; references: "
                  + ", ".join(f"{k} {fmt(v)}" for k, v in refs.items()) + ")", ""]
        lines += table(["method", "task mIoU", "mask AP", "AP50"],
                       [[name, v["miou"], v["ap"], v["ap50"]] for name, v in methods.items() if v]) + [""]
    if q["oracles"]:
        lines += table(["oracle task", "static LoRA mIoU", "hypernet mIoU", "hypernet / oracle"],
                       [[o["task"], o["oracle_miou"], o["hypernet_miou"], o["ratio"]] for o in q["oracles"]]) + [""]
    lines += table(["target", "measured", "target", "met"],
                   [[k, v["value"], v["target"], v["met"]] for k, v in q["targets"].items()])
    oracle = q["targets"]["hypernet_vs_oracle"]
    if oracle["median"] is not None:
        lines += ["", f"hypernet / oracle: mean {fmt(oracle['value'])}, median {fmt(oracle['median'])}."]
    collapsed = oracle["collapsed_oracles"]
    if collapsed:
        lines += ["", f"{collapsed} oracle(s) collapsed to empty masks: their ratio is undefined and left out of the mean."]
    if "ablations" in q:
        a = q["ablations"]
        lines += ["", f"Ablations ({a['steps']} steps each):", ""]
        lines += table(["variant", "k", "adapter", "generated values", "s per prompt", *GROUPS],
                       [[k, v["tail_blocks"], v["adapter_type"], v["generated_values_per_adapter"], v["s_per_prompt"],
                         *(v[f"miou_{g}"] for g in GROUPS)] for k, v in a.items() if k != "steps"])
    return "\n".join(lines) + "\n"


def plot_methods(results: dict) -> bytes:
    """Mask AP and task mIoU per method on the seen group, as PNG bytes."""
    plt = pyplot()

    seen = results["quality"]["groups"].get("seen") or {}
    names = [n for n in METHODS if seen.get(n)]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [seen[n]["ap"] for n in names], 0.4, label="mask AP")
    ax.bar(x + 0.2, [seen[n]["miou"] or 0.0 for n in names], 0.4, label="task mIoU")
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set(ylim=(0, 1), title="seen prompts, same base and images")
    ax.legend()
    return figure_png(fig)


def write_results(results: dict, out: str, storage: StorageOptions | None = None) -> list[str]:
    """results.json, results.md and methods.png under `out`; returns the files."""
    return write_files({"results.json": json.dumps(results, indent=1).encode(), "results.md": markdown(results).encode(),
                        "methods.png": plot_methods(results)}, out, storage)
