"""The embedding cache: frozen trunk features of every image, written through the commit protocol.

Where the time goes: the trunk (patch embedding + every encoder block but the adapted tail) is
nearly all of SAM's cost and depends only on the image, so it runs here once per image and
training streams its output instead of re-encoding every step. Reading and decoding are cheap
CPU work in Ray Data tasks; the encoder runs in an actor pool where each actor loads the model
once. Batches are small (`batch_size`, default 8): one vit_h trunk output is 64x64x1280 fp16 =
10 MB, and each actor writes its own part files so features never pass through the driver.

What is cached: the input of the adapted encoder tail (B x h x w x C, fp16), or the final image
embedding when the config adapts the decoder only (k = 0). The run key digests the trunk's
weights and the split, so a cache made by another encoder or split is never mistaken for this
one; `check_cache_key` refuses a mismatch.

Rows (one per image): image_uri, image_id, shard, height, width (original, after EXIF),
input_height, input_width (resized, before padding), features (fp16 bytes), shape, kind.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray
import torch

from talora.backbones.frames import error_message
from talora.backbones.variants import DEFAULT_VARIANT, get_variant
from talora.batch.commit import RunOutput, run_key
from talora.batch.pipeline import ActorLayout, ShardWriter, run_sharded
from talora.batch.parts import DEFAULT_PART_FORMAT, part_format
from talora.batch.rows import open_run, write_summary
from talora.batch.shards import ShardPlan, plan_shards
from talora.data.coco import CocoDataset
from talora.io.images import decode_image
from talora.io.storage import (StorageOptions, join, local_copy, pyarrow_filesystem, read_bytes, require_kept,
                               require_shared, write_bytes)
from talora.model.loading import load_backbone

CACHE_FORMAT = "talora.embedding-cache/1"


@dataclass(frozen=True)
class EmbedConfig:
    output: str  # URI prefix; the run writes under OUTPUT/<run_key>/
    images: str | None = None  # prefix of images (sub-folders = shards), or
    annotations: str | None = None  # a COCO instances JSON (images beside it, or under image_root)
    image_root: str | None = None
    sam_type: str = DEFAULT_VARIANT
    sam_checkpoint: str | None = None
    tail_blocks: int | None = None  # None = the variant's default; 0 = cache final embeddings
    shard_size: int = 1000
    batch_size: int = 8
    layout: ActorLayout = field(default_factory=ActorLayout)  # unset fields: chosen from the cluster
    max_images: int | None = None
    part_format: str = DEFAULT_PART_FORMAT  # a name of talora.batch.parts.PART_FORMATS
    storage: StorageOptions = field(default_factory=StorageOptions)


def plan(config: EmbedConfig) -> tuple[list[ShardPlan], dict[str, int] | None]:
    """(the shards to encode, COCO image ids by URI or None) in a stable order. A prefix is planned
    by shard folder (talora.batch.shards: tasks list the images); a COCO JSON is already a full list, so
    its images are grouped into shards here (by first folder of file_name, else virtual shards)."""
    if config.annotations:
        dataset = CocoDataset.load(config.annotations, config.image_root, config.storage)
        records = [dataset.images[i] for i in dataset.image_ids][: config.max_images]
        by_shard: dict[str, list[str]] = {}
        for n, r in enumerate(records):
            shard = r.file_name.split("/", 1)[0] if "/" in r.file_name else f"virtual-{n // config.shard_size:05d}"
            by_shard.setdefault(shard, []).append(r.uri)
        plans = [ShardPlan(shard, "", tuple(uris)) for shard, uris in by_shard.items()]
        image_ids = {r.uri: r.id for r in records}
    elif config.images:
        plans = plan_shards(config.images, config.shard_size, config.storage, max_images=config.max_images)
        image_ids = None
    else:
        raise ValueError("give --images (a prefix) or --annotations (a COCO JSON)")
    if not plans:
        raise ValueError(f"no images found under {config.images or config.annotations}")
    return plans, image_ids


class TrunkEncoder(ShardWriter):
    """Ray Data actor: one frozen SAM encoder; a batch of image bytes in, one cache row per image."""

    def __init__(self, sam_type: str, sam_checkpoint: str | None, tail_blocks: int, run: RunOutput,
                 storage: StorageOptions, threads: int | None = None) -> None:
        super().__init__(run, threads=threads)
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        checkpoint = local_copy(sam_checkpoint, storage) if sam_checkpoint else None
        self.backbone = load_backbone(sam_type, checkpoint, storage)
        self.backbone.model.to(self.device)
        self.tail_blocks = tail_blocks

    def process(self, batch: dict) -> list[tuple[list[dict], str]]:
        torch, backbone = self.torch, self.backbone
        results: list[tuple[list[dict], str]] = []
        inputs, rows = [], []
        for uri, image_id, shard, index, data, error in zip(batch["uri"], batch["image_id"], batch["shard"],
                                                            batch["index"], batch["bytes"], batch["error"]):
            try:
                if error:
                    raise OSError(error)
                image = decode_image(data)
                x, input_size = backbone.preprocess(image)
            except Exception as e:  # a bad image is an error entry, never a crash
                results.append(([], error or error_message(uri, e)))
                continue
            row = {"image_uri": uri, "image_id": int(image_id), "shard": shard, "index": int(index),
                   "height": image.shape[0], "width": image.shape[1], "input_height": input_size[0],
                   "input_width": input_size[1]}
            inputs.append(x)
            rows.append(row)
            results.append(([row], ""))
        if inputs:
            with torch.no_grad(), torch.autocast(self.device, torch.float16, enabled=self.device == "cuda"):
                features = backbone.embed_trunk(torch.stack(inputs), self.tail_blocks)
                if self.tail_blocks == 0:  # decoder-only configs cache the final embedding
                    features = backbone.embed_tail(features, 0)
            features = features.to(torch.float16).cpu().numpy()
            kind = "embedding" if self.tail_blocks == 0 else "trunk"
            for row, f in zip(rows, features):
                row.update(features=f.tobytes(), shape=list(f.shape), kind=kind)
        return results


def cache_key_inputs(sam_type: str, digest: str, tail_blocks: int, img_size: int) -> dict:
    return {"format": CACHE_FORMAT, "sam_type": sam_type, "trunk_digest": digest, "tail_blocks": tail_blocks,
            "img_size": img_size}


def check_cache_key(cache_uri: str, expected: dict, storage: StorageOptions | None = None) -> None:
    """Refuses a cache written by another encoder or split (training calls this first)."""
    found = json.loads(read_bytes(join(cache_uri, "_cache.json"), storage))
    diff = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
    if diff:
        details = ", ".join(f"{k}: cache has {a!r}, model has {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"embedding cache {cache_uri} does not match this model ({details})")


def run_embed_job(config: EmbedConfig) -> dict:
    """Encodes every uncommitted shard; returns (and writes) the run summary."""
    require_shared(config.output, "--output")
    require_kept(config.output, "--output")
    for uri in (config.images, config.annotations):
        if uri:
            require_shared(uri)
    tail = get_variant(config.sam_type).tail_blocks if config.tail_blocks is None else config.tail_blocks
    layout = config.layout.on_cluster(get_variant(config.sam_type).cpu_preset)  # a share no node has fails here
    planned = time.perf_counter()
    plans, image_ids = plan(config)  # fails early on a bad prefix or JSON
    planning = {"shards": len(plans), "seconds": round(time.perf_counter() - planned, 3)}
    backbone = load_backbone(config.sam_type, config.sam_checkpoint, config.storage)  # fails early on a bad checkpoint
    key_inputs = cache_key_inputs(config.sam_type, backbone.trunk_digest(tail), tail, backbone.image_size)
    del backbone
    key = run_key({**key_inputs, "part_format": config.part_format})  # the cache's identity + how it is stored
    run = RunOutput(config.output, key, config.storage, part_format(config.part_format))
    write_bytes(join(run.root, "_cache.json"), json.dumps(key_inputs, indent=1).encode(), config.storage)

    counts = run_sharded(plans, run, TrunkEncoder,
                         {"sam_type": config.sam_type, "sam_checkpoint": config.sam_checkpoint, "tail_blocks": tail,
                          "run": run, "storage": config.storage},
                         config.storage, config.batch_size, layout, image_ids,
                         log=lambda m: print(f"embed: {m}", flush=True))
    summary = {
        "job": "embed_images",
        "output": run.root,
        "run_key": key,
        "cache": key_inputs,
        "planning": planning,
        **counts,
        "config": {**{k: v for k, v in config.__dict__.items() if k not in ("storage", "layout")},
                   "layout": layout.__dict__, "storage": config.storage.public_dict()},
        "torch": torch.__version__,
        "host": os.uname().nodename,
    }
    write_summary(run.root, summary, config.storage)
    return summary


def read_cache(cache_uri: str, storage: StorageOptions | None = None) -> pa.Table:
    """All committed cache rows (small caches and tests; training streams parts through Ray Data)."""
    table = open_run(cache_uri, storage).read_table()
    if table is None:
        raise ValueError(f"embedding cache {cache_uri} has no committed shard")
    return table


def cache_dataset(cache_uri: str, storage: StorageOptions | None = None):
    """The committed cache as a Ray Dataset (manifest-listed parts only), for training to stream
    with ``iter_batches(local_shuffle_buffer_size=...)`` or ``streaming_split``."""
    uris = open_run(cache_uri, storage).committed_part_uris()
    if not uris:
        raise ValueError(f"embedding cache {cache_uri} has no committed shard")
    fs, _ = pyarrow_filesystem(uris[0], storage)
    paths = [u.split("://", 1)[1] if "://" in u else u for u in uris]
    return ray.data.read_parquet(paths, filesystem=fs)


def features_of(row: dict) -> np.ndarray:
    return np.frombuffer(row["features"], dtype=np.float16).reshape(row["shape"])
