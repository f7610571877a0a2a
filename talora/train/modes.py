"""What differs between training modes, behind one interface the loop (talora.train.loop) drives.

A mode builds its model and data on a worker and supplies:
- `module`: the nn.Module whose parameters train (DDP wraps it);
- `batch(step, rng)`: one step's batch on the device (images drawn from seeded epoch orders);
- `loss(trainable, batch)`: its losses (the loop runs this under autocast);
- `samples(batch)`: samples the batch holds, for the rate in the log;
- `held_parameters(step)`: parameters this step must not update (their gradients are dropped);
- `validate()`: this worker's validation metrics, all-reduced, with `val_score` (the best-checkpoint metric);
- `write_artifact(directory)`: the file users take away.

`TaskMode` trains adapters: a hypernet (`hypernet`) or one plain LoRA (`static`) on a frozen SAM.
`PretrainMode` trains the whole SAM and its per-cell heads (the demo base; talora.train.pretrain).
"""

from __future__ import annotations

import os

import numpy as np
import ray.train
import torch

from talora.adapters.static import StaticLora
from talora.core.text import TextEncoder
from talora.data.coco import CocoDataset
from talora.data.tasks import Task, TaskSet
from talora.io.storage import StorageOptions
from talora.model.files import AdapterHeader, save_adapter
from talora.model.loading import build_task_aware_sam, load_backbone, save_backbone, save_hypernet
from talora.train.batches import build_batch, epoch_images
from talora.train.memo import TrunkMemo
from talora.train.optim import autocast
from talora.train.pretrain import ImageMemo, build_pretrain_step, label_vocab
from talora.train.reduce import sum_over_workers
from talora.train.step import TrainStep
from talora.train.validate import group_metrics, reduce_ious, validate, validation_rows


