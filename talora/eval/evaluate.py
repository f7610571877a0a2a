"""Scoring a labelling run against COCO ground truth: COCOeval (segm) per task, task mIoU per group.

Prompts map to tasks by exact paraphrase (`TaskSet.for_prompt`), an explicit `task_map`, or the
rows' `task` column; unmapped prompts are reported, not guessed. Predictions join ground truth by
file name. Only manifest-listed parts are read, each validated against the row schema.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from talora.batch.rows import coco_results, read_run, read_summary
from talora.data.coco import CocoDataset
from talora.data.tasks import TaskSet, semantic_mask, task_ground_truth
from talora.eval.metrics import GROUPS, REFERENCES, TaskIoU, mean, reference_scores
from talora.io.images import pyplot
from talora.io.storage import StorageOptions, join, write_bytes
from talora.markdown import fmt, table as md_table

STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")


@dataclass
class EvalConfig:
    predictions: str  # OUT/<run_key> of a labelling run
    annotations: str
    output: str
    image_root: str | None = None
    task_map: dict[str, str] = field(default_factory=dict)  # prompt -> task id
    backend: str = "pycocotools"  # or faster-coco-eval
    storage: StorageOptions = field(default_factory=StorageOptions)


def parse_task_map(entries: list[str]) -> dict[str, str]:
    """``PROMPT=TASK`` strings (``--task-map``) -> {prompt: task id}; the prompt may hold "=" itself."""
    task_map = {}
    for entry in entries:
        prompt, sep, task = entry.rpartition("=")
        if not sep or not prompt:
            raise ValueError(f"--task-map {entry!r}: expected PROMPT=TASK")
        task_map[prompt] = task
    return task_map


def _cocoeval_class(backend: str):
    if backend == "pycocotools":
        return COCO, COCOeval
    if backend == "faster-coco-eval":
        try:
            import faster_coco_eval  # optional: a dev extra, asked for by name
        except ImportError as e:
            raise ValueError("--backend faster-coco-eval needs `pip install faster-coco-eval`") from e
        return faster_coco_eval.COCO, faster_coco_eval.COCOeval_faster
    raise ValueError(f"--backend must be pycocotools or faster-coco-eval, got {backend!r}")


def coco_stats(gt: dict, results: list[dict], category_ids: list[int] | None, backend: str) -> dict[str, float]:
    """COCOeval segm stats for `category_ids` (None = all); no result is a zero score, not a crash."""
    if not results:
        return {name: 0.0 for name in STAT_NAMES}
    COCO, COCOeval = _cocoeval_class(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes writes into the dicts it gets
        evaluator = COCOeval(coco_gt, coco_dt, "segm")
        if category_ids is not None:
            evaluator.params.catIds = category_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: max(0.0, float(v)) for name, v in zip(STAT_NAMES, evaluator.stats[:6])}


def evaluate(config: EvalConfig) -> dict:
    dataset = CocoDataset.load(config.annotations, config.image_root, config.storage)
    tasks = TaskSet.from_dataset(dataset)
    run = read_run(config.predictions, config.storage)
    processed, rows = run.processed, run.table.to_pylist()

    # Prompts -> tasks: the run's prompts (from its summary: a prompt with no row still counts) and the rows'.
    prompt_task: dict[str, str] = {}
    unmapped: set[str] = set()
    row_task = {r["prompt"]: r["task"] for r in rows if r["prompt"] is not None}
    for p in list(read_summary(config.predictions, config.storage).get("prompts", [])) + sorted(row_task):
        if p in prompt_task or p in unmapped:
            continue
        task_id = config.task_map.get(p) or (tasks.for_prompt(p).id if tasks.for_prompt(p) else None) or row_task.get(p)
        if task_id is None or task_id not in tasks.by_id:
            unmapped.add(p)
        else:
            prompt_task[p] = task_id

    # Images: by file name (the part of the URI after the image root, or its base name).
    by_name = {}
    for record in dataset.images.values():
        by_name[record.file_name] = record
        by_name.setdefault(record.file_name.rsplit("/", 1)[-1], record)

    @functools.lru_cache(maxsize=None)  # every row asks, twice (rows and COCO results)
    def record_of(uri: str):
        parts = uri.split("/")
        for n in range(len(parts), 0, -1):  # the longest matching suffix: "shard-00000/000003.jpg", then "000003.jpg"
            record = by_name.get("/".join(parts[-n:]))
            if record is not None:
                return record
        return None

    task_ids = sorted(set(prompt_task.values()), key=lambda t: [x.id for x in tasks].index(t))
    eval_tasks = TaskSet([tasks.by_id[t] for t in task_ids])
    gt = task_ground_truth(dataset, eval_tasks)
    category_of = {c["name"]: c["id"] for c in gt["categories"]}

    evaluated_images, unmatched, errors = set(), set(), 0
    for uri in processed:  # every image the run processed counts, with or without rows
        record = record_of(uri)
        if record is None:
            unmatched.add(uri)
        else:
            evaluated_images.add(record.id)
    semantic, semantic_scores = {}, {}
    for r in rows:
        if r["kind"] == "error":
            errors += 1
            continue
        record = record_of(r["image_uri"])
        if record is None:
            unmatched.add(r["image_uri"])
            continue
        evaluated_images.add(record.id)
        if r["kind"] == "semantic" and r["prompt"] in prompt_task:
            rle = {"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()}
            key = (record.id, r["prompt"])
            semantic_scores[key] = max(semantic_scores.get(key, 0.0), float(r["score"]))  # presence probability
            semantic[key] = semantic.get(key, False) | mask_utils.decode(rle).astype(bool)
    evaluated = sorted(evaluated_images)
    results = coco_results(rows, lambda r: getattr(record_of(r["image_uri"]), "id", None),
                           lambda r: category_of[prompt_task[r["prompt"]]] if r["prompt"] in prompt_task else None)

    # COCOeval per task and overall, on the evaluated images only.
    gt_eval = {**gt, "images": [im for im in gt["images"] if im["id"] in evaluated_images],
               "annotations": [a for a in gt["annotations"] if a["image_id"] in evaluated_images]}
    per_task = {t: coco_stats(gt_eval, [x for x in results if x["category_id"] == category_of[t]], [category_of[t]],
                              config.backend) for t in task_ids}
    overall = coco_stats(gt_eval, results, None, config.backend) if task_ids else {n: 0.0 for n in STAT_NAMES}

    # Task mIoU per group: every evaluated image counts for every mapped prompt.
    ious = TaskIoU()
    for prompt, task_id in prompt_task.items():
        task = tasks.by_id[task_id]
        group = task.group_of(prompt)
        for image_id in evaluated:
            record = dataset.images[image_id]
            truth = semantic_mask([i for i in dataset.instances[image_id] if task.matches(i)], record.height, record.width)
            pred = semantic.get((image_id, prompt), np.zeros_like(truth))
            ious.add((task_id, group), pred, truth)
    presence_f1 = {}
    predict = read_summary(config.predictions, config.storage).get("config", {}).get("predict", {})
    for prompt, task_id in prompt_task.items():  # the presence threshold that maximises F1, per prompt
        task = tasks.by_id[task_id]
        truth = {i: any(task.matches(x) for x in dataset.instances[i]) for i in evaluated}
        scores = {i: semantic_scores[(i, prompt)] for i in evaluated if (i, prompt) in semantic_scores}
        run_thresh = dict(map(tuple, predict.get("prompt_thresholds", []))).get(prompt, predict.get("presence_thresh"))
        presence_f1[prompt] = {"task": task_id, "run_threshold": run_thresh, **best_f1(scores, truth)}
    per_key = ious.per_key()
    miou = {g: mean(v for (t, gg), v in per_key.items() if gg == g) for g in GROUPS}
    references = reference_scores(dataset, eval_tasks, evaluated) if evaluated and task_ids else {}

    report = {
        "predictions": config.predictions,
        "annotations": config.annotations,
        "backend": config.backend,
        "images_evaluated": len(evaluated),
        "error_rows": errors,
        "unmatched_images": sorted(unmatched)[:20],
        "unmapped_prompts": sorted(unmapped),
        "prompts": prompt_task,
        "overall": overall,
        "per_task": per_task,
        "task_miou": miou,
        "task_miou_per_task": {f"{t}|{g}": v for (t, g), v in sorted(per_key.items())},
        "references": references,
        "presence_f1": presence_f1,
    }
    write_report(report, config.output, config.storage)
    return report


def best_f1(scores: dict[int, float], truth: dict[int, bool]) -> dict:
    """Image-level presence: an image is predicted positive at threshold t when its semantic score
    is >= t (no semantic row: negative). -> {images, positives, f1_at_run (every row positive: the
    run's own threshold), best_threshold, best_f1}; thresholds below the run's cannot be scanned
    (their rows were never written)."""

    def f1(t: float) -> float:
        tp = sum(truth[i] for i, s in scores.items() if s >= t)
        fp = sum(not truth[i] for i, s in scores.items() if s >= t)
        fn = sum(truth.values()) - tp
        return 2 * tp / (2 * tp + fp + fn) if tp else 0.0

    candidates = sorted(set(scores.values()))
    best = max(candidates, key=lambda t: (f1(t), -t), default=None)  # the lowest threshold of the best F1
    return {"images": len(truth), "positives": sum(truth.values()),
            "f1_at_run": round(f1(0.0), 4) if scores else 0.0,
            "best_threshold": round(best, 4) if best is not None else None,
            "best_f1": round(f1(best), 4) if best is not None else 0.0}


def write_report(report: dict, output: str, storage: StorageOptions | None) -> None:
    """report.json, report.md and per_task_ap.png under `output`."""
    write_bytes(join(output, "report.json"), json.dumps(report, indent=1, default=str).encode(), storage)
    lines = [f"# Evaluation of {report['predictions']}", "",
             f"{report['images_evaluated']} images, {report['error_rows']} error rows, backend {report['backend']}.", ""]
    if report["unmapped_prompts"]:
        lines += [f"Unmapped prompts (not scored): {', '.join(report['unmapped_prompts'])}", ""]
    o = report["overall"]
    lines += md_table(["task", "AP", "AP50", "AP75"],
                      [[task, fmt(v["AP"]), fmt(v["AP50"]), fmt(v["AP75"])] for task, v in report["per_task"].items()]
                      + [["**all**", fmt(o["AP"]), fmt(o["AP50"]), fmt(o["AP75"])]])
    rows = []
    for group in GROUPS:
        refs = report["references"].get(group, {}) if report["task_miou"][group] is not None else {}
        rows.append([group, fmt(report["task_miou"][group]), *(fmt(refs.get(r)) for r in REFERENCES)])
    lines += [""] + md_table(["group", "task mIoU", *REFERENCES], rows)
    if report["presence_f1"]:
        lines += ["", "Presence per prompt (image level: is the task in the image?): F1 at the run's threshold, "
                  "and the threshold (>= the run's) that maximises F1 on these images: `--prompt-thresh "
                  "\"PROMPT=T\"`. Label with `--presence-thresh 0` to scan lower thresholds.", ""]
        lines += md_table(["prompt", "task", "run threshold", "F1", "best threshold", "best F1"],
                          [[p, v["task"], fmt(v["run_threshold"]), fmt(v["f1_at_run"]), fmt(v["best_threshold"]),
                            fmt(v["best_f1"])] for p, v in report["presence_f1"].items()])
    write_bytes(join(output, "report.md"), ("\n".join(lines) + "\n").encode(), storage)

    plt = pyplot()

    names = list(report["per_task"]) or ["(no task)"]
    values = [report["per_task"][n]["AP"] for n in report["per_task"]] or [0.0]
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(names) + 2), 4))
    ax.bar(range(len(names)), values)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set(ylabel="mask AP", ylim=(0, 1), title="mask AP per task")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_bytes(join(output, "per_task_ap.png"), buffer.getvalue(), storage)
