"""The commit protocol of every job that writes (labelling, embedding cache).

Layout under an output URI ``OUT``::

    OUT/<run_key>/<shard>/part-<k>-<attempt>.<suffix>    data (format: a PartFormat)
    OUT/<run_key>/_manifests/<shard>.json                written last: commits the shard

The commit unit is a shard. A manifest lists the shard's part files and every processed item
with its row count (zero included) and error, if any. It is written last, in one PUT on object
storage or one ``os.replace`` locally, so a shard is either committed or not. Readers read only
manifest-listed parts; ``_``-prefixed names are ignored by pyarrow.dataset. A rerun skips
committed shards and redoes the others, so nothing is duplicated and a stale part of an interrupted
run is never read (no manifest lists it).

Each driver is one attempt, with its own id in its part names: the same command run twice at once
on the same output (a scheduler's retry, a double click) writes two sets of parts that never
overwrite each other, and whichever manifest is written last wins whole, naming only its own
attempt's parts; every image's rows are read once either way. Within an attempt, an item that comes
back twice (a retried batch) is counted once.

Why not Ray Data's own ``CheckpointConfig(id_column=...)``: it needs one unique id per output
row, while here one image fans out into many rows (instances x prompts) or none, and "image done
with zero rows" must be recorded too; so the unit of completion is the shard's manifest.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

import pyarrow as pa

from talora.batch.parts import PartFormat
from talora.io.storage import StorageOptions, filesystem, join, read_bytes, with_retries, write_bytes

MANIFESTS = "_manifests"
STATUS = "_status.json"  # the driver's progress, rewritten at every commit: for users, never for exactly-once


def run_key(inputs: dict[str, Any]) -> str:
    """A short digest of everything that changes results (models, prompts, thresholds)."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Manifest:
    shard: str
    parts: list[str]  # part file names relative to OUT/<run_key>/<shard>/
    items: dict[str, int]  # item (image URI) -> rows written, zero included
    errors: dict[str, str]  # item -> error message, for items that failed
    # item -> [image_id, width, height], recorded as it was processed (exports list images found empty)
    images: dict[str, list[int]] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps({"shard": self.shard, "parts": self.parts, "items": self.items, "errors": self.errors,
                           "images": self.images}, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        d = json.loads(data)
        return cls(d["shard"], d["parts"], d["items"], d.get("errors", {}), d.get("images", {}))


def read_status(uri: str, storage: StorageOptions | None = None) -> tuple[str, dict]:
    """A job's status file and its run folder: `uri` is the run (OUTPUT/<run_key>) or the job's
    --output while it holds one run; an output with several names them."""
    try:
        return uri, json.loads(read_bytes(join(uri, STATUS), storage))
    except FileNotFoundError:
        pass
    fs, path = filesystem(uri, storage)
    found = sorted(fs.glob(f"{path.rstrip('/')}/*/{STATUS}"))
    if not found:
        raise FileNotFoundError(f"{uri}: no {STATUS} here or one level below (has the job committed a shard yet?)")
    runs = [join(uri, f.rsplit("/", 2)[-2]) for f in found]
    if len(runs) > 1:
        raise ValueError(f"{uri} holds {len(runs)} runs; name one: " + ", ".join(runs))
    return runs[0], json.loads(read_bytes(join(runs[0], STATUS), storage))


class RunOutput:
    """Where one run writes: parts, manifests, and what has been committed."""

    def __init__(self, out: str, key: str, storage: StorageOptions | None, part_format: PartFormat,
                 attempt: str | None = None) -> None:
        self.out = out.rstrip("/")
        self.key = key
        self.root = join(self.out, key)
        self.storage = storage
        self.format = part_format
        self.attempt = attempt or uuid.uuid4().hex[:12]  # this driver's, carried to the actors with the object

    def part_name(self, k: int) -> str:
        return f"part-{k:06d}-{self.attempt}{self.format.suffix}"

    def part_uri(self, shard: str, k: int) -> str:
        return join(self.root, shard, self.part_name(k))

    def manifest_uri(self, shard: str) -> str:
        return join(self.root, MANIFESTS, f"{shard}.json")

    def write_part(self, shard: str, k: int, rows: list[dict], schema: pa.Schema | None = None) -> str:
        """Writes part k of `shard` (a retried batch of this attempt overwrites its own); returns its name."""
        write_bytes(self.part_uri(shard, k), self.format.encode(rows, schema), self.storage)
        return self.part_name(k)

    def commit(self, manifest: Manifest) -> None:
        """Commits a shard: its manifest is the last thing written."""
        write_bytes(self.manifest_uri(manifest.shard), manifest.to_json(), self.storage)

    def write_status(self, status: dict) -> None:
        """OUT/<run_key>/_status.json: where a running job is (one small PUT per committed shard)."""
        write_bytes(join(self.root, STATUS), json.dumps(status, indent=1).encode(), self.storage)

    def manifests(self) -> dict[str, Manifest]:
        """Every committed shard's manifest (each one read: for readers of the output)."""
        found = {}
        for shard in sorted(self.committed_shards()):
            manifest = Manifest.from_json(read_bytes(self.manifest_uri(shard), self.storage))
            found[manifest.shard] = manifest
        return found

    def committed_shards(self) -> set[str]:
        """The committed shards' names, from one listing of the manifests (none is read)."""
        fs, path = filesystem(join(self.root, MANIFESTS), self.storage)
        fs.invalidate_cache(path)  # commits by other processes must be seen: no stale listing
        if not with_retries(lambda: fs.exists(path), self.root, self.storage):
            return set()
        names = (name.rsplit("/", 1)[-1] for name in with_retries(lambda: fs.ls(path, detail=False), self.root,
                                                                     self.storage))
        return {name.removesuffix(".json") for name in names if name.endswith(".json") and not name.startswith("_")}

    def committed_part_uris(self) -> list[str]:
        """Every manifest-listed part, in shard then part order: all a reader may read."""
        return [join(self.root, shard, part) for shard, m in sorted(self.manifests().items()) for part in m.parts]

    def read_table(self) -> pa.Table | None:
        """All committed rows as one table (small outputs, tests, evaluation); None if nothing is committed."""
        tables = [self.format.decode(read_bytes(uri, self.storage)) for uri in self.committed_part_uris()]
        return pa.concat_tables(tables) if tables else None


class ShardTracker:
    """Driver side of a run: gathers each shard's per-item results as they arrive (from any
    worker, in any order) and commits the shard once all its items are in. The shard's size comes
    with its items (`shard_items`, stamped when a task listed the shard), so the driver never holds
    a shard's list; a committed shard's state is dropped."""

    def __init__(self, run: RunOutput, shards: Iterable[str]) -> None:
        self.run = run
        self.waiting = set(shards)  # planned and not committed yet
        self.committed: set[str] = set()
        self.items_committed = 0
        self.open: dict[str, Manifest] = {}  # shards with some items in

    def has(self, shard: str, item: str) -> bool:
        """Whether `item` of `shard` has already been recorded (or its shard committed) in this run."""
        return shard in self.committed or (shard in self.open and item in self.open[shard].items)

    def add(self, shard: str, item: str, rows: int, part: str | None = None, error: str | None = None, *,
            shard_items: int, image: tuple[int, int, int] | None = None) -> bool:
        """Records one processed item of a shard of `shard_items` items (`image`: its id, width and
        height, where it was read); returns True when this completed (and committed) its shard. An
        item recorded again replaces its first record."""
        if shard in self.committed:
            return False  # a retried batch's late copy: the shard is already complete
        if shard not in self.waiting:
            raise KeyError(f"shard {shard} is not part of this run")
        found = self.open.setdefault(shard, Manifest(shard, [], {}, {}))
        found.items[item] = rows
        if part and part not in found.parts:
            found.parts.append(part)
        if error:
            found.errors[item] = error
        else:
            found.errors.pop(item, None)
        if image is not None and image[1] > 0:
            found.images[item] = [int(v) for v in image]
        if len(found.items) > shard_items:
            raise RuntimeError(f"shard {shard} returned {len(found.items)} items, but was listed with {shard_items}")
        if len(found.items) < shard_items:
            return False
        self.commit(Manifest(shard, sorted(found.parts), dict(sorted(found.items.items())), found.errors,
                             dict(sorted(found.images.items()))))
        return True

    def commit(self, manifest: Manifest) -> None:
        """Commits a shard (an empty manifest: a shard whose listing found no image)."""
        self.run.commit(manifest)
        self.waiting.discard(manifest.shard)
        self.open.pop(manifest.shard, None)
        self.committed.add(manifest.shard)
        self.items_committed += len(manifest.items)

    def unseen(self) -> list[str]:
        """Waiting shards of which no item came back: empty, or lost."""
        return sorted(self.waiting - set(self.open))

    def pending(self) -> list[str]:
        return sorted(self.waiting)
