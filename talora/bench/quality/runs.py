"""The quality suite's data and training runs: the demo annotations, run specs, the hypernet it trains
and the oracle tasks it draws (a finished run of the same config is reused)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random

from talora.bench.quality.config import DEMO_MODELS_DATA, KINDS, QualityConfig
from talora.config import ModelConfig, from_dict, to_dict
from talora.data.synthetic import ensure_demo_dataset
from talora.io.storage import StorageOptions, join, read_bytes
from talora.train.checkpoint import SUMMARY, run_checkpoint
from talora.train.config import dump_run_spec, load_run_spec
from talora.train.trainer import run_training


def demo_annotations(root: str = DEMO_MODELS_DATA) -> tuple[str, str]:
    """(train, val) annotations of the demo models' data (3000 + 100 images, seed 0), written on first use."""
    train, val = (os.path.join(root, split, "instances.json") for split in ("train", "val"))
    ensure_demo_dataset(val)
    return train, val


def train_run(spec, name: str, workdir: str, storage: StorageOptions) -> str:
    """Trains `spec` under `workdir`/`name`-<digest of the spec> (Ray Train) and returns the run URI.
    A finished run of the same spec is reused: training is the expensive part of a rerun."""
    digest = hashlib.sha256(dump_run_spec(spec).encode()).hexdigest()[:10]
    name = f"{name}-{digest}"
    run = join(workdir, name)
    try:
        read_bytes(join(run, SUMMARY), storage)
        return run
    except FileNotFoundError:
        pass
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, storage_path=workdir, name=name))
    run_training(spec, storage)
    return run


def run_spec(config: QualityConfig, train: str, val: str, model=None, **train_fields):
    """The preset's spec for one training run: these annotations, `model` (default: the preset's, on
    the base), one validation at the last step, and `train_fields`."""
    spec = load_run_spec(config.preset)
    if model is None and config.sam_checkpoint:
        model = dataclasses.replace(spec.model, sam=dataclasses.replace(spec.model.sam, checkpoint=config.sam_checkpoint))
    steps = train_fields.pop("max_steps")
    trained = dataclasses.replace(spec.train, train_annotations=train, val_annotations=val, max_steps=steps,
                                  val_every=steps, val_images=config.val_images, warmup_steps=min(
                                      spec.train.warmup_steps, max(1, steps // 10)), **train_fields)
    return dataclasses.replace(spec, model=model or spec.model, train=trained)


def trained_hypernet(config: QualityConfig, train: str, val: str, steps: int, name: str = "hypernet", **model_fields):
    """The hypernet file of a hypernet run of `steps` steps (model overrides: {section: {field: value}})."""
    spec = run_spec(config, train, val, max_steps=steps, mode="hypernet")
    if model_fields:
        data = to_dict(spec.model)
        for section, values in model_fields.items():
            data[section] = {**data[section], **values}
        spec = dataclasses.replace(spec, model=from_dict(ModelConfig, data, "model."))
    run = train_run(spec, name, config.workdir, config.storage)
    return join(run_checkpoint(run, "latest", config.storage), "hypernet.safetensors")


def draw_oracle_tasks(tasks, count: int, present: set[str], seed: int) -> list[str]:
    """`count` task ids drawn (seeded) across KINDS in turn, among trained tasks present in the scored images."""
    rng = random.Random(seed)
    pools = {kind: sorted(t.id for t in tasks if t.kind == kind and not t.heldout and t.id in present) for kind in KINDS}
    for pool in pools.values():
        rng.shuffle(pool)
    drawn: list[str] = []
    while len(drawn) < count and any(pools.values()):
        for kind in KINDS:
            if pools[kind] and len(drawn) < count:
                drawn.append(pools[kind].pop())
    return drawn
