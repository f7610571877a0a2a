"""Prediction rows: the row contract, the one reader of committed runs, COCO results.

Rows: one per predicted instance, per semantic mask, or per failed image. `SCHEMA` is the contract
between the labelling job and everything that reads its output; every part is validated against
it when read (`validate_table`).

Writing goes through the commit protocol (`talora.batch.commit`) with a part format of
`talora.batch.parts`. Reading a run (`read_run`) takes only manifest-listed parts, each decoded by
its file's suffix, so an interrupted job's stale parts are never seen; `coco_results` turns rows into COCO results for pycocotools.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterator

import pyarrow as pa

from talora.batch.commit import Manifest, RunOutput
from talora.batch.parts import PARQUET, PartFormat, part_format_of
from talora.io.storage import StorageOptions, join, read_bytes, write_bytes

SCHEMA = pa.schema([
    ("image_uri", pa.string()),
    ("image_id", pa.int64()),  # the COCO id when known, else a deterministic 63-bit hash of the URI
    ("shard", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("prompt", pa.string()),
    ("task", pa.string()),  # the task id when the job was given one (--task), else null
    ("kind", pa.string()),  # instance | semantic | error
    ("segmentation", pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])),  # COCO compressed RLE
    ("bbox", pa.list_(pa.float32())),  # x, y, w, h
    ("area", pa.float64()),
    ("score", pa.float32()),
    ("model", pa.string()),  # SAM variant + hypernet (or adapter) digest
    ("error", pa.string()),  # null unless kind = error
])
KINDS = ("instance", "semantic", "error")
SUMMARY = "_summary.json"


# --- rows ----------------------------------------------------------------------------------------


def detection_rows(uri: str, image_id: int, shard: str, width: int, height: int, predictions: dict[str, list],
                   task: str | None, model: str) -> list[dict]:
    """{prompt: [Detection]} of one image -> rows."""
    rows = []
    for prompt, detections in predictions.items():
        for d in detections:
            rows.append({"image_uri": uri, "image_id": image_id, "shard": shard, "width": width, "height": height,
                         "prompt": prompt, "task": task, "kind": d.kind, "segmentation": d.rle, "bbox": d.bbox,
                         "area": d.area, "score": d.score, "model": model, "error": None})
    return rows


def error_row(uri: str, image_id: int, shard: str, error: str, model: str) -> dict:
    return {"image_uri": uri, "image_id": image_id, "shard": shard, "width": None, "height": None, "prompt": None,
            "task": None, "kind": "error", "segmentation": None, "bbox": None, "area": None, "score": None,
            "model": model, "error": error}


def validate_table(table: pa.Table, source: str) -> pa.Table:
    """Refuses a part whose schema or kinds are not the prediction contract, naming it."""
    missing = [f.name for f in SCHEMA if f.name not in table.schema.names]
    if missing:
        raise ValueError(f"{source}: not a prediction shard, missing column(s) {missing}")
    try:
        table = table.select(SCHEMA.names).cast(SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ValueError(f"{source}: columns do not match the prediction schema: {e}") from e
    bad = set(table.column("kind").to_pylist()) - set(KINDS)
    if bad:
        raise ValueError(f"{source}: unknown row kind(s) {sorted(bad)}; expected {KINDS}")
    return table


# --- a run ------------------------------------------------------------------------------------------


def open_run(run_uri: str, storage: StorageOptions | None = None, part_format: PartFormat = PARQUET) -> RunOutput:
    """The run at ``OUT/<run_key>`` (what a job's summary calls its output)."""
    out, key = run_uri.rstrip("/").rsplit("/", 1)
    return RunOutput(out, key, storage, part_format)


# --- reading a run ---------------------------------------------------------------------------------


@dataclass
class CommittedRun:
    table: pa.Table  # every committed row, schema-checked
    processed: list[str]  # image URIs processed without error, zero-row images included (from the manifests)
    shard_of: dict[str, str]  # image URI -> shard, for every item of every manifest


def iter_parts(run_uri: str, storage: StorageOptions | None = None) -> Iterator[pa.Table]:
    """The committed parts of a labelling run one at a time, each checked against `SCHEMA`: for
    readers whose memory must not grow with the run (every row of an image is in one part)."""
    run = open_run(run_uri, storage)
    uris = run.committed_part_uris()
    if not uris and not run.committed_shards():
        raise ValueError(f"{run_uri} has no committed shard (no _manifests/*.json)")
    for uri in uris:
        yield read_part(uri, storage)


def read_part(uri: str, storage: StorageOptions | None = None) -> pa.Table:
    """One committed part of a labelling run, checked against `SCHEMA`."""
    return validate_table(part_format_of(uri).decode(read_bytes(uri, storage)), uri)


def iter_shards(run_uri: str, storage: StorageOptions | None = None) -> Iterator[tuple[Manifest, list[str]]]:
    """Every committed shard's manifest with its part URIs, in shard order, each manifest read as
    it is reached (memory holds one): for readers that go shard by shard."""
    run = open_run(run_uri, storage)
    shards = sorted(run.committed_shards())
    if not shards:
        raise ValueError(f"{run_uri} has no committed shard (no _manifests/*.json)")
    for shard in shards:
        manifest = Manifest.from_json(read_bytes(run.manifest_uri(shard), storage))
        yield manifest, [join(run.root, shard, part) for part in manifest.parts]


def read_run(run_uri: str, storage: StorageOptions | None = None) -> CommittedRun:
    """The committed rows of a labelling run, every part checked against `SCHEMA`."""
    run = open_run(run_uri, storage)
    manifests = run.manifests()
    if not manifests:
        raise ValueError(f"{run_uri} has no committed shard (no _manifests/*.json)")
    tables = list(iter_parts(run_uri, storage))
    table = pa.concat_tables(tables) if tables else pa.Table.from_pylist([], schema=SCHEMA)
    processed = [item for m in manifests.values() for item in m.items if item not in m.errors]
    shard_of = {item: shard for shard, m in manifests.items() for item in m.items}
    return CommittedRun(table, processed, shard_of)


def write_summary(run_root: str, summary: dict, storage: StorageOptions | None = None) -> None:
    """A job's summary, beside its manifests."""
    write_bytes(join(run_root, SUMMARY), json.dumps(summary, indent=1, default=str).encode(), storage)


def read_summary(run_uri: str, storage: StorageOptions | None = None) -> dict:
    """A run's summary, or {} if it has none."""
    try:
        return json.loads(read_bytes(join(run_uri, SUMMARY), storage))
    except FileNotFoundError:
        return {}


# --- rows -> COCO results ----------------------------------------------------------------------------


def coco_results(rows: list[dict], image_id_of: Callable[[dict], int | None],
                 category_of: Callable[[dict], int | None]) -> list[dict]:
    """Instance rows -> COCO results ({image_id, category_id, score, segmentation}); rows whose image or
    category is unknown (None) are left out."""
    results = []
    for r in rows:
        if r["kind"] != "instance":
            continue
        image_id, category_id = image_id_of(r), category_of(r)
        if image_id is None or category_id is None:
            continue
        results.append({"image_id": image_id, "category_id": category_id, "score": float(r["score"]),
                        "segmentation": {"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"]}})
    return results
