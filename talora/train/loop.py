"""The per-worker training loop (Ray Train V2), the same for one CPU worker, one T4 or N GPUs.

Where the time goes: the frozen trunk runs once per image (memoised per worker, or read from the
embedding cache); each step runs the encoder tail and the decoder for R = batch_images x
tasks_per_image (image, task) rows plus their point rows, and the hypernet once for the step's
distinct prompts (text embeddings are computed once at start: the text encoder is frozen).

Synchronisation: `ray.train.report` is a barrier in V2, so every worker reports at the same
steps (validation steps only); rank 0 attaches the checkpoint. Validation is sharded across
workers and all-reduced. DDP wraps `TrainStep` (trainable modules only).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

from talora.storage import StorageOptions, join, read_bytes, write_bytes
from talora.train.memo import LruMemo
from talora.weights import read_weights, write_weights

CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.pt", "state.json", "config.yaml")


def _task_list(tasks, spec):
    from talora.tasks import Task

    if spec.train.mode != "static":
        return [t for t in tasks if not t.heldout], list(tasks)
    if spec.train.task is None:  # the whole dataset: every object is the target
        everything = Task("all", "all", "object", "objects", ())
        return [everything], [everything]
    if spec.train.task not in tasks.by_id:
        raise ValueError(f"train.task {spec.train.task!r} is not a task of {spec.train.train_annotations}")
    return [tasks.by_id[spec.train.task]], [tasks.by_id[spec.train.task]]


class TrunkMemo(LruMemo[int, tuple[torch.Tensor, tuple[int, int]]]):
    """(trunk features (h, w, C), input size) per image id: computed on `device` once per worker (the
    trunk is frozen), kept in CPU memory up to `max_bytes` (talora.train.memo)."""

    def __init__(self, model, dataset, storage: StorageOptions, device: torch.device, max_bytes: int = 2**62) -> None:
        self.model, self.dataset, self.storage, self.device = model, dataset, storage, device
        super().__init__(self._build, max_bytes)

    @torch.no_grad()
    def _build(self, image_id: int) -> tuple[torch.Tensor, tuple[int, int]]:
        x, input_size = self.model.preprocess(self.dataset.load_image(image_id, self.storage))
        return self.model.embed_trunk(x[None].to(self.device))[0].cpu(), input_size


def train_loop_per_worker(loop_config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    from talora.data.coco import CocoDataset
    from talora.model import build_task_aware_sam
    from talora.static import StaticLora
    from talora.tasks import TaskSet
    from talora.text import TextEncoder
    from talora.train.batches import build_batch, epoch_images
    from talora.train.step import TrainStep
    from talora.train.validate import (
        group_metrics,
        reduce_ious,
        validate,
        validation_rows,
    )

    spec, storage, rank, world, device = worker_setup(loop_config)
    if spec.train.mode == "pretrain":
        return pretrain_loop_per_worker(loop_config)
    cfg = spec.train

    # --- model, trainable modules, optimiser ---------------------------------------------------
    model = build_task_aware_sam(spec.model, storage=storage).to(device)
    source = model.hypernet if cfg.mode == "hypernet" else StaticLora(model.targets, spec.model.lora.rank,
                                                                      spec.model.lora.scale).to(device)
    step_module = TrainStep(model, source).to(device)
    model.train()
    trainable = ray.train.torch.prepare_model(step_module) if world > 1 else step_module
    optimizer = torch.optim.AdamW(step_module.parameters(), lr=cfg.lr * world, weight_decay=cfg.weight_decay)
    scheduler = lr_scheduler(optimizer, cfg)
    scaler = grad_scaler(cfg, device)

    # --- data ------------------------------------------------------------------------------------
    train_set = CocoDataset.load(cfg.train_annotations, cfg.train_image_root, storage)
    tasks = TaskSet.from_dataset(train_set)
    train_tasks, val_tasks = _task_list(tasks, spec)
    prompts_of = {t.id: t.train_prompts or t.prompts()[:1] for t in train_tasks}
    val_rows = validation_rows(val_tasks, static=cfg.mode == "static")
    text_embeddings: dict[str, torch.Tensor] = {}
    if cfg.mode == "hypernet":
        encoder = TextEncoder(spec.model.text.model)
        prompts = sorted({p for ps in prompts_of.values() for p in ps} | {p for _, _, p in val_rows})
        text_embeddings = dict(zip(prompts, encoder.encode(prompts).to(device)))
        del encoder
    image_size = model.sam.image_encoder.img_size
    lowres = 4 * model.sam.prompt_encoder.image_embedding_size[0]
    memo_bytes = int(cfg.memo_gb * 2**30)
    train_trunk = TrunkMemo(model, train_set, storage, device, memo_bytes)
    mine = train_set.image_ids[rank::world]
    if not mine:
        raise ValueError(f"worker {rank} has no training image: {len(train_set.image_ids)} images for {world} workers")
    if cfg.val_annotations:
        val_set = CocoDataset.load(cfg.val_annotations, cfg.val_image_root, storage)
        val_trunk = TrunkMemo(model, val_set, storage, device, memo_bytes)
        val_ids = val_set.image_ids[: cfg.val_images][rank::world]
    cache_batches = None
    if cfg.embeddings:
        cache_batches = _cache_batches(ray.train.get_dataset_shard("train"), cfg.batch_images, device)

    # --- resume ----------------------------------------------------------------------------------
    start_step, history = resume(loop_config, step_module, optimizer, scheduler, scaler, device, rank)
    worker_nodes = gather_worker_nodes(world)
    fail_at = loop_config.get("fail_at_step", 0)  # test hook: fail once, right after that step's checkpoint

    # --- loop ------------------------------------------------------------------------------------
    started, samples, memo_full_said = time.perf_counter(), 0, False
    for step in range(start_step, cfg.max_steps):
        rng = np.random.default_rng([cfg.seed, rank, step])  # the same batches after a resume
        if cache_batches is not None:
            records, trunk, input_sizes = next(cache_batches)
            records = [train_set.images[i] for i in records]
        else:
            records = [train_set.images[i] for i in epoch_images(mine, step, cfg.batch_images, (cfg.seed, rank))]
            entries = [train_trunk(r.id) for r in records]
            trunk = torch.stack([e[0] for e in entries])
            input_sizes = [e[1] for e in entries]
        batch = build_batch(records, trunk, input_sizes, train_set, train_tasks, prompts_of, rng, image_size,
                            lowres, cfg.tasks_per_image, cfg.num_points).to(device)
        text = torch.stack([text_embeddings[p] for p in batch.prompts]) if cfg.mode == "hypernet" else None

        with autocast(cfg, device):
            losses = trainable(batch, text, cfg)
        backward_and_step(losses["loss"], scaler, optimizer, step_module.parameters(), cfg.grad_clip)
        scheduler.step()
        samples += len(batch.image_index) * world

        done = step + 1
        metrics = {"step": done, **{k: float(v.detach()) for k, v in losses.items()}, "lr": scheduler.get_last_lr()[0],
                   "start_step": start_step, "worker_nodes": worker_nodes}
        if rank == 0 and (done % cfg.log_every == 0 or done == cfg.max_steps):
            elapsed = time.perf_counter() - started
            rate = samples / elapsed
            eta = (cfg.max_steps - done) * elapsed / (done - start_step)
            say(f"train: step {done}/{cfg.max_steps} loss {metrics['loss']:.4f} {rate:.1f} samples/s eta {eta:.0f}s")
            if train_trunk.dropped and not memo_full_said:
                memo_full_said = True
                say("train: " + train_trunk.full_message("trunk-feature")
                    + "; for a dataset this size precompute them once (jobs/embed_images.py, --embeddings)")
        if rank == 0:
            history.append(metrics)

        if done % cfg.val_every == 0 or done == cfg.max_steps:
            step_module.eval()
            with autocast(cfg, device):
                entries = ((val_set.images[i], *val_trunk(i)) for i in val_ids) if cfg.val_annotations else ()
                val_text = torch.stack([text_embeddings[p] for _, _, p in val_rows]) if text_embeddings else None
                ious = validate(step_module, entries, val_set if cfg.val_annotations else None, val_rows, val_text,
                                chunk=cfg.batch_images * cfg.tasks_per_image)
            keys = sorted({(t.id, g) for t, g, _ in val_rows})
            val = group_metrics(reduce_ious(ious, keys, device))
            step_module.train()
            model.sam.eval()
            report = {**metrics, **val}
            if rank == 0:
                history[-1] = report
                say("train: validation " + " ".join(f"{k} {v:.4f}" for k, v in val.items()))
                save_checkpoint(loop_config, storage, history, report, step_module, optimizer, scheduler, scaler,
                                spec, lambda d: _write_artifact(d, model, source, spec))
            else:
                ray.train.report(report)
            if fail_at and done == fail_at and start_step == 0 and rank == 0:
                raise RuntimeError(f"injected failure after step {done} (TALORA_FAIL_AT_STEP)")


def pretrain_loop_per_worker(loop_config: dict) -> None:
    """Pretraining the base (talora.train.pretrain): the whole SAM and its per-cell heads are trained;
    the checkpoint's artifact is the base SAM itself (`sam.safetensors`, loadable by build_sam)."""
    import ray
    import ray.train
    import ray.train.torch

    from talora.data.coco import CocoDataset
    from talora.sam import build_sam, save_sam
    from talora.train.batches import epoch_images
    from talora.train.pretrain import (
        ImageMemo,
        PretrainStep,
        build_pretrain_batch,
        label_vocab,
        validate_pretrain,
    )

    spec, storage, rank, world, device = worker_setup(loop_config)
    cfg = spec.train

    train_set = CocoDataset.load(cfg.train_annotations, cfg.train_image_root, storage)
    vocab = label_vocab(train_set)
    sam = build_sam(spec.model.sam.sam_type, spec.model.sam.checkpoint, storage)  # random init unless a start point
    sam.requires_grad_(True)
    step_module = PretrainStep(sam, spec.model.tail_blocks or 1, vocab).to(device)
    step_module.train()
    trainable = ray.train.torch.prepare_model(step_module) if world > 1 else step_module
    optimizer = torch.optim.AdamW(step_module.parameters(), lr=cfg.lr * world, weight_decay=cfg.weight_decay)
    scheduler = lr_scheduler(optimizer, cfg)
    scaler = grad_scaler(cfg, device)

    memo_bytes = int(cfg.memo_gb * 2**30)
    train_memo = ImageMemo(sam, train_set, vocab, storage, memo_bytes)
    mine = train_set.image_ids[rank::world]
    if not mine:
        raise ValueError(f"worker {rank} has no training image: {len(train_set.image_ids)} images for {world} workers")
    val_entries = []
    if cfg.val_annotations:
        val_set = CocoDataset.load(cfg.val_annotations, cfg.val_image_root, storage)
        val_memo = ImageMemo(sam, val_set, vocab, storage, memo_bytes)
        val_entries = [val_memo(i) for i in val_set.image_ids[: cfg.val_images][rank::world]]

    start_step, history = resume(loop_config, step_module, optimizer, scheduler, scaler, device, rank)
    worker_nodes = gather_worker_nodes(world)
    fail_at = loop_config.get("fail_at_step", 0)
    size = sam.image_encoder.img_size
    started, samples, memo_full_said = time.perf_counter(), 0, False
    for step in range(start_step, cfg.max_steps):
        rng = np.random.default_rng([cfg.seed, rank, step])  # the same batches after a resume
        entries = [train_memo(i) for i in epoch_images(mine, step, cfg.batch_images, (cfg.seed, rank))]
        batch = build_pretrain_batch(entries, rng, cfg.prompts_per_image, cfg.box_fraction, size).to(device)
        with autocast(cfg, device):
            losses = trainable(batch, cfg)
        backward_and_step(losses["loss"], scaler, optimizer, step_module.parameters(), cfg.grad_clip)
        scheduler.step()
        samples += cfg.batch_images * world

        done = step + 1
        metrics = {"step": done, **{k: float(v.detach()) for k, v in losses.items()}, "lr": scheduler.get_last_lr()[0],
                   "start_step": start_step, "worker_nodes": worker_nodes}
        if rank == 0 and (done % cfg.log_every == 0 or done == cfg.max_steps):
            elapsed = time.perf_counter() - started
            say(f"pretrain: step {done}/{cfg.max_steps} loss {metrics['loss']:.4f} "
                + " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith(("loss_", "iou_")))
                + f" {samples / elapsed:.1f} images/s eta {(cfg.max_steps - done) * elapsed / (done - start_step):.0f}s")
            if train_memo.dropped and not memo_full_said:
                memo_full_said = True
                say("pretrain: " + train_memo.full_message("training-image"))
        if rank == 0:
            history.append(metrics)

        if done % cfg.val_every == 0 or done == cfg.max_steps:
            step_module.eval()
            with autocast(cfg, device):
                sums = validate_pretrain(step_module, val_entries, vocab)
            step_module.train()
            val = _reduce_means(sums, device)
            val["val_score"] = val["val_point_miou"]
            report = {**metrics, **val}
            if rank == 0:
                history[-1] = report
                say("pretrain: validation " + " ".join(f"{k} {v:.4f}" for k, v in val.items()))
                save_checkpoint(loop_config, storage, history, report, step_module, optimizer, scheduler, scaler,
                                spec, lambda d: save_sam(sam, os.path.join(d, "sam.safetensors")))
            else:
                ray.train.report(report)
            if fail_at and done == fail_at and start_step == 0 and rank == 0:
                raise RuntimeError(f"injected failure after step {done} (TALORA_FAIL_AT_STEP)")


