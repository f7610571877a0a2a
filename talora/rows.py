"""Prediction rows (DESIGN §5): one per predicted instance, per semantic mask, or per failed image.

`SCHEMA` is the contract between the labelling job and everything that reads its Parquet; it is
validated when shards are merged (`validate_table`).
"""

from __future__ import annotations

import pyarrow as pa

from talora.predictor import Detection

SCHEMA = pa.schema([
    ("image_uri", pa.string()),
    ("image_id", pa.int64()),
    ("shard", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("prompt", pa.string()),
    ("task", pa.string()),
    ("kind", pa.string()),  # instance | semantic | error
    ("segmentation", pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])),
    ("bbox", pa.list_(pa.float32())),  # x, y, w, h
    ("area", pa.float64()),
    ("score", pa.float32()),
    ("model", pa.string()),
    ("error", pa.string()),
])
KINDS = ("instance", "semantic", "error")


def detection_rows(uri: str, image_id: int, shard: str, width: int, height: int,
                   predictions: dict[str, list[Detection]], task: str | None, model: str) -> list[dict]:
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
    """Refuses a shard whose schema or kinds are not the prediction contract, naming it."""
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
