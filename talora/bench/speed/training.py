"""Training steps per second: a hypernet step from cached trunk features and encoding on the fly
(AMP precisions on CUDA), and a pretraining step."""

from __future__ import annotations

import tempfile

import numpy as np
import torch

from talora.bench.speed.config import SpeedConfig
from talora.bench.timing import median_seconds
from talora.data.coco import CocoDataset
from talora.data.synthetic import write_demo_dataset
from talora.data.tasks import TaskSet
from talora.model.loading import build_task_aware_sam, load_backbone
from talora.train.batches import build_batch
from talora.train.config import TrainConfig
from talora.train.optim import autocast, backward_and_step, grad_scaler
from talora.train.pretrain import ImageMemo, build_pretrain_step, label_vocab
from talora.train.step import TrainStep


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
    for amp_dtype in (None, "float16", "bfloat16") if device.type == "cuda" else (None, "bfloat16"):
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


def pretrain_step(dataset, sam_type: str, device: torch.device, amp_dtype: str | None = None):
    """One step of the whole SAM: 8 images x 4 prompts (configs/demo_pretrain.yaml's batch; a
    detector's 4 are category names), under
    the training loop's autocast rule for `amp_dtype` (None: float32)."""
    backbone = load_backbone(sam_type)
    vocab = label_vocab(dataset)
    memo = ImageMemo(backbone, dataset, vocab, None)
    ids = dataset.image_ids[:8]
    backbone.model.requires_grad_(True)
    step = build_pretrain_step(backbone, 1, vocab, dataset).to(device)
    batch = step.make_batch([memo(i) for i in ids], [dataset.images[i] for i in ids], dataset,
                            np.random.default_rng(0), 4, 0.5).to(device)
    config = TrainConfig(train_annotations="x", mode="pretrain", aux_weight=10.0, amp=amp_dtype is not None,
                         amp_dtype=amp_dtype or "float16")
    optimiser = torch.optim.AdamW(step.parameters(), lr=1e-4)
    scaler = grad_scaler(config, device)

    def run() -> None:
        with autocast(config, device):
            loss = step(batch, config)["loss"]
        backward_and_step(loss, scaler, optimiser, step.parameters(), 1.0)

    return run
