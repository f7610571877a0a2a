"""The speed suite run: the floor, the job, the naive loop, K prompts, the references, the stage
breakdown, training steps, evaluation backends and memory, side by side on one model and one image set."""

from __future__ import annotations

import resource
import tempfile

import torch

from talora.backbones.variants import DEFAULT_VARIANT, get_variant
from talora.batch.shards import plan_shards
from talora.core.precision import cpu_has_native
from talora.bench.report import machine, verdicts
from talora.bench.speed.config import PROMPT_COUNTS, PROMPTS, SpeedConfig, describe
from talora.bench.speed.job import job_speed
from talora.bench.speed.references import fast_reference, naive_image, sam_reference
from talora.bench.speed.stages import breakdown, eval_backends
from talora.bench.speed.training import pretrain_step, train_speed
from talora.bench.timing import median_seconds, per_image
from talora.data.coco import CocoDataset
from talora.data.synthetic import write_demo_dataset
from talora.io.images import decode_image
from talora.io.storage import read_bytes
from talora.model.loading import load_model, model_spec
from talora.predict.predictor import PredictConfig, TaskAwarePredictor


def run_speed(config: SpeedConfig, model=None) -> dict:
    """Every speed measurement; returns {"machine", "config", "speed"} (results.json). `model`: the
    TaskAwareSam to time (default: built for the variant), so runs at several precisions share one."""
    device = torch.device(config.device)
    sam_type = config.model.sam.sam_type
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    speed: dict = {}
    with tempfile.TemporaryDirectory(prefix="talora-bench-") as tmp:
        dataset, images = bench_images(config, tmp)  # a bad prefix fails here, before any model is built
        if model is None:
            model = load_model(model_spec(sam_type, untrained=sam_type != DEFAULT_VARIANT))
        model = model.to(device)
        predictor = TaskAwarePredictor(model, PredictConfig(points_per_side=config.points_per_side,
                                                            precision=config.precision))
        resized = [(predictor.resize(image), image.shape[:2]) for image in images]
        prompts = list(PROMPTS[: config.prompts])

        floor = per_image(lambda i: predictor.predict_resized(*resized[i], prompts), len(resized), config.min_run_time)
        speed["floor"] = {"s_per_image": floor, "prompts": config.prompts, "images": len(resized)}
        naive = per_image(lambda i: naive_image(predictor, *resized[i], prompts), len(resized), config.min_run_time)
        speed["naive"] = {"s_per_image": naive, "speedup": naive / floor}
        speed["prompts"] = {}
        for k in PROMPT_COUNTS:
            seconds = per_image(lambda i: predictor.predict_resized(*resized[i], list(PROMPTS[:k])), len(resized), config.min_run_time)
            speed["prompts"][str(k)] = {"s_per_image": seconds}
        for k, entry in speed["prompts"].items():
            entry["vs_one"] = entry["s_per_image"] / speed["prompts"]["1"]["s_per_image"]
        speed["reference"] = sam_reference(model, images, resized, config)
        speed["reference_fast"] = fast_reference(model, images, config, speed["reference"])
        speed["breakdown"] = breakdown(predictor, dataset, images, prompts, config)
        speed["eval"] = eval_backends(predictor, dataset, images, prompts, config) if dataset else {
            "absent": "--images has no annotations to score against"}
        speed["train"] = train_speed(config, device) if config.train_step else {"absent": "train_step off"}
        if config.train_step and get_variant(sam_type).cpu_preset and dataset is not None:
            train = speed["train"]  # the demo pretraining config's precision (bf16) beside float32
            for name, amp in (("fp32", None), ("bf16", "bfloat16")):
                train[f"pretrain_step_{name}_s"] = median_seconds(pretrain_step(dataset, sam_type, device, amp),
                                                                  config.min_run_time)[0]
            train["pretrain_steps_per_s"] = 1.0 / train["pretrain_step_fp32_s"]
            train["cpu_native_bf16"] = cpu_has_native(torch.bfloat16)
        if config.job:
            speed["job"] = job_speed(config, tmp, prompts,
                                     lambda: per_image(lambda i: predictor.predict_resized(*resized[i], prompts),
                                                       len(resized), config.min_run_time))
    speed["memory"] = {"process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if config.job:
        speed["memory"]["actor_peak_rss_mb"] = speed["job"].pop("actor_peak_rss_mb")
    if device.type == "cuda":
        speed["memory"]["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    speed["targets"] = targets(speed)
    return {"machine": machine(device), "config": describe(config), "speed": speed}


def targets(speed: dict) -> dict:
    """The suite's targets (not assertions): each measured value, its target and whether it is met."""
    train, job, evaluation = speed["train"], speed.get("job") or {}, speed["eval"]
    measured = {
        "job_vs_floor": (job.get("vs_floor"), 0.85),
        "cache_vs_on_the_fly": (train["cached_steps_per_s"] / train["on_the_fly_steps_per_s"]
                                if "cached_steps_per_s" in train else None, 5.0),
        # autocast never slows a step down: on a CPU without bf16 instructions it runs float32
        "pretrain_bf16_speed_vs_fp32": (train["pretrain_step_fp32_s"] / train["pretrain_step_bf16_s"]
                                        if "pretrain_step_bf16_s" in train else None, 0.9),
        "hypernet_bf16_speed_vs_fp32": (train["step_fp32_s"] / train["step_bfloat16_s"]
                                        if "step_bfloat16_s" in train else None, 0.9),
        "eval_vs_pycocotools": (evaluation["pycocotools_s"] / evaluation["faster_coco_eval_s"]
                                if evaluation.get("faster_coco_eval_s") else None, 3.0),
    }
    return verdicts(measured)


def bench_images(config: SpeedConfig, tmp: str):
    """(the COCO dataset of the images, or None; the first `timed_images` decoded images)."""
    if config.images is None:  # in shard folders, as a bucket is laid out
        written = write_demo_dataset(tmp, num_train=0, num_val=config.num_images, seed=21,
                                     shard_size=max(1, min(100, config.num_images // 4)))
        dataset = CocoDataset.load(written["val"])
        ids = dataset.image_ids[: config.timed_images]
        dataset.images = {i: dataset.images[i] for i in ids}
        return dataset, [dataset.load_image(i) for i in ids]
    uris = [u for p in plan_shards(config.images, options=config.storage, max_images=config.timed_images)
            for u in p.uris]
    if not uris:
        raise ValueError(f"no images under {config.images}")
    return None, [decode_image(read_bytes(u, config.storage)) for u in uris]
