"""The commit protocol of every job that writes (labelling, embedding cache).

Layout under an output URI ``OUT``::

    OUT/<run_key>/<shard>/part-<k>.<suffix>    data, deterministic names (format: a PartFormat)
    OUT/<run_key>/_manifests/<shard>.json      written last: commits the shard

The commit unit is a shard. A manifest lists the shard's part files and every processed item
with its row count (zero included) and error, if any. It is written last, in one PUT on object
storage or one ``os.replace`` locally, so a shard is either committed or not. Readers read only
manifest-listed parts; ``_``-prefixed names are ignored by pyarrow.dataset. A rerun skips
committed shards and rewrites the same part names for the others, so nothing is duplicated and a
stale part of an interrupted run is never read (no manifest lists it).

Why not Ray Data's own ``CheckpointConfig(id_column=...)``: it needs one unique id per output
row, while here one image fans out into many rows (instances x prompts) or none, and "image done
with zero rows" must be recorded too; so the unit of completion is the shard's manifest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from talora.storage import StorageOptions, filesystem, join, read_bytes, write_bytes

MANIFESTS = "_manifests"
STATUS = "_status.json"  # the driver's progress, rewritten at every commit: for users, never for exactly-once


class PartFormat(Protocol):
    """How a part file's rows become bytes and back (talora.predictions.ParquetParts)."""

    suffix: str  # ".parquet"

    def encode(self, rows: list[dict], schema: pa.Schema | None) -> bytes: ...

    def decode(self, data: bytes) -> pa.Table: ...


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

    def to_json(self) -> bytes:
        return json.dumps({"shard": self.shard, "parts": self.parts, "items": self.items, "errors": self.errors},
                          indent=1, sort_keys=True).encode()


class RunOutput:
    """Where one run writes: parts, manifests, and what has been committed."""

    def __init__(self, out: str, key: str, storage: StorageOptions | None, part_format: PartFormat) -> None:
        self.out = out.rstrip("/")
        self.key = key
        self.root = join(self.out, key)
        self.storage = storage
        self.format = part_format

    def part_name(self, k: int) -> str:
        return f"part-{k:06d}{self.format.suffix}"

    def part_uri(self, shard: str, k: int) -> str:
        return join(self.root, shard, self.part_name(k))

    def manifest_uri(self, shard: str) -> str:
        return join(self.root, MANIFESTS, f"{shard}.json")

    def write_part(self, shard: str, k: int, rows: list[dict], schema: pa.Schema | None = None) -> str:
        """Writes part k of `shard` (overwriting an uncommitted earlier attempt); returns its name."""
        write_bytes(self.part_uri(shard, k), self.format.encode(rows, schema), self.storage)
        return self.part_name(k)

    def commit(self, manifest: Manifest) -> None:
        """Commits a shard: its manifest is the last thing written."""
        write_bytes(self.manifest_uri(manifest.shard), manifest.to_json(), self.storage)

    def write_status(self, status: dict) -> None:
        """OUT/<run_key>/_status.json: where a running job is (one small PUT per committed shard)."""
        write_bytes(join(self.root, STATUS), json.dumps(status, indent=1).encode(), self.storage)

    def manifests(self) -> dict[str, Manifest]:
        fs, path = filesystem(join(self.root, MANIFESTS), self.storage)
        fs.invalidate_cache(path)  # commits by other processes must be seen: no stale listing
        if not fs.exists(path):
            return {}
        found = {}
        for name in sorted(fs.ls(path, detail=False)):
            if not name.endswith(".json") or name.rsplit("/", 1)[-1].startswith("_"):
                continue
            data = json.loads(read_bytes(join(self.root, MANIFESTS, name.rsplit("/", 1)[-1]), self.storage))
            found[data["shard"]] = Manifest(data["shard"], data["parts"], data["items"], data.get("errors", {}))
        return found

    def committed_shards(self) -> set[str]:
        return set(self.manifests())

    def committed_part_uris(self) -> list[str]:
        """Every manifest-listed part, in shard then part order: all a reader may read."""
        return [join(self.root, shard, part) for shard, m in sorted(self.manifests().items()) for part in m.parts]

    def read_table(self) -> pa.Table | None:
        """All committed rows as one table (small outputs, tests, evaluation); None if nothing is committed."""
        tables = [self.format.decode(read_bytes(uri, self.storage)) for uri in self.committed_part_uris()]
        return pa.concat_tables(tables) if tables else None


class ShardTracker:
    """Driver side of a run: gathers each shard's per-item results as they arrive (from any
    worker, in any order) and commits the shard once every expected item is in."""

    def __init__(self, run: RunOutput, expected: dict[str, list[str]]) -> None:
        self.run = run
        self.expected = {shard: set(items) for shard, items in expected.items()}
        self.parts: dict[str, set[str]] = {s: set() for s in expected}
        self.items: dict[str, dict[str, int]] = {s: {} for s in expected}
        self.errors: dict[str, dict[str, str]] = {s: {} for s in expected}
        self.committed: list[str] = []

    def add(self, shard: str, item: str, rows: int, part: str | None = None, error: str | None = None) -> bool:
        """Records one processed item; returns True when this completed (and committed) its shard."""
        if item not in self.expected[shard]:
            raise KeyError(f"item {item} is not part of shard {shard}")
        self.items[shard][item] = self.items[shard].get(item, 0) + rows
        if part:
            self.parts[shard].add(part)
        if error:
            self.errors[shard][item] = error
        if set(self.items[shard]) == self.expected[shard] and shard not in self.committed:
            self.run.commit(Manifest(shard, sorted(self.parts[shard]), dict(sorted(self.items[shard].items())),
                                     self.errors[shard]))
            self.committed.append(shard)
            return True
        return False

    def pending(self) -> list[str]:
        return [s for s in self.expected if s not in self.committed]