def _reduce_means(sums: dict[str, list[float]], device: torch.device) -> dict[str, float]:
    """{metric: [sum, count]} of every worker -> {metric: mean}."""
    import torch.distributed as dist

    keys = sorted(sums)
    totals = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    return {k: float(s / c) if c else 0.0 for k, (s, c) in zip(keys, totals.tolist())}


# --- shared by both loops: schedule, resume, checkpoints -------------------------------------------


def worker_setup(loop_config: dict):
    """(spec, storage, rank, world size, device) of this worker; threads and seed set."""
    import ray.train
    import ray.train.torch

    from talora.train.config import load_run_spec

    spec = load_run_spec(loop_config["spec"])
    context = ray.train.get_context()
    torch.set_num_threads(max(1, int(spec.train.cpus_per_worker)))
    torch.manual_seed(spec.train.seed)  # identical trainable init on every worker (DDP broadcasts anyway)
    return (spec, StorageOptions(**loop_config["storage"]), context.get_world_rank(), context.get_world_size(),
            ray.train.torch.get_device())


def lr_scheduler(optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps`, then constant or cosine to 0 at `max_steps`."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        if cfg.lr_schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, cfg.max_steps) / cfg.max_steps))
        return warm

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resume(loop_config: dict, step_module, optimizer, scheduler, scaler, device, rank: int) -> tuple[int, list[dict]]:
    """(start step, metric history up to it) from Ray Train's checkpoint of this run, if any."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0, []
    with checkpoint.as_directory() as d:
        state, _ = read_weights(os.path.join(d, "trainable.safetensors"))
        step_module.load_state_dict(state)
        opt_state = torch.load(os.path.join(d, "optimizer.pt"), map_location=device, weights_only=True)
        optimizer.load_state_dict(opt_state["optimizer"])
        scheduler.load_state_dict(opt_state["scheduler"])
        scaler.load_state_dict(opt_state["scaler"])
        with open(os.path.join(d, "state.json")) as f:
            start_step = json.load(f)["step"]
    history = _read_history(loop_config["run_uri"], StorageOptions(**loop_config["storage"]), start_step)
    if rank == 0:
        say(f"train: resumed from step {start_step}")
    return start_step, history


def gather_worker_nodes(world: int) -> str:
    """Every worker's node id, comma-joined, for the run summary."""
    import ray

    node_ids = [ray.get_runtime_context().get_node_id()]
    if world > 1:
        import torch.distributed as dist

        gathered: list = [None] * world
        dist.all_gather_object(gathered, node_ids[0])
        node_ids = gathered
    return ",".join(sorted(set(node_ids)))


def save_checkpoint(loop_config: dict, storage: StorageOptions, history: list[dict], report: dict, step_module,
                    optimizer, scheduler, scaler, spec, write_artifact) -> None:
    """Rank 0: the metric history, then a checkpoint (trainable weights, optimiser, step, config and
    the artifact users take away, written by `write_artifact(directory)`) reported to Ray Train."""
    import ray.train
    from ray.train import Checkpoint

    from talora.train.config import dump_run_spec

    write_bytes(join(loop_config["run_uri"], "metrics.jsonl"),
                "".join(json.dumps(h) + "\n" for h in history).encode(), storage)
    with tempfile.TemporaryDirectory() as d:
        write_weights(os.path.join(d, "trainable.safetensors"), step_module.state_dict())
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict()}, os.path.join(d, "optimizer.pt"))
        with open(os.path.join(d, "state.json"), "w") as f:
            json.dump({"step": report["step"], "metrics": report}, f)
        with open(os.path.join(d, "config.yaml"), "w") as f:
            f.write(dump_run_spec(spec))
        write_artifact(d)
        ray.train.report(report, checkpoint=Checkpoint.from_directory(d))


def say(line: str) -> None:
    """One progress line on the worker's stdout, shown once by the driver. Ray Train V2 patches
    `print` in workers to tee into its logger as well, and both copies reached the console."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def autocast(cfg, device: torch.device):
    """The training forward's autocast context: `cfg.amp_dtype` when `cfg.amp`, else a no-op."""
    return torch.autocast(device.type, dtype=getattr(torch, cfg.amp_dtype), enabled=cfg.amp)


def grad_scaler(cfg, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 AMP only: bf16 has fp32's exponent range, its gradients do not underflow."""
    return torch.amp.GradScaler(device.type, enabled=cfg.amp and cfg.amp_dtype == "float16")


def backward_and_step(loss, scaler, optimizer, parameters, grad_clip: float, before_step=None) -> bool:
    """Scaled backward, unscale, clip, step, update. Returns False when the step was skipped
    because a gradient held an inf or a NaN (the scaler then lowers its scale). Losses are fp32.

    A non-finite *loss* is an error, not a skipped step: the forward itself overflowed (under fp16
    AMP, an activation above 65504 becomes inf; measured on an H100 with a random base and lr 3e-3,
    the adapted encoder tail's MLP overflowed after 10 steps). The scaler guards only gradients;
    skipping would leave the weights as they are and every later step would overflow the same way."""
    if not torch.isfinite(loss.detach()):
        raise FloatingPointError(
            f"the training loss is {float(loss.detach()):.4g}: the forward pass overflowed. Under fp16 AMP activations "
            "above 65504 become inf; use train.amp_dtype: bfloat16 (A100/H100), train.amp: false, or a lower "
            "train.lr")
    parameters = list(parameters)
    scaler.scale(loss).backward()
    if before_step is not None:
        before_step()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)  # skipped when the unscaled gradients hold an inf or a NaN
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return scale is None or scaler.get_scale() >= scale


def _write_artifact(directory: str, model, source, spec) -> None:
    """The file users take away: a hypernet file (`--hypernet`) or a static adapter file (`--adapter`)."""
    if spec.train.mode == "hypernet":
        model.save_hypernet(os.path.join(directory, "hypernet.safetensors"))
        return
    from talora.adapter_file import AdapterHeader, save_adapter

    header = AdapterHeader(spec.model.sam.sam_type, spec.model.lora.rank, spec.model.lora.alpha,
                           spec.train.task or "all objects", "static",
                           [{"name": t.name, "in_features": t.in_features, "out_features": t.out_features}
                            for t in model.targets])
    save_adapter(os.path.join(directory, "adapter.safetensors"), source(), header)


def _read_history(run_uri: str, storage: StorageOptions, upto: int) -> list[dict]:
    try:
        lines = read_bytes(join(run_uri, "metrics.jsonl"), storage).decode().splitlines()
    except FileNotFoundError:
        return []
    return [h for h in map(json.loads, lines) if h["step"] <= upto]


def _cache_batches(shard, batch_images: int, device: torch.device):
    """Endless (image ids, trunk (B, h, w, C), input sizes) from this worker's cache shard."""
    while True:
        for b in shard.iter_batches(batch_size=batch_images, local_shuffle_buffer_size=4 * batch_images,
                                    batch_format="numpy"):
            feats = [np.frombuffer(f, dtype=np.float16).reshape(s) for f, s in zip(b["features"], b["shape"])]
            trunk = torch.from_numpy(np.stack(feats).astype(np.float32)).to(device)
            sizes = list(zip(b["input_height"].tolist(), b["input_width"].tolist()))
            yield [int(i) for i in b["image_id"]], trunk, sizes
