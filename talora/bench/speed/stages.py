"""Seconds per image of each stage of the labelling path, each timed from the stage before's saved
outputs, and COCOeval through both evaluation backends."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from talora.batch.parts import PARQUET
from talora.batch.rows import SCHEMA, detection_rows
from talora.bench.speed.config import SpeedConfig
from talora.bench.timing import median_seconds, per_image
from talora.data.tasks import TaskSet, task_ground_truth
from talora.eval.evaluate import coco_stats
from talora.io.images import decode_image
from talora.predict.predictor import encode_mask


def breakdown(predictor, dataset, images: list[np.ndarray], prompts: list[str], config: SpeedConfig) -> dict:
    """Seconds per image of each stage of `TaskAwarePredictor.predict_resized` (and around it)."""
    n = len(images)
    adapter = predictor.model.adapters(prompts)
    with torch.no_grad(), predictor.autocast():  # as predict_rows runs the tail and what follows it
        resized = [predictor.resize(image) for image in images]
        sizes = [(tuple(r.shape[:2]), tuple(image.shape[:2])) for r, image in zip(resized, images)]
        trunks = [predictor.trunk(r) for r in resized]
        embeddings = [predictor.tail(t, adapter) for t in trunks]
        predictions = [predictor.predict_resized(r, size[1], prompts) for r, size in zip(resized, sizes)]
        heads = (detector_stages if predictor.backbone.detector else decoder_stages)(
            predictor, adapter, prompts, embeddings, sizes)
    encoded = [image_bytes(image) for image in images]

    def write(i: int) -> None:
        h, w = sizes[i][1]
        PARQUET.encode(detection_rows(f"image-{i}", i, "s", w, h, predictions[i], None, "bench"), SCHEMA)

    stages = {
        "decode_resize": lambda i: predictor.resize(decode_image(encoded[i])),
        "trunk": lambda i: predictor.trunk(resized[i]),
        "tail": lambda i: predictor.tail(trunks[i], adapter),
        **heads,
        "writing": write,
    }
    out = {}
    with torch.no_grad(), predictor.autocast():
        for name, fn in stages.items():
            out[f"{name}_s"] = per_image(fn, n, config.min_run_time)
    out["sum_s"] = sum(out.values())
    return out


def decoder_stages(predictor, adapter, prompts: list[str], embeddings, sizes) -> dict:
    """A decoder family's stages after the tail: the semantic row, the instance grid in its
    regions, then filters, NMS and RLE; each runs on the stage before's saved outputs."""
    semantic = [predictor.semantic(e, adapter, *size) for e, size in zip(embeddings, sizes)]
    regions = [predictor.task_regions(presence, logits) for presence, logits in semantic]
    candidates = [predictor.instance_candidates(e, adapter, image_regions, size[1])
                  for e, image_regions, size in zip(embeddings, regions, sizes)]

    def finish(i: int) -> None:
        presence = semantic[i][0]
        for p, region in enumerate(regions[i]):
            if region.any():
                encode_mask(region.cpu().numpy(), "semantic", float(presence[p]))
        predictor.keep_instances(candidates[i], *sizes[i], regions[i], presence.tolist())

    return {
        "semantic_decode": lambda i: predictor.semantic(embeddings[i], adapter, *sizes[i]),
        "instance_decode": lambda i: predictor.instance_candidates(embeddings[i], adapter, regions[i], sizes[i][1]),
        "filter_nms_rle": finish,
    }


def detector_stages(predictor, adapter, prompts: list[str], embeddings, sizes) -> dict:
    """A detector family's (SAM 3) stages after the tail: the detector on the text prompts (fusion
    encoder, DETR decoder, mask head), then the score filter, NMS and RLE."""
    model = predictor.model
    found = [model.detect(e, adapter, prompts) for e in embeddings]
    return {
        "detect": lambda i: model.detect(embeddings[i], adapter, prompts),
        "filter_nms_rle": lambda i: predictor.keep_detections(found[i], len(prompts), *sizes[i]),
    }


def image_bytes(image: np.ndarray) -> bytes:
    """An image as the JPEG bytes a bucket would hold (what the decode stage reads)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def eval_backends(predictor, dataset, images: list[np.ndarray], prompts: list[str], config: SpeedConfig) -> dict:
    """COCOeval seconds through each backend on the floor's own predictions, and whether the stats agree."""
    tasks = TaskSet.from_dataset(dataset)
    mapped = {p: tasks.for_prompt(p) for p in prompts if tasks.for_prompt(p) is not None}
    if not mapped:
        return {"absent": "no prompt maps to a task of these images"}
    gt = task_ground_truth(dataset, TaskSet(list({t.id: t for t in mapped.values()}.values())))
    category = {c["name"]: c["id"] for c in gt["categories"]}
    results = []
    for image_id, image in zip(dataset.image_ids, images):
        for prompt, detections in predictor.predict(image, list(mapped)).items():
            results += [{"image_id": image_id, "category_id": category[mapped[prompt].id], "score": d.score,
                         "segmentation": d.rle} for d in detections if d.kind == "instance"]
    try:
        stats = {b: coco_stats(gt, results, None, b) for b in ("pycocotools", "faster-coco-eval")}
    except ValueError as e:  # faster-coco-eval is a dev dependency
        return {"absent": str(e)}
    out = {f"{b.replace('-', '_')}_s": median_seconds(lambda b=b: coco_stats(gt, results, None, b),
                                                      config.min_run_time)[0] for b in stats}
    out["equal"] = all(abs(stats["pycocotools"][k] - stats["faster-coco-eval"][k]) < 1e-6 for k in stats["pycocotools"])
    out["results"] = len(results)
    return out
