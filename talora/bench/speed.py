"""Speed of the hot paths, measured side by side in one run (`jobs/benchmark.py`).

- label: per-image latency of TaskAwarePredictor (2 prompts, semantic + instance masks) on
  demo-domain images: the shipped demo models on vit_tiny; random weights of the real
  architecture otherwise (official checkpoints cannot be fetched offline; speed does not depend on
  the values);
- train: one hypernet training step (adapters -> encoder tail -> decoder -> losses -> AdamW) on
  cached trunk features, batch_images x tasks_per_image rows, fp32 and, on CUDA, fp16 and bf16 AMP;
- pretrain (CPU presets only): one step of the whole SAM (configs/demo_pretrain.yaml's batch).

Timing is `torch.utils.benchmark.Timer.blocked_autorange` (warm-up, CUDA synchronised, median of
the timed blocks). Numbers belong to the machine they were taken on: the report records it.
"""

from __future__ import annotations

import platform
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.benchmark import Timer

from talora.config import ModelConfig


@dataclass(frozen=True)
class SpeedConfig:
    model: ModelConfig  # the variant and the hypernet size of the train step (random weights)
    device: str = "cpu"
    batch_images: int = 8
    tasks_per_image: int = 2
    min_run_time: float = 2.0  # seconds of timed runs per path (at least one run)
    label: bool = True


def median_seconds(fn, min_run_time: float) -> tuple[float, int]:
    """(median seconds of `fn()`, timed runs) after a warm-up."""
    measurement = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return measurement.median, len(measurement.times)


def run_speed(config: SpeedConfig) -> dict:
    """Times every hot path; returns the report (printed and saved by the job)."""
    from talora.variants import get_variant
    from talora.data.coco import CocoDataset
    from talora.data.synthetic import write_demo_dataset

    device = torch.device(config.device)
    sam_type = config.model.sam.sam_type
    with tempfile.TemporaryDirectory(prefix="talora-bench-") as tmp:
        dataset = CocoDataset.load(write_demo_dataset(tmp, num_train=8, num_val=1, seed=21)["train"])
        images = {i: dataset.load_image(i) for i in dataset.image_ids}
        memo = pretrain_memo(dataset, sam_type) if get_variant(sam_type).cpu_preset else None  # reads the images too
    results: dict[str, float] = {}
    runs: dict[str, int] = {}
    peaks: dict[str, float] = {}
    overflowed: list[str] = []

    def bench(name: str, fn) -> None:
        results[name], runs[name] = median_seconds(fn, config.min_run_time)

    if config.label:
        bench("label_image_s", label_step(sam_type, images, device))
    for amp_dtype in (None, "float16", "bfloat16") if device.type == "cuda" else (None,):
        name = f"train_step_{amp_dtype or 'fp32'}"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            bench(f"{name}_s", train_step(config, dataset, images, device, amp_dtype))
        except FloatingPointError as e:  # fp16 on random weights can overflow (a real base need not): record it
            print(f"{name}: {e}")
            overflowed.append(amp_dtype or "fp32")
            continue
        if device.type == "cuda":  # the frozen SAM, the trainable modules, optimiser state and one step's activations
            peaks[f"{name}_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if memo is not None:
        bench("pretrain_step_s", pretrain_step(memo, dataset, device))

    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'cpu'}"
    return {"device": device.type, "machine": machine, "sam_type": sam_type, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "batch_images": config.batch_images, "tasks_per_image": config.tasks_per_image,
            "median_s": results, "timed_runs": runs, "peak_memory_gb": peaks, "train_overflowed": overflowed}


def label_step(sam_type: str, images: dict, device: torch.device):
    """Per-image labelling: the shipped demo models on vit_tiny, random weights otherwise."""
    from talora.loading import load_model, model_spec
    from talora.predictor import PredictConfig, TaskAwarePredictor

    model = load_model(model_spec(sam_type, untrained=sam_type != "vit_tiny")).to(device)
    predictor = TaskAwarePredictor(model, PredictConfig())
    cycle = iter(np.resize(list(images), 1_000_000))
    return lambda: predictor.predict(images[next(cycle)], ["segment vehicles", "segment red objects"])


