"""The speed suite (`jobs/benchmark.py --suite speed`): the labelling and training hot paths,
measured side by side in one run, on the same model and the same images.

- floor: `TaskAwarePredictor` on decoded, resized arrays (no I/O), K prompts: what the labelling
  job cannot beat at the same threads;
- job: the labelling job end to end on a local Ray over every image (the same model, prompts and
  grid; the actor layout it chooses itself): wall seconds, time to the first committed shard,
  steady-state images/s (after the first commit) and `vs_floor` = job images/s ÷ floor images/s
  at the job's total torch threads (actors x threads, in one process);
- naive: the loop a first implementation writes — per image and prompt, encode the text, generate
  the adapter, run the whole encoder, decode — and `speedup` = naive ÷ floor seconds;
- prompts: K = 1, 2, 4, 8 on the floor path, seconds per image and the ratio to K = 1;
- reference: the family's own predictor (`Backbone.reference_predictor`: SAM's `SamPredictor`, SAM 2.1's
  `SAM2ImagePredictor`) on the same base (set_image, then one point, one mask) against talora's
  one-prompt semantic path (mode "semantic"), images/s ratio `vs_sam_predictor`: the GPU aim
  compares talora with SAM at the same precision;
- breakdown: seconds per image of each stage — decode/resize, trunk, tail, semantic decode,
  instance decode, filtering + NMS + upsampling + RLE, writing the rows (a Parquet part) — each
  timed on the same images from the stage before's saved outputs;
- train: one hypernet step from cached trunk features vs the same step encoding its images on the
  fly (fp32; on CUDA also fp16 and bf16 AMP, with peak memory), and a pretraining step on CPU presets;
- eval: COCOeval through pycocotools and faster-coco-eval on the same predictions, stats equal;
- memory: the benchmark process's peak RSS (and peak GPU memory on CUDA).

Models: the shipped demo models on the default variant; random weights of the real architecture otherwise
(official checkpoints cannot be fetched offline; speed does not depend on the values). Timing is
`torch.utils.benchmark.Timer.blocked_autorange` (warm-up, CUDA synchronised, median of timed
blocks). Numbers belong to the machine they were taken on: the results record it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import resource
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from talora.backbones.variants import DEFAULT_VARIANT, get_variant
from talora.batch.parts import PARQUET
from talora.batch.rows import SCHEMA, detection_rows
from talora.batch.shards import plan_shards
from talora.bench.report import machine, verdicts, write_files
from talora.bench.timing import median_seconds
from talora.batch.cluster import init_ray
from talora.config import ModelConfig, default_config
from talora.data.coco import CocoDataset
from talora.data.synthetic import write_demo_dataset
from talora.data.tasks import TaskSet, task_ground_truth
from talora.eval.evaluate import coco_stats
from talora.io.images import decode_image, figure_png, pyplot
from talora.io.storage import StorageOptions, read_bytes
from talora.label.job import LabelConfig, run_label_job
from talora.markdown import table
from talora.model.loading import build_task_aware_sam, load_backbone, load_model, model_spec
from talora.predict.predictor import PredictConfig, TaskAwarePredictor, encode_mask
from talora.train.batches import build_batch
from talora.train.config import TrainConfig, load_run_spec
from talora.train.optim import autocast, backward_and_step, grad_scaler
from talora.train.pretrain import ImageMemo, PretrainStep, build_pretrain_batch, label_vocab
from talora.train.step import TrainStep

# Prompts of the demo domain, the first K of which the floor labels (any text works: these have tasks).
PROMPTS = ("segment vehicles", "segment red objects", "segment all circles", "segment fruit", "segment blue objects",
           "segment cars", "segment green objects", "segment shapes")
PROMPT_COUNTS = (1, 2, 4, 8)


@dataclass(frozen=True)
class SpeedConfig:
    model: ModelConfig  # the variant, and the hypernet of the train step (random weights)
    device: str = "cpu"
    images: str | None = None  # an image prefix; None = demo images generated in a temporary folder
    num_images: int = 1000  # images listed (or generated); the model paths time the first `timed_images`
    timed_images: int = 16
    prompts: int = 2  # K of the floor and naive paths
    points_per_side: int = 16  # the instance grid, as the labelling job's --points-per-side
    batch_images: int = 8  # train step
    tasks_per_image: int = 2
    min_run_time: float = 2.0  # seconds of timed runs per path (at least one run)
    job: bool = True  # run the labelling job end to end (needs Ray)
    train_step: bool = True  # time the hypernet (and, on CPU presets, pretraining) train steps
    precision: str = "fp32"  # autocast of the model paths (PredictConfig.precision)
    storage: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self) -> None:
        if not 1 <= self.prompts <= len(PROMPTS):
            raise ValueError(f"--prompts must be in [1, {len(PROMPTS)}], got {self.prompts}")
        for name in ("num_images", "timed_images", "points_per_side", "batch_images", "tasks_per_image"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"--precision must be fp32, bf16 or fp16, got {self.precision!r}")


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

        floor = per_image(lambda i: predictor.predict_resized(*resized[i], prompts), len(resized), config)
        speed["floor"] = {"s_per_image": floor, "prompts": config.prompts, "images": len(resized)}
        naive = per_image(lambda i: naive_image(predictor, *resized[i], prompts), len(resized), config)
        speed["naive"] = {"s_per_image": naive, "speedup": naive / floor}
        speed["prompts"] = {}
        for k in PROMPT_COUNTS:
            seconds = per_image(lambda i: predictor.predict_resized(*resized[i], list(PROMPTS[:k])), len(resized), config)
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
            speed["train"]["pretrain_step_s"] = median_seconds(pretrain_step(dataset, sam_type, device),
                                                               config.min_run_time)[0]
        if config.job:
            speed["job"] = job_speed(config, tmp, prompts,
                                     lambda: per_image(lambda i: predictor.predict_resized(*resized[i], prompts),
                                                       len(resized), config))
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


def per_image(fn, count: int, config: SpeedConfig) -> float:
    """Seconds per image of `fn(i)` over images i = 0 .. count-1: the median of timed passes over all of
    them, so every path is measured on the same images (the instance pass's cost varies per image)."""
    return median_seconds(lambda: [fn(i) for i in range(count)], config.min_run_time)[0] / count


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
    return {"wall_s": wall, "first_commit_s": summary["first_commit_seconds"], "images_per_s": rate,
            "vs_floor": rate * floor_s if rate else None, "images": summary["images"], "errors": summary["errors"],
            "actors": layout["num_actors"], "threads": threads, "floor_s_per_image_at_job_threads": floor_s,
            "ray_start_s": ray_start, "actor_peak_rss_mb": summary["actor_peak_rss_mb"]}


def breakdown(predictor, dataset, images: list[np.ndarray], prompts: list[str], config: SpeedConfig) -> dict:
    """Seconds per image of each stage of `TaskAwarePredictor.predict_resized` (and around it)."""
    n = len(images)
    adapter = predictor.model.adapters(prompts)
    with torch.no_grad(), predictor.autocast():  # as predict_rows runs the tail and the semantic row
        resized = [predictor.resize(image) for image in images]
        sizes = [(tuple(r.shape[:2]), tuple(image.shape[:2])) for r, image in zip(resized, images)]
        trunks = [predictor.trunk(r) for r in resized]
        embeddings = [predictor.tail(t, adapter) for t in trunks]
        semantic = [predictor.semantic(e, adapter, *size) for e, size in zip(embeddings, sizes)]
        regions = [predictor.task_regions(presence, logits) for presence, logits in semantic]
        candidates = [predictor.instance_candidates(e, adapter, image_regions, size[1])
                      for e, image_regions, size in zip(embeddings, regions, sizes)]
        predictions = [predictor.predict_resized(r, size[1], prompts) for r, size in zip(resized, sizes)]
    encoded = [image_bytes(image) for image in images]

    def finish(i: int) -> None:
        presence = semantic[i][0]
        for p, region in enumerate(regions[i]):
            if region.any():
                encode_mask(region.cpu().numpy(), "semantic", float(presence[p]))
        predictor.keep_instances(candidates[i], *sizes[i], regions[i], presence.tolist())

    def write(i: int) -> None:
        h, w = sizes[i][1]
        PARQUET.encode(detection_rows(f"image-{i}", i, "s", w, h, predictions[i], None, "bench"), SCHEMA)

    stages = {
        "decode_resize": lambda i: predictor.resize(decode_image(encoded[i])),
        "trunk": lambda i: predictor.trunk(resized[i]),
        "tail": lambda i: predictor.tail(trunks[i], adapter),
        "semantic_decode": lambda i: predictor.semantic(embeddings[i], adapter, *sizes[i]),
        "instance_decode": lambda i: predictor.instance_candidates(embeddings[i], adapter, regions[i], sizes[i][1]),
        "filter_nms_rle": finish,
        "writing": write,
    }
    out = {}
    with torch.no_grad(), predictor.autocast():
        for name, fn in stages.items():
            out[f"{name}_s"] = per_image(fn, n, config)
    out["sum_s"] = sum(out.values())
    return out


def sam_reference(model, images: list[np.ndarray], resized, config: SpeedConfig) -> dict:
    """Seconds per image of the family's own predictor on the base (SamPredictor, SAM2ImagePredictor;
    LoRA inactive): set_image, then one point at the image centre, one mask; beside talora's
    one-prompt semantic path on the same images and precision. vs_sam_predictor > 1: talora labels
    more images per second."""
    semantic = TaskAwarePredictor(model, PredictConfig(mode="semantic", precision=config.precision))
    sam = model.backbone.reference_predictor()

    def sam_image(i: int) -> None:
        h, w = images[i].shape[:2]
        with torch.no_grad(), semantic.autocast():
            sam.set_image(images[i])
            sam.predict(point_coords=np.array([[w / 2, h / 2]]), point_labels=np.array([1]), multimask_output=False)

    sam_s = per_image(sam_image, len(images), config)
    talora_s = per_image(lambda i: semantic.predict_resized(*resized[i], [PROMPTS[0]]), len(images), config)
    return {"sam_predictor_s_per_image": sam_s, "talora_semantic_s_per_image": talora_s,
            "vs_sam_predictor": sam_s / talora_s}


def fast_reference(model, images: list[np.ndarray], config: SpeedConfig, reference: dict) -> dict:
    """Seconds per image of the family's fast predictor (`Backbone.fast_reference_predictor`: for SAM
    1, segment-anything-fast, which runs in bf16) with the same calls as `sam_reference`, beside
    talora's one-prompt semantic path at this run's precision; {"absent": why} where there is none."""
    if config.precision != "bf16":
        return {"absent": "the fast reference runs in bf16; see this suite's bf16 run"}
    fast, why_not = model.backbone.fast_reference_predictor()
    if fast is None:
        return {"absent": why_not}

    def fast_image(i: int) -> None:
        h, w = images[i].shape[:2]
        with torch.no_grad():
            fast.set_image(images[i])
            fast.predict(point_coords=np.array([[w / 2, h / 2]]), point_labels=np.array([1]), multimask_output=False)

    fast_s = per_image(fast_image, len(images), config)
    talora_s = reference["talora_semantic_s_per_image"]
    return {"fast_predictor_s_per_image": fast_s, "talora_semantic_s_per_image": talora_s,
            "vs_fast_predictor": fast_s / talora_s}


def image_bytes(image: np.ndarray) -> bytes:
    """An image as the JPEG bytes a bucket would hold (what the decode stage reads)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def naive_image(predictor, resized: np.ndarray, size: tuple[int, int], prompts: list[str]) -> None:
    """Per prompt: text encoder, hypernet, the whole encoder and the decoder, nothing shared or cached."""
    for prompt in prompts:
        predictor.model.forget_adapters()
        predictor.predict_resized(resized, size, [prompt])


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


def train_speed(config: SpeedConfig, device: torch.device) -> dict:
    """Steps/s of one hypernet step from cached trunk features vs encoding its images on the fly."""
    with tempfile.TemporaryDirectory(prefix="talora-bench-train-") as tmp:  # annotated images for the batch
        dataset = CocoDataset.load(write_demo_dataset(tmp, num_train=config.batch_images, num_val=1, seed=21)["train"])
        pixels = {i: dataset.load_image(i) for i in dataset.image_ids}
    torch.manual_seed(0)
    model = build_task_aware_sam(config.model).to(device)
    records = [dataset.images[i] for i in dataset.image_ids[: config.batch_images]]
    preprocessed = [model.preprocess(pixels[r.id]) for r in records]
    inputs = torch.stack([x for x, _ in preprocessed]).to(device)
    sizes = [size for _, size in preprocessed]
    with torch.no_grad():
        trunk = model.embed_trunk(inputs)
    tasks = [t for t in TaskSet.from_dataset(dataset) if not t.heldout]
    batch = build_batch(records, trunk, sizes, dataset, tasks, {t.id: t.train_prompts for t in tasks},
                        np.random.default_rng(0), model.backbone, config.tasks_per_image, 1).to(device)
    step = TrainStep(model, model.hypernet)
    text = torch.randn(len(batch.prompts), config.model.hypernet.text_dim, device=device)
    out: dict = {}
    for amp_dtype in (None, "float16", "bfloat16") if device.type == "cuda" else (None,):
        name = amp_dtype or "fp32"
        train = TrainConfig(train_annotations="x", amp=amp_dtype is not None, amp_dtype=amp_dtype or "float16")
        optimiser = torch.optim.AdamW(step.parameters(), lr=1e-4)
        scaler = grad_scaler(train, device)

        def cached(train=train, optimiser=optimiser, scaler=scaler) -> None:
            with autocast(train, device):
                loss = step(batch, text, train)["loss"]
            backward_and_step(loss, scaler, optimiser, step.parameters(), 1.0)

        def on_the_fly() -> None:
            with torch.no_grad():
                batch.trunk = model.embed_trunk(inputs)  # what a step without the cache computes first
            cached()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            seconds = median_seconds(cached, config.min_run_time)[0]
        except FloatingPointError as e:  # fp16 on random weights can overflow (a real base need not): record it
            out[f"step_{name}_overflowed"] = str(e)
            continue
        out[f"step_{name}_s"] = seconds
        if device.type == "cuda":  # the frozen SAM, the trainable modules, optimiser state, one step's activations
            out[f"step_{name}_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if amp_dtype is None:
            out["cached_steps_per_s"] = 1.0 / seconds
            out["on_the_fly_steps_per_s"] = 1.0 / median_seconds(on_the_fly, config.min_run_time)[0]
            out["cache_speedup"] = out["cached_steps_per_s"] / out["on_the_fly_steps_per_s"]
    return out


def pretrain_step(dataset, sam_type: str, device: torch.device):
    """One step of the whole SAM: 8 images x 4 prompts (configs/demo_pretrain.yaml's batch)."""
    backbone = load_backbone(sam_type)
    vocab = label_vocab(dataset)
    memo = ImageMemo(backbone, dataset, vocab, None)
    batch = build_pretrain_batch([memo(i) for i in dataset.image_ids[:8]], np.random.default_rng(0), 4, 0.5,
                                 backbone.image_size).to(device)
    backbone.model.requires_grad_(True)
    step = PretrainStep(backbone, 1, vocab).to(device)
    config = TrainConfig(train_annotations="x", mode="pretrain", aux_weight=10.0)
    optimiser = torch.optim.AdamW(step.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    return lambda: backward_and_step(step(batch, config)["loss"], scaler, optimiser, step.parameters(), 1.0)


def speed_config(sam_type: str, device: str, preset: str | None = None, **kwargs) -> SpeedConfig:
    """The model and train batch of a training preset (`preset`: YAML text) or the variant's defaults;
    a preset for another variant is refused before any work. `kwargs`: SpeedConfig fields (None = default)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if not preset:
        return SpeedConfig(default_config(sam_type), device, **kwargs)
    spec = load_run_spec(preset)
    if spec.model.sam.sam_type != sam_type:
        raise ValueError(f"the preset is for {spec.model.sam.sam_type}; pass --sam-type {spec.model.sam.sam_type}")
    model = dataclasses.replace(spec.model, sam=dataclasses.replace(spec.model.sam, checkpoint=None))
    return SpeedConfig(model, device, **{"batch_images": spec.train.batch_images,
                                         "tasks_per_image": spec.train.tasks_per_image, **kwargs})


def describe(config: SpeedConfig) -> dict:
    return {"sam_type": config.model.sam.sam_type, "images": config.images or "demo (generated)",
            "num_images": config.num_images, "timed_images": config.timed_images, "prompts": config.prompts,
            "points_per_side": config.points_per_side, "precision": config.precision,
            "batch_images": config.batch_images, "tasks_per_image": config.tasks_per_image,
            "min_run_time": config.min_run_time, "job": config.job, "train_step": config.train_step}


def markdown(results: dict) -> str:
    """results.md: every number with its key, and the machine."""
    rows = []

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            rows.append([prefix, f"{value:.4g}" if isinstance(value, float) else value])

    walk("speed", results["speed"])
    m, c = results["machine"], results["config"]
    head = [f"# Speed suite: {c['sam_type']} on {m['name']} ({m['device']}, {m['torch_threads']} threads, "
            f"torch {m['torch']}, Ray {m['ray']})", "",
            f"{c['prompts']} prompts, {c['points_per_side']}x{c['points_per_side']} instance grid, "
            f"{c['timed_images']} timed images of {c['images']}; medians of "
            f"`torch.utils.benchmark` blocks.", ""]
    return "\n".join(head + table(["key", "value"], rows)) + "\n"


def plot_prompts(results: dict) -> bytes:
    """Seconds per image against the number of prompts (floor path), as PNG bytes."""
    plt = pyplot()

    ks = sorted(results["speed"]["prompts"], key=int)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot([int(k) for k in ks], [results["speed"]["prompts"][k]["s_per_image"] * 1e3 for k in ks], marker="o")
    ax.set(xlabel="prompts per image", ylabel="ms per image", title=f"floor, {results['config']['sam_type']}",
           xticks=[int(k) for k in ks])
    return figure_png(fig)


def write_results(results: dict, out: str, storage: StorageOptions | None = None) -> list[str]:
    """results.json, results.md and prompts.png under `out`; returns the files."""
    return write_files({"results.json": json.dumps(results, indent=1).encode(), "results.md": markdown(results).encode(),
                        "prompts.png": plot_prompts(results)}, out, storage)
