"""Sharded Ray Data jobs: the one pipeline the embedding cache and the labelling job share.

    shard plans -> skip committed shards -> list each shard's images (tasks, 0.25 CPU)
    -> read bytes (tasks, 0.25 CPU) -> [CPU stage] -> actor pool (one model per actor) -> each
    actor writes its rows as part files per shard -> small metadata rows to the driver ->
    ShardTracker commits each shard.

The driver holds one plan per shard and the state of the shards in flight, never a list of
every image (talora.batch.shards): a bucket of 10^9 images plans like one of 10^4, only with more shards.

The actor pool's layout (how many actors, the CPUs, GPUs and torch threads of each) is chosen
from the resources Ray reports unless given (`ActorLayout.resolve`); the driver prints it, and
with every committed shard the progress, the rate and an ETA, which it also writes to
OUT/<run_key>/_status.json for whoever watches the job.

Heavy outputs (features, masks) go from the actors straight to storage; the driver only counts.
A failed read or decode is an error entry for that item (and whatever row the job makes of it),
never a crash; Ray retries a failed actor, and a shard is committed only when every one of its
items has come back, so none is silently dropped.
"""

from __future__ import annotations

import datetime
import math
import resource
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import pyarrow as pa
import ray

from talora.backbones.frames import error_message
from talora.batch.commit import Manifest, RunOutput, ShardTracker
from talora.batch.shards import ShardPlan, list_images, shard_items
from talora.io.storage import StorageOptions, StorageUnavailable, read_bytes

META_KEYS = ("shard", "item", "image_id", "width", "height", "shard_items", "rows", "part", "error", "node", "rss_mb",
             "threads")
# Plans per listing task: one shard each up to this many shards (a task's items leave it as one
# block, so one shard per task lets the first shard through first); more shards share tasks.
MAX_LISTING_TASKS = 10_000
# The pipeline starts once every actor of the pool is up (each model loaded), so the work spreads
# over the whole pool from the first batch; a cluster that cannot host the pool fails after this
# long with Ray Data's "Timed out while starting actors" instead of waiting for ever (generous:
# an autoscaler may take minutes to bring up GPU nodes).
ACTOR_START_TIMEOUT_S = 1800