def train_step(config: SpeedConfig, dataset, images: dict, device: torch.device, amp_dtype: str | None):
    """One hypernet step on cached trunk features (batch_images x tasks_per_image rows)."""
    from talora.loading import build_task_aware_sam
    from talora.tasks import TaskSet
    from talora.train.batches import build_batch
    from talora.train.config import TrainConfig
    from talora.train.optim import autocast, backward_and_step, grad_scaler
    from talora.train.step import TrainStep

    torch.manual_seed(0)
    model = build_task_aware_sam(config.model).to(device)
    records = [dataset.images[i] for i in dataset.image_ids[: config.batch_images]]
    inputs = [model.preprocess(images[r.id]) for r in records]
    with torch.no_grad():  # one image at a time, as the embedding cache computes it
        trunk = torch.cat([model.embed_trunk(x[None].to(device)) for x, _ in inputs])
    tasks = [t for t in TaskSet.from_dataset(dataset) if not t.heldout]
    batch = build_batch(records, trunk, [s for _, s in inputs], dataset, tasks, {t.id: t.train_prompts for t in tasks},
                        np.random.default_rng(0), model.backbone, config.tasks_per_image, 1).to(device)
    step = TrainStep(model, model.hypernet)
    text = torch.randn(len(batch.prompts), config.model.hypernet.text_dim, device=device)
    train = TrainConfig(train_annotations="x", amp=amp_dtype is not None, amp_dtype=amp_dtype or "float16")
    optimiser = torch.optim.AdamW(step.parameters(), lr=1e-4)
    scaler = grad_scaler(train, device)

    def run() -> None:
        with autocast(train, device):
            loss = step(batch, text, train)["loss"]
        backward_and_step(loss, scaler, optimiser, step.parameters(), 1.0)

    return run


def pretrain_memo(dataset, sam_type: str):
    """A random base and its per-image pretraining tensors (built while the images exist)."""
    from talora.loading import load_backbone
    from talora.train.pretrain import ImageMemo, label_vocab

    memo = ImageMemo(load_backbone(sam_type), dataset, label_vocab(dataset), None)
    for image_id in dataset.image_ids:
        memo(image_id)
    return memo


def pretrain_step(memo, dataset, device: torch.device):
    """The whole SAM, 8 images x 4 prompts (configs/demo_pretrain.yaml's batch)."""
    from talora.train.config import TrainConfig
    from talora.train.optim import backward_and_step
    from talora.train.pretrain import PretrainStep, build_pretrain_batch

    backbone = memo.backbone
    batch = build_pretrain_batch([memo(i) for i in dataset.image_ids[:8]], np.random.default_rng(0), 4, 0.5,
                                 backbone.image_size).to(device)
    backbone.model.requires_grad_(True)
    step = PretrainStep(backbone, 1, memo.vocab).to(device)
    config = TrainConfig(train_annotations="x", mode="pretrain", aux_weight=10.0)
    optimiser = torch.optim.AdamW(step.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    return lambda: backward_and_step(step(batch, config)["loss"], scaler, optimiser, step.parameters(), 1.0)


def speed_config(sam_type: str, device: str, preset: str | None = None, batch_images: int | None = None,
                 tasks_per_image: int | None = None, min_run_time: float = 2.0, label: bool = True) -> SpeedConfig:
    """The model and batch of a training preset (`preset`: YAML text) or the variant's defaults;
    a preset for another variant is refused before any work."""
    import dataclasses

    from talora.config import default_config
    from talora.train.config import load_run_spec

    if not preset:
        return SpeedConfig(default_config(sam_type), device, batch_images or 8, tasks_per_image or 2, min_run_time,
                           label)
    spec = load_run_spec(preset)
    if spec.model.sam.sam_type != sam_type:
        raise ValueError(f"the preset is for {spec.model.sam.sam_type}; pass --sam-type {spec.model.sam.sam_type}")
    model = dataclasses.replace(spec.model, sam=dataclasses.replace(spec.model.sam, checkpoint=None))
    return SpeedConfig(model, device, batch_images or spec.train.batch_images,
                       tasks_per_image or spec.train.tasks_per_image, min_run_time, label)


def print_report(report: dict) -> None:
    for name, seconds in report["median_s"].items():
        print(f"{name:<22} {seconds * 1e3:8.1f} ms  ({report['timed_runs'][name]} runs)")
    for name, gb in report["peak_memory_gb"].items():
        print(f"{name:<30} {gb:6.2f} GB")
    print(f"({report['sam_type']}, {report['machine']}, {report['device']}, {report['torch_threads']} threads, median)")
