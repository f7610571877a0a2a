"""The driver side of training: checks, the Ray Train TorchTrainer, resume, the run summary.

Effective batch = num_workers x batch_images images (x tasks_per_image rows each); the learning
rate `train.lr` is for one worker's batch and is scaled linearly by num_workers.

Relaunching the same `name` + `storage_path` resumes from the last checkpoint (Ray Train V2
restores a run from its storage); the run's result-affecting config is stored beside it
(`talora_run.yaml`) and a relaunch with a different one is refused with a diff.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import yaml
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from talora.io.storage import (StorageOptions, absolute, join, protocol_of, pyarrow_filesystem, read_bytes,
                               require_shared, write_bytes)
from talora.model.loading import check_checkpoint, load_backbone
from talora.train.checkpoint import SUMMARY
from talora.train.config import RunSpec, dump_run_spec, result_affecting
from talora.train.embed import cache_dataset, cache_key_inputs, check_cache_key
from talora.train.loop import train_loop_per_worker

RUN_FILE = "talora_run.yaml"


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"  {prefix}{key}: {a!r} -> {b!r}")
    return lines


def check_resume_config(run_uri: str, spec: RunSpec, storage: StorageOptions) -> bool:
    """Writes the run's config on first launch; on relaunch refuses a changed one. True = relaunch."""
    current = result_affecting(spec)
    try:
        stored = yaml.safe_load(read_bytes(join(run_uri, RUN_FILE), storage))
    except FileNotFoundError:
        write_bytes(join(run_uri, RUN_FILE), yaml.safe_dump(current, sort_keys=True).encode(), storage)
        return False
    if stored != current:
        raise ValueError(f"run {run_uri} exists with another config; resuming it would mix two experiments. "
                         "Use a new --name, or the old config. Changes:\n" + "\n".join(_diff(stored, current)))
    return True


def run_training(spec: RunSpec, storage: StorageOptions | None = None) -> dict:
    storage = storage or StorageOptions()
    spec = dataclasses.replace(spec, train=dataclasses.replace(
        spec.train, **{k: absolute(getattr(spec.train, k)) for k in
                       ("train_annotations", "val_annotations", "train_image_root", "val_image_root", "embeddings",
                        "storage_path")}))
    if spec.model.sam.checkpoint:
        spec = dataclasses.replace(spec, model=dataclasses.replace(
            spec.model, sam=dataclasses.replace(spec.model.sam, checkpoint=absolute(spec.model.sam.checkpoint))))
    cfg = spec.train
    require_shared(cfg.storage_path, "--storage-path")
    for uri in (cfg.train_annotations, cfg.val_annotations):
        if uri:
            require_shared(uri)
            read_bytes(uri, storage)  # a missing file fails here, before any worker starts
    if spec.model.sam.checkpoint:
        require_shared(spec.model.sam.checkpoint, "--sam-checkpoint")
        check_checkpoint(spec.model.sam.checkpoint, spec.model.sam.sam_type, storage)  # another variant's base fails here
    run_uri = join(cfg.storage_path, cfg.name)
    resumed = check_resume_config(run_uri, spec, storage)

    datasets = {}
    if cfg.embeddings:
        backbone = load_backbone(spec.model.sam.sam_type, spec.model.sam.checkpoint, storage)
        tail = spec.model.tail_blocks
        check_cache_key(cfg.embeddings, cache_key_inputs(spec.model.sam.sam_type, backbone.trunk_digest(tail), tail,
                                                         backbone.image_size), storage)
        del backbone
        datasets["train"] = cache_dataset(cfg.embeddings, storage)

    if protocol_of(cfg.storage_path) == "file":
        path, fs = cfg.storage_path, None
    else:
        fs, path = pyarrow_filesystem(cfg.storage_path, storage)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": dump_run_spec(spec), "storage": storage.public_dict(), "run_uri": run_uri,
                           # test hook, outside the run's config: fail once after this step's checkpoint
                           "fail_at_step": int(os.environ.get("TALORA_FAIL_AT_STEP", "0") or 0)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep, checkpoint_score_attribute="val_score",
                                               checkpoint_score_order="max"),
        ),
        datasets=datasets or None,
    )
    print(f"train: {cfg.mode} on {cfg.num_workers} worker(s), {cfg.max_steps} steps -> {run_uri}"
          f"{' (relaunch: resuming)' if resumed else ''}", flush=True)
    start = time.perf_counter()
    result = trainer.fit()
    # best_checkpoints comes in report order, not ranked: rank by the score checkpoints are kept by
    scored = [(c, m) for c, m in result.best_checkpoints or [] if "val_score" in m]
    best = max(scored, key=lambda cm: cm[1]["val_score"])[0] if scored else None
    summary = {
        "job": "train_hypernet",
        "run": run_uri,
        "mode": cfg.mode,
        "adapter_type": spec.model.hypernet.adapter_type,
        "relaunch": resumed,
        "seconds": round(time.perf_counter() - start, 3),
        "final_metrics": result.metrics,
        "latest_checkpoint": result.checkpoint.path if result.checkpoint else None,
        "best_checkpoint": best.path if best else None,
        "config": yaml.safe_load(dump_run_spec(spec)),
        "storage": storage.public_dict(),
    }
    write_bytes(join(run_uri, SUMMARY), json.dumps(summary, indent=1, default=str).encode(), storage)
    return summary
