"""The labelling job: every image of a bucket, K prompts, COCO predictions as Parquet shards.

Where the time goes (per image, K prompts): one trunk pass (most of the encoder, shared by all
prompts), then per prompt the adapted tail + one semantic decoder row + the instance grid
(points_per_side^2 rows, only those inside the task's dilated region; with --boxes, one row per
box instead). Adapters are made once per prompt when an actor starts, or loaded from the adapter
cache where an earlier job made them. Image decoding and resizing to the model's input frame run
in a separate CPU stage (Ray Data tasks), so actors only run the model; the remote model files
are copied once per node. Batches are small (default 4 images): the trunk runs on the batch at
once, and an image's instance pass already fills a decoder batch of points_per_batch rows.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import ray
import torch
import yaml

from talora.backbones.frames import decode_stage, error_message
from talora.backbones.variants import family_of, get_variant
from talora.batch.commit import RunOutput, run_key
from talora.batch.pipeline import ActorLayout, ShardWriter, run_sharded
from talora.batch.parts import DEFAULT_PART_FORMAT, part_format
from talora.batch.rows import SCHEMA, detection_rows, error_row, write_summary
from talora.batch.shards import ShardPlan, plan_shards
from talora.core.text import validate_prompts
from talora.data.coco import CocoDataset
from talora.data.synthetic import ensure_demo_dataset
from talora.io.storage import (StorageOptions, absolute, file_identity, join, protocol_of, read_bytes, require_kept,
                               require_shared)
from talora.io.weights import read_weights
from talora.label.boxes import BoxIndex, read_boxes
from talora.model.files import AdapterCache
from talora.model.loading import ModelSpec, check_checkpoint, load_model
from talora.predict.predictor import PredictConfig, TaskAwarePredictor

# The embedded default bucket: `jobs/segment_dataset.py --prompt ...` with no --images labels its
# validation split (generated here on first use).
DEMO_DATA = "data/demo"


@dataclass(frozen=True)
class LabelConfig:
    prompts: tuple[str, ...]
    images: str
    output: str
    model: ModelSpec = field(default_factory=ModelSpec)
    predict: PredictConfig = field(default_factory=PredictConfig)
    task: str | None = None
    annotations: str | None = None  # optional COCO JSON: image ids by file name
    shard_size: int = 1000
    max_images: int | None = None
    max_shards: int | None = None
    max_pixels: int = 100_000_000
    batch_size: int = 4
    adapter_cache: str | None = None  # generated adapters by (hypernet, prompt); None: OUTPUT/_adapters, "": none
    boxes: str | None = None  # a detector's boxes (talora.label.boxes): the instances are their masks
    part_format: str = DEFAULT_PART_FORMAT  # a name of talora.batch.parts.PART_FORMATS
    layout: ActorLayout = field(default_factory=ActorLayout)  # unset fields: chosen from the cluster
    storage: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self) -> None:
        for name in ("batch_size", "shard_size", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        part_format(self.part_format)


def run_identity(config: LabelConfig, prompts: list[str], model: str) -> dict:
    """Everything a run's rows depend on (its key hashes it): a rerun with the same identity
    resumes the run, any change starts another."""
    return {
        "prompts": prompts, "task": config.task, "predict": config.predict.__dict__, "model": model,
        "files": {k: file_identity(v, config.storage) for k, v in config.model.files().items()},
        "max_pixels": config.max_pixels, "part_format": config.part_format,
        **({"boxes": file_identity(config.boxes, config.storage)} if config.boxes else {}),
    }


def parse_prompt_thresholds(values: list[str], prompts: list[str]) -> tuple[tuple[str, float], ...]:
    """--prompt-thresh values ("segment cars=0.7") -> ((prompt, threshold), ...), each prompt one of `prompts`."""
    found = []
    for value in values:
        prompt, sep, thresh = value.rpartition("=")
        if not sep or not prompt.strip():
            raise ValueError(f"--prompt-thresh {value!r}: expected PROMPT=THRESHOLD, e.g. \"segment cars=0.7\"")
        try:
            number = float(thresh)
        except ValueError:
            raise ValueError(f"--prompt-thresh {value!r}: {thresh!r} is not a number") from None
        if prompt.strip() not in prompts:
            raise ValueError(f"--prompt-thresh {value!r}: {prompt.strip()!r} is not one of the prompts {prompts}")
        found.append((prompt.strip(), number))
    return tuple(found)


def read_prompts_file(uri: str, storage: StorageOptions | None = None) -> tuple[list[str], tuple[tuple[str, float], ...]]:
    """A YAML list of prompts, each a string or {prompt: ..., presence_thresh: ...} -> (prompts,
    per-prompt thresholds); a bad entry is an error naming the file and the entry."""
    entries = yaml.safe_load(read_bytes(uri, storage))
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"--prompts-file {uri}: expected a non-empty YAML list of prompts")
    prompts, thresholds = [], []
    for n, entry in enumerate(entries):
        if isinstance(entry, str):
            prompts.append(entry)
            continue
        if not isinstance(entry, dict) or "prompt" not in entry or set(entry) - {"prompt", "presence_thresh"}:
            raise ValueError(f"--prompts-file {uri}: entry {n} ({entry!r}) must be a string or "
                             "{prompt: ..., presence_thresh: ...}")
        prompts.append(str(entry["prompt"]))
        if "presence_thresh" in entry:
            thresholds.append((str(entry["prompt"]), float(entry["presence_thresh"])))
    return prompts, tuple(thresholds)


def demo_bucket(root: str = DEMO_DATA) -> tuple[str, str]:
    """(images prefix, annotations) of the demo bucket's validation split, written on first use."""
    annotations = os.path.join(root, "val", "instances.json")
    ensure_demo_dataset(annotations)
    return os.path.join(root, "val", "images"), annotations