class TaskMode:
    """Adapters on a frozen SAM: where the time goes is the encoder tail and the decoder for
    R = batch_images x tasks_per_image (image, task) rows plus their point rows; the frozen trunk runs
    once per image (memoised per worker, or read from the embedding cache) and the text encoder once
    per prompt, at start."""

    name = "train"

    def __init__(self, spec, storage: StorageOptions, rank: int, world: int, device: torch.device) -> None:
        self.spec, self.cfg, self.storage, self.device = spec, spec.train, storage, device
        cfg = self.cfg
        model = build_task_aware_sam(spec.model, storage=storage).to(device)
        self.source = model.hypernet if cfg.mode == "hypernet" else StaticLora(
            model.targets, spec.model.lora.rank, spec.model.lora.scale).to(device)
        self.model = model
        self.module = TrainStep(model, self.source).to(device)
        model.train()

        self.train_set = CocoDataset.load(cfg.train_annotations, cfg.train_image_root, storage)
        self.train_tasks, val_tasks = task_lists(TaskSet.from_dataset(self.train_set), spec)
        self.prompts_of = {t.id: t.train_prompts or t.prompts()[:1] for t in self.train_tasks}
        self.val_rows = validation_rows(val_tasks, static=cfg.mode == "static")
        self.text_embeddings: dict[str, torch.Tensor] = {}
        if cfg.mode == "hypernet":
            encoder = TextEncoder(spec.model.text.model)
            prompts = sorted({p for ps in self.prompts_of.values() for p in ps} | {p for _, _, p in self.val_rows})
            self.text_embeddings = dict(zip(prompts, encoder.encode(prompts).to(device)))
            del encoder
        memo_bytes = int(cfg.memo_gb * 2**30)
        self.memo = TrunkMemo(model, self.train_set, storage, device, memo_bytes)  # the training images' trunk features
        self.mine = own_share(self.train_set.image_ids, rank, world)
        self.rank = rank
        if cfg.val_annotations:
            self.val_set = CocoDataset.load(cfg.val_annotations, cfg.val_image_root, storage)
            self.val_trunk = TrunkMemo(model, self.val_set, storage, device, memo_bytes)
            self.val_ids = self.val_set.image_ids[: cfg.val_images][rank::world]
        self.cache_batches = None
        if cfg.embeddings:
            self.cache_batches = cache_batches(ray.train.get_dataset_shard("train"), cfg.batch_images, device)

    def batch(self, step: int, rng: np.random.Generator):
        cfg = self.cfg
        if self.cache_batches is not None:
            ids, trunk, input_sizes = next(self.cache_batches)
            records = [self.train_set.images[i] for i in ids]
        else:
            records = [self.train_set.images[i] for i in epoch_images(self.mine, step, cfg.batch_images,
                                                                      (cfg.seed, self.rank))]
            entries = [self.memo(r.id) for r in records]
            trunk = torch.stack([e[0] for e in entries])
            input_sizes = [e[1] for e in entries]
        return build_batch(records, trunk, input_sizes, self.train_set, self.train_tasks, self.prompts_of, rng,
                           self.model.backbone, cfg.tasks_per_image, cfg.num_points, cfg.box_share).to(self.device)

    def loss(self, trainable, batch) -> dict[str, torch.Tensor]:
        text = torch.stack([self.text_embeddings[p] for p in batch.prompts]) if self.cfg.mode == "hypernet" else None
        return trainable(batch, text, self.cfg)

    def samples(self, batch) -> int:
        return len(batch.image_index)

    def held_parameters(self, step: int) -> list[torch.nn.Parameter]:
        return []

    def validate(self) -> dict[str, float]:
        cfg = self.cfg
        with autocast(cfg, self.device):
            entries = ((self.val_set.images[i], *self.val_trunk(i)) for i in self.val_ids) if cfg.val_annotations else ()
            val_text = (torch.stack([self.text_embeddings[p] for _, _, p in self.val_rows])
                        if self.text_embeddings else None)
            ious = validate(self.module, entries, self.val_set if cfg.val_annotations else None, self.val_rows,
                            val_text, chunk=cfg.batch_images * cfg.tasks_per_image)
        keys = sorted({(t.id, g) for t, g, _ in self.val_rows})
        return group_metrics(reduce_ious(ious, keys, self.device))

    def write_artifact(self, directory: str) -> None:
        """A hypernet file (`--hypernet`) or a static adapter file (`--adapter`)."""
        spec = self.spec
        if spec.train.mode == "hypernet":
            save_hypernet(self.model, os.path.join(directory, "hypernet.safetensors"))
            return
        header = AdapterHeader(spec.model.sam.sam_type, spec.model.lora.rank, spec.model.lora.alpha,
                               spec.train.task or "all objects", "static",
                               [{"name": t.name, "in_features": t.in_features, "out_features": t.out_features}
                                for t in self.model.targets])
        save_adapter(os.path.join(directory, "adapter.safetensors"), self.source(), header)

    def memo_note(self) -> str:
        return (self.memo.full_message("trunk-feature")
                + "; for a dataset this size precompute them once (jobs/embed_images.py, --embeddings)")