@dataclass(frozen=True)
class ActorLayout:
    """The model actors: how many, and what each asks Ray for. None = chosen by `resolve`."""

    num_actors: int | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None
    threads_per_actor: int | None = None  # torch intra-op threads

    def __post_init__(self) -> None:
        for name in ("num_actors", "threads_per_actor"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            raise ValueError(f"--cpus-per-actor must be > 0, got {self.cpus_per_actor}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ValueError(f"--gpus-per-actor must be >= 0, got {self.gpus_per_actor}")

    def resolve(self, resources: dict, light_model: bool = True, nodes: Sequence[dict] = ()) -> ActorLayout:
        """Every field set, from Ray's cluster resources ({"CPU": n, "GPU": m, ...}) and its alive
        nodes' own resources where not given.

        - GPUs (and --gpus-per-actor not 0): one actor per GPU share (--gpus-per-actor 0.5: two per
          GPU), two threads each for the CPU side of the work (filters, RLE). Shares are counted
          per node (0.3 GPU: three actors on each GPU, not ten on three GPUs), and a share no node
          has is refused before the pool starts.
        - CPUs only: single-thread actors, one per core, for a light model (a CPU preset: its small ops
          parallelise poorly, so two 1-thread actors beat one 2-thread actor); four threads per
          actor for the real SAMs (fewer copies of a GB-sized model in memory).
        Each actor asks for 0.75 CPU per thread, at most 3/4 of the cluster's CPUs in all, and on a
        GPU node at most 3/4 of that node's CPUs: the rest runs the read and decode tasks (0.25 CPU
        each), which would starve otherwise. On a cluster whose GPU nodes are not up yet (an
        autoscaler starts them on demand) the flags say how many actors, and each asks for 0.75 CPU
        per thread."""
        cpus, gpus = float(resources.get("CPU", 1)), float(resources.get("GPU", 0))
        gpus_per_actor = self.gpus_per_actor if self.gpus_per_actor is not None else (min(1.0, gpus) if gpus else 0.0)
        per_node_cap = None
        if gpus_per_actor > 0:
            gpu_nodes = [(float(n.get("CPU", 0)), int(float(n["GPU"]) / gpus_per_actor + 1e-9))
                         for n in nodes if float(n.get("GPU", 0)) > 0]
            if gpu_nodes and not any(fit for _, fit in gpu_nodes):
                raise ValueError(f"--gpus-per-actor {gpus_per_actor:g} fits no node of this cluster: the largest has "
                                 f"{max(float(n.get('GPU', 0)) for n in nodes):g} GPU(s)")
            fits = [(node_cpus, fit) for node_cpus, fit in gpu_nodes if fit]
            actors = self.num_actors or (sum(fit for _, fit in fits) if fits else max(1, int(gpus / gpus_per_actor + 1e-9)))
            threads = self.threads_per_actor or 2
            if fits:
                per_node_cap = min(0.75 * node_cpus / fit for node_cpus, fit in fits)
        else:
            threads = self.threads_per_actor or (max(1, int(cpus // self.num_actors)) if self.num_actors
                                                 else 1 if light_model else max(1, min(4, int(cpus))))
            actors = self.num_actors or max(1, int(cpus // threads))
        caps = [0.75 * threads]
        if gpus_per_actor == 0 or gpus > 0:  # else no GPU node is up yet: today's CPUs say nothing of theirs
            caps.append(0.75 * cpus / actors)
        if per_node_cap is not None:
            caps.append(per_node_cap)
        cpus_per_actor = self.cpus_per_actor or max(0.1, math.floor(min(caps) * 100) / 100)
        return ActorLayout(actors, cpus_per_actor, gpus_per_actor, threads)

    def on_cluster(self, light_model: bool = True) -> ActorLayout:
        """`resolve` against the Ray cluster this process is connected to."""
        return self.resolve(ray.cluster_resources(), light_model,
                            [n["Resources"] for n in ray.nodes() if n.get("Alive")])

    def describe(self) -> str:
        gpus = f", {self.gpus_per_actor:g} GPU" if self.gpus_per_actor else ""
        return (f"{self.num_actors} actor(s) x {self.threads_per_actor} thread(s) "
                f"({self.cpus_per_actor:g} CPU{gpus} each)")


def read_image_bytes(batch: dict, storage: StorageOptions) -> dict:
    """Ray Data task: fetch each image's bytes; a failed read becomes an error ("" = none)."""
    data, errors = [], []
    for uri in batch["uri"]:
        try:
            data.append(read_bytes(uri, storage))
            errors.append("")
        except StorageUnavailable:
            raise  # the store, not the image: fail the task (no error row for an image that may be fine)
        except Exception as e:
            data.append(b"")
            errors.append(error_message(uri, e))
    return {**batch, "bytes": data, "error": errors}


class ShardWriter:
    """Base of the actors: subclasses turn a batch into per-item (rows, error); this writes the
    rows of each shard in the batch as one part file and returns the metadata rows."""

    def __init__(self, run: RunOutput, schema: pa.Schema | None = None, threads: int | None = None) -> None:
        self.run = run  # where parts go, in the run's part format
        self.schema = schema
        import torch  # in the model actors only: the read and decode tasks run this module without torch

        if threads:  # the layout's torch threads (Ray sets OMP_NUM_THREADS from whole CPUs only)
            torch.set_num_threads(threads)

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
        # Where the work ran, the actor's peak memory and its torch threads: for the job's summary.
        node = ray.get_runtime_context().get_node_id()
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        import torch  # as in __init__: never in a decode task

        threads = torch.get_num_threads()
        # Each image's size as read (a decode stage's, else its first row's; 0 where it failed).
        sizes = (zip(batch["width"], batch["height"]) if "width" in batch else
                 ((rows[0]["width"] or 0, rows[0]["height"] or 0) if rows else (0, 0) for rows, _ in results))
        meta: dict[str, list[Any]] = {k: [] for k in META_KEYS}
        for uri, image_id, (width, height), shard, count, (rows, error) in zip(
                batch["uri"], batch["image_id"], sizes, batch["shard"], batch["shard_items"], results):
            part = parts.get(shard, "") if rows else ""
            for key, value in zip(META_KEYS, (shard, uri, int(image_id), int(width), int(height), count, len(rows),
                                              part, error, node, rss_mb, threads)):
                meta[key].append(value)
        return meta


def run_sharded(
    plans: list[ShardPlan],
    run: RunOutput,
    actor: type[ShardWriter],
    actor_kwargs: dict,
    storage: StorageOptions,
    batch_size: int,
    layout: ActorLayout,
    image_ids: dict[str, int] | None = None,
    cpu_stage: Callable[[dict], dict] | None = None,
    cpu_stage_kwargs: dict | None = None,
    log: Callable[[str], None] = print,
    watch: Callable[[dict], None] | None = None,
) -> dict:
    """Runs every uncommitted shard of `plans` on `layout` (resolved: every field set); returns
    counts and timings for the job's summary (timed once, around the whole pipeline: its lazy
    stages measured apart would measure nothing). `image_ids`: COCO ids by URI, where known.
    `watch` sees every item's metadata row as it comes back (META_KEYS)."""
    start = time.perf_counter()
    committed = run.committed_shards()  # names only: one listing, no manifest read
    todo = [p for p in plans if p.name not in committed]
    skipped = len(plans) - len(todo)
    tracker = ShardTracker(run, [p.name for p in todo])
    log(f"{len(plans)} shards: {skipped} already committed, {len(todo)} to do -> {run.root}; {layout.describe()}")
    counts = {"images": 0, "rows": 0, "errors": 0}
    nodes: set[str] = set()
    rss_mb, threads, first_commit, after_first = 0.0, 0, None, 0
    if todo:
        ds = ray.data.from_items([{"shard": p.name, "folder": p.folder, "uris": list(p.uris)} for p in todo],
                                 override_num_blocks=min(len(todo), MAX_LISTING_TASKS))
        ds.context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S  # this dataset's copy, not the driver's
        ds = ds.flat_map(shard_items, fn_kwargs={"storage": storage, "image_ids": image_ids}, num_cpus=0.25)
        ds = ds.map_batches(read_image_bytes, fn_kwargs={"storage": storage}, batch_size=batch_size,
                            batch_format="numpy", num_cpus=0.25)
        if cpu_stage is not None:
            ds = ds.map_batches(cpu_stage, fn_kwargs=cpu_stage_kwargs or {}, batch_size=batch_size,
                                batch_format="numpy", num_cpus=0.25)
        ds = ds.map_batches(
            actor,
            fn_constructor_kwargs={**actor_kwargs, "threads": layout.threads_per_actor},
            compute=ray.data.ActorPoolStrategy(size=layout.num_actors),
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=layout.cpus_per_actor,
            num_gpus=layout.gpus_per_actor,  # Ray Data restarts a failed actor and retries its batch
        )
        for row in storage_failures(ds.iter_rows()):  # small metadata rows; heavy outputs went straight to storage
            if watch is not None:
                watch(row)
            if not tracker.has(row["shard"], row["item"]):  # an item that came back twice counts once
                counts["images"] += 1
                counts["rows"] += int(row["rows"])
                counts["errors"] += bool(row["error"])
            nodes.add(row["node"])
            rss_mb, threads = max(rss_mb, float(row["rss_mb"])), max(threads, int(row["threads"]))
            after_first += first_commit is not None
            if tracker.add(row["shard"], row["item"], int(row["rows"]), row["part"] or None, row["error"] or None,
                           shard_items=int(row["shard_items"]),
                           image=(int(row["image_id"]), int(row["width"]), int(row["height"]))):
                first_commit = first_commit or time.perf_counter()
                now = status("running", tracker, skipped, counts["images"], counts["errors"],
                             time.perf_counter() - start)
                run.write_status(now)
                log(f"committed shard {row['shard']} ({progress(now)})")
    folders = {p.name: p.folder for p in todo}
    for shard in tracker.unseen():  # no item came back: commit it if its listing really is empty
        if folders[shard] and not list_images(folders[shard], storage):
            tracker.commit(Manifest(shard, [], {}, {}))
    missing = tracker.pending()
    if missing:  # every item must have come back; a silently dropped shard is a failure
        raise RuntimeError(f"{len(missing)} shards not committed after the run: {missing[:10]}")
    run.write_status(status("done", tracker, skipped, counts["images"], counts["errors"], time.perf_counter() - start))
    counts["shards_committed"] = len(tracker.committed)
    counts["shards_skipped"] = skipped
    counts["worker_nodes"] = sorted(nodes)
    end = time.perf_counter()
    seconds = end - start
    counts["seconds"] = round(seconds, 3)
    counts["images_per_second"] = round(counts["images"] / seconds, 3) if counts["images"] and seconds > 0 else None
    counts["first_commit_seconds"] = round(first_commit - start, 3) if first_commit else None
    counts["steady_images_per_second"] = steady_rate(after_first, first_commit, start, end)
    counts["actor_peak_rss_mb"] = round(rss_mb, 1) if todo else None
    counts["actor_threads"] = threads or None
    return counts


# The steady-state window must span this share of the run; a shorter one is one burst of rows that
# finished together with the first shard (a run of one batch per actor has no steady state).
MIN_STEADY_SHARE = 0.1


def steady_rate(after_first: int, first_commit: float | None, start: float, end: float) -> float | None:
    """Images per second in the steady state: the images that came back after the first commit
    (start-up and the pipeline filling up are behind it) over the time since; None when there is
    no such window."""
    if not first_commit or not after_first or end - first_commit < MIN_STEADY_SHARE * (end - start):
        return None
    return round(after_first / (end - first_commit), 3)


def storage_failures(rows):
    """`rows`, with a worker's StorageUnavailable (however Ray wrapped it) raised here as itself:
    one line naming the endpoint, not a remote traceback."""
    try:
        yield from rows
    except StorageUnavailable:
        raise
    except Exception as e:
        found, seen = e, set()
        while found is not None and id(found) not in seen:  # Ray's RayTaskError keeps the original as .cause
            seen.add(id(found))
            original = getattr(found, "cause", None)
            if isinstance(original, StorageUnavailable) and not hasattr(original, "cause"):
                found = original
                break
            if isinstance(found, StorageUnavailable) and not hasattr(found, "cause"):
                break
            found = original or found.__cause__ or found.__context__
        if not isinstance(found, StorageUnavailable):
            raise
        raise StorageUnavailable(str(found)) from None


def progress(now: dict) -> str:
    """A status (below) as one line: "3/10 shards, 3000/~10000 images, 9.8 images/s, ETA 12:30"."""
    eta = f"{int(now['eta_s']) // 60}:{int(now['eta_s']) % 60:02d}" if now["eta_s"] is not None else "?"
    total = now["images"]["estimated_total"]
    return (f"{now['shards']['committed']}/{now['shards']['to_do']} shards, {now['images']['returned']}/"
            f"{'~' + str(total) if total is not None else '?'} images, {now['images_per_second']:.1f} images/s, "
            f"ETA {eta}")


def status(state: str, tracker: ShardTracker, skipped: int, returned: int, errors: int, seconds: float) -> dict:
    """The run's _status.json: shards done of all, images returned, the rates so far and an ETA
    (seconds). Shards are listed by tasks as they go, so the images still to come are estimated
    from the committed shards' mean size (exact once the run is done)."""
    committed, to_do = len(tracker.committed), len(tracker.committed) + len(tracker.waiting)
    per_shard = tracker.items_committed / committed if committed else None
    total = returned if state == "done" else (round(per_shard * to_do) if per_shard is not None else None)
    image_rate = returned / seconds if seconds > 0 else 0.0
    shard_rate = committed / seconds if seconds > 0 else 0.0
    eta = None
    if state == "done":
        eta = 0.0
    elif total is not None and image_rate > 0:
        eta = max(0.0, total - returned) / image_rate
    return {"state": state, "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "shards": {"committed": committed, "to_do": to_do, "skipped": skipped},
            "images": {"returned": returned, "errors": errors, "per_shard": per_shard and round(per_shard, 1),
                       "estimated_total": total},
            "elapsed_s": round(seconds, 1), "images_per_second": round(image_rate, 3),
            "shards_per_second": round(shard_rate, 4), "eta_s": eta if eta is None else round(eta, 1)}
