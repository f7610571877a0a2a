"""The per-worker training loop (Ray Train V2): one loop for every mode, the same for one CPU
worker, one T4 or N GPUs. The mode (talora.train.modes) supplies the model, each step's losses,
validation and the artifact; checkpoints and resume live in talora.train.checkpoint, the
optimiser, schedule and AMP in talora.train.optim.

Synchronisation: `ray.train.report` is a barrier in V2, so every worker reports at the same
steps (validation steps only); rank 0 attaches the checkpoint. Validation is sharded across
workers and all-reduced. DDP wraps the mode's module (trainable modules only). Every step's
randomness comes from a generator seeded by (seed, rank, step), so a resumed run draws the
batches an uninterrupted one would have.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from talora.io.storage import StorageOptions
from talora.train.checkpoint import resume, save_checkpoint, say
from talora.train.collapse import CollapseWatch
from talora.train.config import dump_run_spec, load_run_spec
from talora.train.modes import MODES
from talora.train.optim import amp_note, autocast, backward_and_step, build_optimizer, grad_scaler, lr_scheduler


def train_loop_per_worker(loop_config: dict) -> None:
    spec, storage, rank, world, device = worker_setup(loop_config)
    cfg, run_uri = spec.train, loop_config["run_uri"]
    mode = MODES[cfg.mode](spec, storage, rank, world, device)
    module = mode.module
    trainable = ray.train.torch.prepare_model(module) if world > 1 else module
    optimizer = build_optimizer(module.parameters(), cfg, world)
    scheduler = lr_scheduler(optimizer, cfg)
    scaler = grad_scaler(cfg, device)
    note = amp_note(cfg, device)
    if rank == 0 and note:
        say(note)
    collapse = CollapseWatch(cfg.log_every, cfg.warmup_steps, cfg.lr)

    start_step, history = resume(run_uri, storage, module, optimizer, scheduler, scaler, device, rank)
    worker_nodes = gather_worker_nodes(world)
    fail_at = loop_config.get("fail_at_step", 0)  # test hook: fail once, right after that step's checkpoint
    started, samples, memo_full_said = time.perf_counter(), 0, False
    step_seconds: list[float] = []  # this launch's steps, batch to optimiser step (validation excluded)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(start_step, cfg.max_steps):
        step_started = time.perf_counter()
        batch = mode.batch(step, np.random.default_rng([cfg.seed, rank, step]))
        with autocast(cfg, device):
            losses = mode.loss(trainable, batch)
        held = mode.held_parameters(step)
        backward_and_step(losses["loss"], scaler, optimizer, module.parameters(), cfg.grad_clip,
                          before_step=(lambda: drop_gradients(held)) if held else None)
        scheduler.step()
        samples += mode.samples(batch) * world

        done = step + 1
        metrics = {"step": done, **{k: float(v.detach()) for k, v in losses.items()}, "lr": scheduler.get_last_lr()[0],
                   "start_step": start_step, "worker_nodes": worker_nodes}
        step_seconds.append(time.perf_counter() - step_started)  # the float() of each loss above waited for the device
        for line in collapse.update(done, metrics):
            if rank == 0:
                say(f"{mode.name}: {line}")
        if rank == 0 and (done % cfg.log_every == 0 or done == cfg.max_steps):
            elapsed = time.perf_counter() - started
            parts = " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith(("loss_", "iou_")))
            say(f"{mode.name}: step {done}/{cfg.max_steps} loss {metrics['loss']:.4f} {parts} "
                f"{samples / elapsed:.1f} samples/s eta {(cfg.max_steps - done) * elapsed / (done - start_step):.0f}s")
            if mode.memo.dropped and not memo_full_said:
                memo_full_said = True
                say(f"{mode.name}: {mode.memo_note()}")
        if rank == 0:
            history.append(metrics)

        if done % cfg.val_every == 0 or done == cfg.max_steps:
            module.eval()
            val = mode.validate()
            module.train()
            report = {**metrics, **val, **step_timing(step_seconds, device)}
            if rank == 0:
                history[-1] = report
                say(f"{mode.name}: validation " + " ".join(f"{k} {v:.4f}" for k, v in val.items()))
                save_checkpoint(run_uri, storage, history, report, module, optimizer, scheduler, scaler,
                                dump_run_spec(spec), mode.write_artifact)
            else:
                ray.train.report(report)
            if fail_at and done == fail_at and start_step == 0 and rank == 0:
                raise RuntimeError(f"injected failure after step {done} (TALORA_FAIL_AT_STEP)")


def step_timing(step_seconds: list[float], device: torch.device) -> dict[str, float]:
    """The median step of this launch (robust to the first steps' warm-up) and, on CUDA, the
    worker's peak allocated GPU memory so far."""
    timing = {"step_s_median": statistics.median(step_seconds)}
    if device.type == "cuda":
        timing["gpu_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return timing


def drop_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """No update for these this step (AdamW skips a parameter whose gradient is None: no decay either)."""
    for p in parameters:
        p.grad = None


def worker_setup(loop_config: dict):
    """(spec, storage, rank, world size, device) of this worker; threads and seed set."""
    spec = load_run_spec(loop_config["spec"])
    context = ray.train.get_context()
    torch.set_num_threads(max(1, int(spec.train.cpus_per_worker)))
    torch.manual_seed(spec.train.seed)  # identical trainable init on every worker (DDP broadcasts anyway)
    return (spec, StorageOptions(**loop_config["storage"]), context.get_world_rank(), context.get_world_size(),
            ray.train.torch.get_device())


def gather_worker_nodes(world: int) -> str:
    """Every worker's node id, comma-joined, for the run summary."""
    node_ids = [ray.get_runtime_context().get_node_id()]
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, node_ids[0])
        node_ids = gathered
    return ",".join(sorted(set(node_ids)))