def model_name(spec: ModelSpec, storage: StorageOptions) -> str:
    """The `model` column: variant + the digest of what was given."""
    if spec.hypernet:
        return f"{spec.sam_type}+hypernet:{read_weights(spec.hypernet, storage)[1].get('digest', '?')}"
    if spec.adapter:
        return f"{spec.sam_type}+adapter:{run_key(file_identity(spec.adapter, storage))}"
    return f"{spec.sam_type}+untrained"


class LabelActor(ShardWriter):
    """Ray Data actor: one frozen SAM + text encoder + hypernet, adapters made once per prompt."""

    def __init__(self, spec: ModelSpec, prompts: list[str], predict: PredictConfig, task: str | None, model: str,
                 run: RunOutput, storage: StorageOptions, adapter_cache: str = "", boxes: BoxIndex | None = None,
                 threads: int | None = None) -> None:
        super().__init__(run, SCHEMA, threads)
        self.torch = torch
        sam_model = load_model(spec, storage)
        if torch.cuda.is_available():
            sam_model = sam_model.cuda()
        self.predictor = TaskAwarePredictor(sam_model, predict)
        self.prompts, self.task, self.model_name = list(prompts), task, model
        self.boxes = boxes
        with torch.no_grad():
            found: dict | str = "fixed" if sam_model.fixed_adapter is not None else "generated"
            if adapter_cache and sam_model.fixed_adapter is None:  # loaded where an earlier job made them
                found = AdapterCache(adapter_cache, storage).fill(sam_model, self.prompts)
            sam_model.adapters(self.prompts)  # generate (and keep) every prompt's adapter once
        # Where the pool's actors are, for whoever reads the job's log (and the multinode test).
        print(f"label actor on node {ray.get_runtime_context().get_node_id()}: adapters {found}"
              f"{f' ({adapter_cache})' if adapter_cache else ''}", flush=True)

    def process(self, batch: dict) -> list[tuple[list[dict], str]]:
        frames = [(np.asarray(resized), (int(h), int(w)))  # (resized image, original size) per item
                  for resized, h, w in zip(batch["resized"], batch["height"], batch["width"])]
        decoded = [i for i, error in enumerate(batch["error"]) if not error]
        boxes = ([self.boxes.of(uri, int(image_id)) for uri, image_id in zip(batch["uri"], batch["image_id"])]
                 if self.boxes is not None else [None] * len(frames))  # with --boxes, an image's boxes ([]: none)
        found: dict[int, dict | Exception] = {}
        try:  # the batch's trunk in one pass
            found.update(zip(decoded, self.predictor.predict_batch([frames[i] for i in decoded], self.prompts,
                                                                   [boxes[i] for i in decoded])))
        except Exception:  # find the image that failed: one at a time
            for i in decoded:
                try:
                    found[i] = self.predictor.predict_resized(*frames[i], self.prompts, boxes[i])
                except Exception as e:  # one bad image is one error row; the job goes on
                    found[i] = e
        results = []
        for i, (uri, image_id, shard, error) in enumerate(zip(batch["uri"], batch["image_id"], batch["shard"],
                                                             batch["error"])):
            image_id, (h, w) = int(image_id), frames[i][1]
            predictions = found.get(i, ValueError(error))
            if isinstance(predictions, Exception):
                message = error or error_message(uri, predictions)
                results.append(([error_row(uri, image_id, shard, message, self.model_name)], message))
            else:
                results.append((detection_rows(uri, image_id, shard, w, h, predictions, self.task, self.model_name), ""))
        return results


