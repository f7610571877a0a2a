"""The labelling job end to end on a local Ray, against the floor at the same threads."""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from talora.backbones.variants import DEFAULT_VARIANT
from talora.batch.cluster import init_ray
from talora.batch.commit import read_status
from talora.batch.pipeline import ActorLayout
from talora.bench.speed.config import SpeedConfig
from talora.label.job import LabelConfig, run_label_job
from talora.model.loading import model_spec
from talora.predict.predictor import PredictConfig


def job_speed(config: SpeedConfig, tmp: str, prompts: list[str], floor) -> dict:
    """The labelling job in this process's Ray over the suite's images; `floor()` re-measures the floor
    at the job's total torch threads (its actors x their threads)."""
    sam_type = config.model.sam.sam_type
    generated = config.images is None
    started = time.perf_counter()
    init_ray()
    ray_start = time.perf_counter() - started
    label = LabelConfig(prompts=tuple(prompts), images=os.path.join(tmp, "val", "images") if generated else config.images,
                        output=os.path.join(tmp, "labels"), model=model_spec(sam_type, untrained=sam_type != DEFAULT_VARIANT),
                        predict=PredictConfig(points_per_side=config.points_per_side, precision=config.precision),
                        annotations=os.path.join(tmp, "val", "instances.json") if generated else None,
                        max_images=None if generated else config.num_images, storage=config.storage)
    started = time.perf_counter()
    summary = run_label_job(label)
    wall = time.perf_counter() - started
    layout = summary["config"]["layout"]
    threads = layout["num_actors"] * layout["threads_per_actor"]  # the job's torch threads in all
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        floor_s = floor()
    finally:
        torch.set_num_threads(before)
    rate = summary["steady_images_per_second"]
    shared = shared_gpus(label, tmp, rate) if torch.cuda.is_available() else {"absent": "no CUDA device"}
    return {"shared_gpu": shared, "wall_s": wall, "first_commit_s": summary["first_commit_seconds"], "images_per_s": rate,
            "vs_floor": rate * floor_s if rate else None, "images": summary["images"], "errors": summary["errors"],
            "actors": layout["num_actors"], "threads": threads, "floor_s_per_image_at_job_threads": floor_s,
            "ray_start_s": ray_start, "actor_peak_rss_mb": summary["actor_peak_rss_mb"]}


def shared_gpus(label: LabelConfig, tmp: str, one_per_gpu: float | None) -> dict:
    """The same job again with two actors on each GPU (`--gpus-per-actor 0.5`, the recipe for a
    small model): its layout, steady rate beside one actor per GPU, and the status file it left."""
    shared = dataclasses.replace(label, output=os.path.join(tmp, "labels-shared"), layout=ActorLayout(gpus_per_actor=0.5))
    summary = run_label_job(shared)
    _, status = read_status(summary["output"], label.storage)
    rate = summary["steady_images_per_second"]
    return {"actors": summary["config"]["layout"]["num_actors"], "images_per_s": rate,
            "vs_one_per_gpu": rate / one_per_gpu if rate and one_per_gpu else None,
            "status": {"state": status["state"], "shards": status["shards"], "images": status["images"]["returned"]}}
