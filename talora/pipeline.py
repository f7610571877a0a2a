"""Sharded Ray Data jobs: the one pipeline the embedding cache and the labelling job share.

    items (uri, image_id, shard, index) -> skip committed shards -> read bytes (tasks, 0.25 CPU)
    -> [CPU stage] -> actor pool (one model per actor) -> each actor writes its rows as part
    files per shard -> small metadata rows to the driver -> ShardTracker commits each shard.

Heavy outputs (features, masks) go from the actors straight to storage; the driver only counts.
A failed read or decode is an error entry for that item (and whatever row the job makes of it),
never a crash; Ray retries a failed actor, and a shard is committed only when every one of its
items has come back, so none is silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa

from talora.commit import RunOutput, ShardTracker
from talora.storage import StorageOptions, read_bytes

META_KEYS = ("shard", "item", "rows", "part", "error", "node", "rss_mb", "threads")


@dataclass(frozen=True)
class Item:
    uri: str
    image_id: int
    shard: str
    index: int  # position inside its shard: names the part a batch starting here writes


def read_image_bytes(batch: dict, storage: StorageOptions) -> dict:
    """Ray Data task: fetch each image's bytes; a failed read becomes an error ("" = none)."""
    data, errors = [], []
    for uri in batch["uri"]:
        try:
            data.append(read_bytes(uri, storage))
            errors.append("")
        except Exception as e:
            data.append(b"")
            errors.append(f"{type(e).__name__}: {e}")
    return {**batch, "bytes": data, "error": errors}


class ShardWriter:
    """Base of the actors: subclasses turn a batch into per-item (rows, error); this writes the
    rows of each shard in the batch as one part file and returns the metadata rows."""

    def __init__(self, run: RunOutput, schema: pa.Schema | None = None) -> None:
        self.run = run  # where parts go, in the run's part format
        self.schema = schema

    def process(self, batch: dict) -> list[tuple[list[dict], str]]:
        """One (rows, error) per item of `batch`, in order; error "" when the item succeeded."""
        raise NotImplementedError

    def __call__(self, batch: dict) -> dict:
        results = self.process(batch)
        by_shard: dict[str, list[dict]] = {}
        first_index: dict[str, int] = {}
        for shard, index, (rows, _) in zip(batch["shard"], batch["index"], results):
            by_shard.setdefault(shard, []).extend(rows)
            first_index[shard] = min(first_index.get(shard, int(index)), int(index))
        parts = {shard: self.run.write_part(shard, first_index[shard], rows, self.schema)
                 for shard, rows in by_shard.items() if rows}
        import resource

        import ray
        import torch

        # Where the work ran, the actor's peak memory and its torch threads: for the job's summary.
        node = ray.get_runtime_context().get_node_id()
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        threads = torch.get_num_threads()
        meta: dict[str, list[Any]] = {k: [] for k in META_KEYS}
        for uri, shard, (rows, error) in zip(batch["uri"], batch["shard"], results):
            part = parts.get(shard, "") if rows else ""
            for key, value in zip(META_KEYS, (shard, uri, len(rows), part, error, node, rss_mb, threads)):
                meta[key].append(value)
        return meta


def run_sharded(
    items: list[Item],
    run: RunOutput,
    actor: type[ShardWriter],
    actor_kwargs: dict,
    storage: StorageOptions,
    batch_size: int,
    num_actors: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
    cpu_stage: Callable[[dict], dict] | None = None,
    cpu_stage_kwargs: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Runs every uncommitted shard of `items`; returns counts and timings for the job's summary
    (timed once, around the whole pipeline: its lazy stages measured apart would measure nothing)."""
    import time

    import ray

    start = time.perf_counter()
    committed = run.committed_shards()
    todo = [i for i in items if i.shard not in committed]
    expected: dict[str, list[str]] = {}
    for i in todo:
        expected.setdefault(i.shard, []).append(i.uri)
    tracker = ShardTracker(run, expected)
    log(f"{len(items)} images in {len({i.shard for i in items})} shards; {len(committed)} shards already "
        f"committed, {len(expected)} to do -> {run.root}")
    counts = {"images": len(todo), "rows": 0, "errors": 0, "shards_skipped": sorted(committed)}
    nodes: set[str] = set()
    rss_mb, threads, first_commit, after_first = 0.0, 0, None, 0
    if todo:
        ds = ray.data.from_items([{"uri": i.uri, "image_id": i.image_id, "shard": i.shard, "index": i.index}
                                  for i in todo])
        ds = ds.map_batches(read_image_bytes, fn_kwargs={"storage": storage}, batch_size=batch_size,
                            batch_format="numpy", num_cpus=0.25)
        if cpu_stage is not None:
            ds = ds.map_batches(cpu_stage, fn_kwargs=cpu_stage_kwargs or {}, batch_size=batch_size,
                                batch_format="numpy", num_cpus=0.25)
        ds = ds.map_batches(
            actor,
            fn_constructor_kwargs=actor_kwargs,
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor,  # Ray Data restarts a failed actor and retries its batch
        )
        for row in ds.iter_rows():  # small metadata rows; the heavy outputs went straight to storage
            counts["rows"] += int(row["rows"])
            counts["errors"] += bool(row["error"])
            nodes.add(row["node"])
            rss_mb, threads = max(rss_mb, float(row["rss_mb"])), max(threads, int(row["threads"]))
            after_first += first_commit is not None
            if tracker.add(row["shard"], row["item"], int(row["rows"]), row["part"] or None, row["error"] or None):
                log(f"committed shard {row['shard']}")
                first_commit = first_commit or time.perf_counter()
    missing = tracker.pending()
    if missing:  # every item must have come back; a silently dropped shard is a failure
        raise RuntimeError(f"shards not committed after the run: {missing}")
    counts["shards_committed"] = tracker.committed
    counts["worker_nodes"] = sorted(nodes)
    end = time.perf_counter()
    seconds = end - start
    counts["seconds"] = round(seconds, 3)
    counts["images_per_second"] = round(counts["images"] / seconds, 3) if counts["images"] and seconds > 0 else None
    # Steady state: the images that came back after the first commit (start-up and the pipeline
    # filling up are behind it), over the time since.
    counts["first_commit_seconds"] = round(first_commit - start, 3) if first_commit else None
    counts["steady_images_per_second"] = (round(after_first / (end - first_commit), 3)
                                          if first_commit and after_first and end > first_commit else None)
    counts["actor_peak_rss_mb"] = round(rss_mb, 1) if todo else None
    counts["actor_threads"] = threads or None
    return counts


def number_items(pairs: list[tuple[str, str, int]]) -> list[Item]:
    """(shard, uri, image_id) in listing order -> Items with shard-local positions."""
    position: dict[str, int] = {}
    items = []
    for shard, uri, image_id in pairs:
        items.append(Item(uri, image_id, shard, position.get(shard, 0)))
        position[shard] = position.get(shard, 0) + 1
    return items