class PretrainMode:
    """The whole SAM and its per-cell heads; the artifact is the base SAM itself (`sam.safetensors`,
    loadable by `talora.model.loading.load_backbone`). A detector (SAM 3) is prompted by category
    names instead of points and boxes (talora.train.pretrain)."""

    name = "pretrain"

    def __init__(self, spec, storage: StorageOptions, rank: int, world: int, device: torch.device) -> None:
        self.spec, self.cfg, self.device, self.rank = spec, spec.train, device, rank
        cfg = self.cfg
        self.train_set = CocoDataset.load(cfg.train_annotations, cfg.train_image_root, storage)
        self.vocab = label_vocab(self.train_set)
        self.backbone = load_backbone(spec.model.sam.sam_type, spec.model.sam.checkpoint, storage)  # a start point, or random
        self.backbone.model.requires_grad_(True)
        self.held: list[torch.nn.Parameter] = []
        if spec.model.sam.checkpoint is None and cfg.high_res_hold_steps:
            self.held = [p for skip in self.backbone.high_res_skips() for p in skip.parameters()]
            with torch.no_grad():
                for p in self.held:
                    p.zero_()
        self.module = build_pretrain_step(self.backbone, spec.model.tail_blocks or 1, self.vocab,
                                          self.train_set).to(device)
        self.module.train()
        memo_bytes = int(cfg.memo_gb * 2**30)
        self.memo = ImageMemo(self.backbone, self.train_set, self.vocab, storage, memo_bytes)
        self.mine = own_share(self.train_set.image_ids, rank, world)
        self.val_set, self.val_ids, self.val_entries = None, [], []
        if cfg.val_annotations:
            self.val_set = CocoDataset.load(cfg.val_annotations, cfg.val_image_root, storage)
            val_memo = ImageMemo(self.backbone, self.val_set, self.vocab, storage, memo_bytes)
            self.val_ids = self.val_set.image_ids[: cfg.val_images][rank::world]
            self.val_entries = [val_memo(i) for i in self.val_ids]

    def batch(self, step: int, rng: np.random.Generator):
        cfg = self.cfg
        ids = epoch_images(self.mine, step, cfg.batch_images, (cfg.seed, self.rank))
        return self.module.make_batch([self.memo(i) for i in ids], [self.train_set.images[i] for i in ids],
                                      self.train_set, rng, cfg.prompts_per_image, cfg.box_fraction).to(self.device)

    def loss(self, trainable, batch) -> dict[str, torch.Tensor]:
        return trainable(batch, self.cfg)

    def samples(self, batch) -> int:
        return len(batch.images)

    def held_parameters(self, step: int) -> list[torch.nn.Parameter]:
        return self.held if step < self.cfg.high_res_hold_steps else []

    def validate(self) -> dict[str, float]:
        records = [self.val_set.images[i] for i in self.val_ids] if self.val_set else []
        with autocast(self.cfg, self.device):
            sums = self.module.validate(self.val_entries, records, self.val_set)
        val = reduce_means(sums, self.device)
        val["val_score"] = val[self.module.score_key]
        return val

    def write_artifact(self, directory: str) -> None:
        save_backbone(self.backbone, os.path.join(directory, "sam.safetensors"))

    def memo_note(self) -> str:
        return self.memo.full_message("training-image")


MODES = {"hypernet": TaskMode, "static": TaskMode, "pretrain": PretrainMode}


def task_lists(tasks, spec) -> tuple[list, list]:
    """(training tasks, validation tasks) of a mode: every non-held-out task (hypernet), or one (static)."""
    if spec.train.mode != "static":
        return [t for t in tasks if not t.heldout], list(tasks)
    if spec.train.task is None:  # the whole dataset: every object is the target
        everything = Task("all", "all", "object", "objects", ())
        return [everything], [everything]
    if spec.train.task not in tasks.by_id:
        raise ValueError(f"train.task {spec.train.task!r} is not a task of {spec.train.train_annotations}")
    return [tasks.by_id[spec.train.task]], [tasks.by_id[spec.train.task]]


def own_share(image_ids: list[int], rank: int, world: int) -> list[int]:
    mine = image_ids[rank::world]
    if not mine:
        raise ValueError(f"worker {rank} has no training image: {len(image_ids)} images for {world} workers")
    return mine


def reduce_means(sums: dict[str, list[float]], device: torch.device) -> dict[str, float]:
    """{metric: [sum, count]} of every worker -> {metric: mean}."""
    keys = sorted(sums)
    totals = sum_over_workers([sums[k] for k in keys], device)
    return {k: float(s / c) if c else 0.0 for k, (s, c) in zip(keys, totals)}


def cache_batches(shard, batch_images: int, device: torch.device):
    """Endless (image ids, trunk (B, h, w, C), input sizes) from this worker's embedding-cache shard."""
    while True:
        for b in shard.iter_batches(batch_size=batch_images, local_shuffle_buffer_size=4 * batch_images,
                                    batch_format="numpy"):
            feats = [np.frombuffer(f, dtype=np.float16).reshape(s) for f, s in zip(b["features"], b["shape"])]
            trunk = torch.from_numpy(np.stack(feats).astype(np.float32)).to(device)
            sizes = list(zip(b["input_height"].tolist(), b["input_width"].tolist()))
            yield [int(i) for i in b["image_id"]], trunk, sizes
