"""Speed numbers of the hot paths, measured side by side in one run; printed and saved as JSON.

    python jobs/benchmark.py [--device cpu|cuda] [--sam-type vit_tiny|vit_h] [--repeats 20] [--out FILE]

- label: per-image latency of TaskAwarePredictor (2 prompts, semantic + instance masks) on
  demo-domain images: the shipped demo models on vit_tiny; random weights of the real
  architecture otherwise (official checkpoints cannot be fetched here; speed does not depend on
  the values);
- train: one hypernet training step (adapters -> encoder tail -> decoder -> losses -> AdamW) on
  cached trunk features, `--batch-images` x `--tasks-per-image` rows, fp32 and, on CUDA, fp16 and bf16 AMP;
- pretrain (vit_tiny only): one step of the whole SAM (configs/demo_pretrain.yaml's batch).

Medians of `--repeats` timed runs after warm-up (CUDA synchronised before each clock read).
Numbers belong to the machine they were taken on: the JSON records it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sam-type", default="vit_tiny", choices=("vit_tiny", "vit_b", "vit_l", "vit_h"))
    p.add_argument("--config", help="a training preset: its model (random weights) and batch for the train step")
    p.add_argument("--batch-images", type=int, default=None, help="train step: images (default 8, or the preset's)")
    p.add_argument("--tasks-per-image", type=int, default=None, help="train step: tasks per image (default 2, or the "
                   "preset's); rows = images x tasks")
    p.add_argument("--skip-label", action="store_true", help="train steps only")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="runs/benchmark.json")
    return p.parse_args(argv)


def timed(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of `fn()`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    model_config, args.batch_images, args.tasks_per_image = train_setup(args)  # a bad preset fails first
    if args.threads:
        torch.set_num_threads(args.threads)
    from talora.data.coco import CocoDataset
    from talora.data.synthetic import write_demo_dataset
    from talora.model import build_task_aware_sam
    from talora.tasks import TaskSet
    from talora.train.batches import build_batch
    from talora.train.config import TrainConfig
    from talora.train.loop import autocast, backward_and_step, grad_scaler
    from talora.train.step import TrainStep

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="talora-bench-") as tmp:
        dataset = CocoDataset.load(write_demo_dataset(tmp, num_train=8, num_val=1, seed=21)["train"])
        images = {i: dataset.load_image(i) for i in dataset.image_ids}
        memo = pretrain_memo(dataset) if args.sam_type == "vit_tiny" else None  # reads the images too
    results: dict[str, float] = {}
    peaks: dict[str, float] = {}
    overflowed: list[str] = []
    bench = lambda fn: timed(fn, device, args.repeats, args.warmup)

    if not args.skip_label:
        results["label_image_s"] = label_latency(args.sam_type, images, device, bench)

    # train: the hypernet step on cached trunk features (batch_images x tasks_per_image rows)
    torch.manual_seed(0)
    trained = build_task_aware_sam(model_config).to(device)
    records = [dataset.images[i] for i in dataset.image_ids[: args.batch_images]]
    inputs = [trained.preprocess(images[r.id]) for r in records]
    with torch.no_grad():  # one image at a time, as the embedding cache computes it
        trunk = torch.cat([trained.embed_trunk(x[None].to(device)) for x, _ in inputs])
    tasks = [t for t in TaskSet.from_dataset(dataset) if not t.heldout]
    size = trained.sam.image_encoder.img_size
    lowres = 4 * trained.sam.prompt_encoder.image_embedding_size[0]
    batch = build_batch(records, trunk, [s for _, s in inputs], dataset, tasks, {t.id: t.train_prompts for t in tasks},
                        np.random.default_rng(0), size, lowres, args.tasks_per_image, 1).to(device)
    step = TrainStep(trained, trained.hypernet)
    text = torch.randn(len(batch.prompts), model_config.hypernet.text_dim, device=device)
    for amp_dtype in (None, "float16", "bfloat16") if device.type == "cuda" else (None,):
        config = TrainConfig(train_annotations="x", amp=amp_dtype is not None, amp_dtype=amp_dtype or "float16")
        optimiser = torch.optim.AdamW(step.parameters(), lr=1e-4)
        scaler = grad_scaler(config, device)

        def train_step(config=config, scaler=scaler, optimiser=optimiser):
            with autocast(config, device):
                loss = step(batch, text, config)["loss"]
            backward_and_step(loss, scaler, optimiser, step.parameters(), 1.0)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            results[f"train_step_{amp_dtype or 'fp32'}_s"] = bench(train_step)
        except FloatingPointError as e:  # fp16 on random weights can overflow (a real base need not): record it
            print(f"train_step_{amp_dtype or 'fp32'}: {e}")
            overflowed.append(amp_dtype or "fp32")
            continue
        if device.type == "cuda":  # the frozen SAM, the trainable modules, optimiser state and one step's activations
            peaks[f"train_step_{amp_dtype or 'fp32'}_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30

    if memo is not None:
        results["pretrain_step_s"] = pretrain_step(memo, dataset, device, bench)

    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'cpu'}"
    report = {"device": device.type, "machine": machine, "sam_type": args.sam_type,
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": args.repeats,
              "batch_images": args.batch_images, "tasks_per_image": args.tasks_per_image, "median_s": results,
              "peak_memory_gb": peaks, "train_overflowed": overflowed}
    for name, seconds in results.items():
        print(f"{name:<22} {seconds * 1e3:8.1f} ms")
    for name, gb in peaks.items():
        print(f"{name:<30} {gb:6.2f} GB")
    print(f"({args.sam_type}, {machine}, {device.type}, {torch.get_num_threads()} threads, median of {args.repeats})")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return 0


def train_setup(args):
    """(model config, batch images, tasks per image): the preset's when `--config`, else the defaults."""
    import dataclasses

    from talora.config import default_config
    from talora.train.config import load_run_spec

    if not args.config:
        return default_config(args.sam_type), args.batch_images or 8, args.tasks_per_image or 2
    with open(args.config) as f:
        spec = load_run_spec(f.read())
    if spec.model.sam.sam_type != args.sam_type:
        raise SystemExit(f"--config {args.config} is for {spec.model.sam.sam_type}; pass --sam-type to match")
    model = dataclasses.replace(spec.model, sam=dataclasses.replace(spec.model.sam, checkpoint=None))
    return model, args.batch_images or spec.train.batch_images, args.tasks_per_image or spec.train.tasks_per_image