def plan(config: LabelConfig) -> tuple[list[ShardPlan], dict[str, int] | None]:
    """(the bucket's shards, COCO image ids by URI from --annotations or None); lists shard
    folders only (talora.batch.shards), and fails on a missing prefix or one without images."""
    plans = plan_shards(config.images, config.shard_size, config.storage, config.max_shards, config.max_images)
    if not plans:
        raise ValueError(f"no images under {config.images}")
    if not config.annotations:
        return plans, None
    # Keyed as the listing names images (local paths absolute), so a relative --images still maps.
    dataset = CocoDataset.load(config.annotations, absolute(config.images), config.storage)
    return plans, {r.uri: r.id for r in dataset.images.values()}


class BoxesSeen:
    """The driver's tally of --boxes: which boxed images this run labelled, so the boxes of the
    images it did not (not listed, or in a shard committed before) are reported, not dropped."""

    def __init__(self, boxes: BoxIndex | None) -> None:
        self.boxes, self.uris, self.ids = boxes, set(), set()

    def see(self, row: dict) -> None:
        if row["item"] in self.boxes.by_uri:
            self.uris.add(row["item"])
        elif int(row["image_id"]) in self.boxes.by_id:
            self.ids.add(int(row["image_id"]))

    def summary(self) -> dict:
        unmatched = self.boxes.unmatched(self.uris, self.ids)
        if unmatched:
            print(f"label: {len(unmatched)} image(s) of --boxes {self.boxes.source} were not labelled by this run "
                  f"(not listed, or in a shard committed before), e.g. {unmatched[:3]}", flush=True)
        return {"source": self.boxes.source, "boxes": self.boxes.total, "images_labelled": len(self.uris) + len(self.ids),
                "images_not_labelled": len(unmatched), "not_labelled_examples": unmatched[:20]}


def run_label_job(config: LabelConfig) -> dict:
    """Checks everything cheap first, then labels every uncommitted shard; returns the summary."""
    prompts = validate_prompts(list(config.prompts))
    require_shared(config.output, "--output")
    require_kept(config.output, "--output")
    require_shared(config.images, "--images")
    if len(ray.nodes()) > 1:
        for name, uri in (("--images", config.images), ("--output", config.output)):
            if protocol_of(uri) == "file":
                raise ValueError(f"{name} {uri} is a local folder, but this Ray cluster has {len(ray.nodes())} "
                                 "nodes that cannot all read it: use shared storage such as s3://")
    spec = config.model
    if spec.hypernet and spec.adapter:
        raise ValueError("give --hypernet or --adapter, not both")
    if config.boxes and family_of(spec.sam_type).detector:
        raise ValueError(f"--boxes: --sam-type {spec.sam_type} is a detector that finds every instance of a prompt "
                         "itself and takes no box prompts; use a SAM 1 or SAM 2.1 variant for boxes")
    for uri in spec.files().values():
        file_identity(uri, config.storage)  # missing model files fail here, before the pool starts
    if spec.sam_checkpoint:
        check_checkpoint(spec.sam_checkpoint, spec.sam_type, config.storage)
    model = model_name(spec, config.storage)
    boxes = read_boxes(config.boxes, prompts, config.storage) if config.boxes else None  # a bad box fails here
    layout = config.layout.on_cluster(get_variant(spec.sam_type).cpu_preset)  # a share no node has fails here
    planned = time.perf_counter()
    plans, image_ids = plan(config)
    planning = {"shards": len(plans), "seconds": round(time.perf_counter() - planned, 3)}

    key = run_key(run_identity(config, prompts, model))
    run = RunOutput(config.output, key, config.storage, part_format(config.part_format))
    boxed = BoxesSeen(boxes)
    counts = run_sharded(
        plans, run, LabelActor,
        {"spec": spec, "prompts": prompts, "predict": config.predict, "task": config.task, "model": model,
         "run": run, "storage": config.storage,
         "adapter_cache": join(config.output, "_adapters") if config.adapter_cache is None else config.adapter_cache,
         "boxes": boxes},
        config.storage, config.batch_size, layout, image_ids,
        cpu_stage=decode_stage, cpu_stage_kwargs={"max_pixels": config.max_pixels, "sam_type": spec.sam_type},
        log=lambda m: print(f"label: {m}", flush=True),
        watch=boxed.see if boxes is not None else None,
    )
    summary = {
        "job": "segment_dataset",
        "output": run.root,
        "run_key": key,
        "prompts": prompts,
        "model": model,
        "planning": planning,
        **counts,
        **({"boxes": boxed.summary()} if boxes is not None else {}),
        "config": {**{k: v for k, v in config.__dict__.items() if k not in ("storage", "model", "predict", "layout")},
                   "model": spec.__dict__, "predict": config.predict.__dict__, "layout": layout.__dict__,
                   "storage": config.storage.public_dict()},
        "node_ids": sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive")),
    }
    write_summary(run.root, summary, config.storage)
    return summary
