"""Training checkpoints: what one holds, writing it (rank 0), resuming from it, and finding a run's.

A checkpoint folder (reported to Ray Train, kept under ``<storage_path>/<name>/``) holds the
trainable weights, the optimiser/scheduler/scaler state, the step and its metrics, the resolved
config, and the artifact users take away (a hypernet, an adapter, or a pretrained base). Beside
them, the run folder holds ``metrics.jsonl`` (every step so far) and, once the driver returns,
``summary.json`` naming the latest and the best checkpoint: `run_checkpoint` reads it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import ray.train
import torch
from ray.train import Checkpoint

from talora.io.storage import StorageOptions, join, read_bytes, write_bytes
from talora.io.weights import read_weights, write_weights

CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.pt", "state.json", "config.yaml")
SUMMARY = "summary.json"


def say(line: str) -> None:
    """One progress line on the worker's stdout, shown once by the driver (Ray Train V2 patches
    `print` in workers to tee into its logger as well, so a print would reach the console twice)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def resume(run_uri: str, storage: StorageOptions, step_module, optimizer, scheduler, scaler, device,
           rank: int) -> tuple[int, list[dict]]:
    """(start step, metric history up to it) from Ray Train's checkpoint of this run, if any."""
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
    history = read_history(run_uri, storage, start_step)
    if rank == 0:
        say(f"train: resumed from step {start_step}")
    return start_step, history


def save_checkpoint(run_uri: str, storage: StorageOptions, history: list[dict], report: dict, step_module,
                    optimizer, scheduler, scaler, spec_yaml: str, write_artifact) -> None:
    """Rank 0: the metric history, then a checkpoint (trainable weights, optimiser, step, config and
    the artifact users take away, written by `write_artifact(directory)`) reported to Ray Train."""
    write_bytes(join(run_uri, "metrics.jsonl"), "".join(json.dumps(h) + "\n" for h in history).encode(), storage)
    with tempfile.TemporaryDirectory() as d:
        write_weights(os.path.join(d, "trainable.safetensors"), step_module.state_dict())
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict()}, os.path.join(d, "optimizer.pt"))
        with open(os.path.join(d, "state.json"), "w") as f:
            json.dump({"step": report["step"], "metrics": report}, f)
        with open(os.path.join(d, "config.yaml"), "w") as f:
            f.write(spec_yaml)
        write_artifact(d)
        ray.train.report(report, checkpoint=Checkpoint.from_directory(d))


def read_history(run_uri: str, storage: StorageOptions | None, upto: int | None = None) -> list[dict]:
    """The run's metrics.jsonl rows (up to step `upto`), [] if it has none yet."""
    try:
        lines = read_bytes(join(run_uri, "metrics.jsonl"), storage).decode().splitlines()
    except FileNotFoundError:
        return []
    return [h for h in map(json.loads, lines) if upto is None or h["step"] <= upto]


def run_checkpoint(run_uri: str, which: str = "latest", storage: StorageOptions | None = None) -> str:
    """The URI of a finished run's latest or best checkpoint folder, from its summary.json."""
    if which not in ("latest", "best"):
        raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
    try:
        summary = json.loads(read_bytes(join(run_uri, SUMMARY), storage))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{run_uri} has no {SUMMARY}: not a finished training run") from e
    found = summary.get(f"{which}_checkpoint")
    if not found:
        raise FileNotFoundError(f"training run {run_uri} recorded no {which} checkpoint")
    if "://" in run_uri and "://" not in found:  # Ray Train reports paths inside its filesystem
        found = run_uri.split("://", 1)[0] + "://" + found
    return found