def label_latency(sam_type: str, images: dict, device: torch.device, bench) -> float:
    """Per-image labelling: the shipped demo models on vit_tiny, random weights otherwise."""
    from talora.label import load_model, model_spec
    from talora.predictor import PredictConfig, TaskAwarePredictor

    model = load_model(model_spec(sam_type, untrained=sam_type != "vit_tiny"), None).to(device)
    predictor = TaskAwarePredictor(model, PredictConfig())
    cycle = iter(np.resize(list(images), 10_000))
    return bench(lambda: predictor.predict(images[next(cycle)], ["segment vehicles", "segment red objects"]))


def pretrain_memo(dataset):
    """A random vit_tiny and its per-image pretraining tensors (built while the images exist)."""
    from talora.sam import build_sam
    from talora.train.pretrain import ImageMemo, label_vocab

    memo = ImageMemo(build_sam("vit_tiny"), dataset, label_vocab(dataset), None)
    for image_id in dataset.image_ids:
        memo(image_id)
    return memo


def pretrain_step(memo, dataset, device: torch.device, bench) -> float:
    """The whole vit_tiny SAM, 8 images x 4 prompts (configs/demo_pretrain.yaml's batch)."""
    from talora.train.config import TrainConfig
    from talora.train.loop import backward_and_step
    from talora.train.pretrain import PretrainStep, build_pretrain_batch

    sam = memo.sam
    pre_batch = build_pretrain_batch([memo(i) for i in dataset.image_ids[:8]], np.random.default_rng(0), 4, 0.5,
                                     sam.image_encoder.img_size).to(device)
    pre = PretrainStep(sam.requires_grad_(True), 1, memo.vocab).to(device)
    pre_config = TrainConfig(train_annotations="x", mode="pretrain", aux_weight=10.0)
    pre_optimiser = torch.optim.AdamW(pre.parameters(), lr=1e-4)
    pre_scaler = torch.amp.GradScaler(device.type, enabled=False)
    return bench(lambda: backward_and_step(pre(pre_batch, pre_config)["loss"], pre_scaler, pre_optimiser,
                                           pre.parameters(), 1.0))


if __name__ == "__main__":
    sys.exit(main())
