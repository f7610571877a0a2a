"""The export of a labelling run: reads it one committed part at a time and hands each row to the
writer of the chosen format (`WRITERS`).

Error rows never become annotations: they are listed in `errors.jsonl` beside the output. Images
processed without any row (nothing found, nothing written) are not in the export: their size is
known only by reading them.
"""

from __future__ import annotations

import os
import tempfile

from talora.batch.rows import iter_parts, read_summary
from talora.io.storage import absolute
from talora.label.export.coco import CocoWriter
from talora.label.export.config import ExportConfig
from talora.label.export.writer import ERRORS, Categories, Writer, error_line
from talora.label.export.yolo import YoloWriter

WRITERS: dict[str, type[Writer]] = {"coco": CocoWriter, "yolo": YoloWriter}
def relative_name(uri: str, prefix: str | None) -> str:
    """`uri` relative to the labelled prefix (the whole URI when it is not under it)."""
    if prefix and uri.startswith(prefix.rstrip("/") + "/"):
        return uri[len(prefix.rstrip("/")) + 1:]
    return uri


def export_run(config: ExportConfig) -> dict:
    """Writes the export; returns its counts {images, annotations, categories, errors, out, files}."""
    if config.format not in WRITERS:  # before the run is read
        raise ValueError(f"--format must be one of {tuple(WRITERS)}, got {config.format!r}")
    summary = read_summary(config.predictions, config.storage)
    prefix = absolute(config.images_prefix or summary.get("config", {}).get("images"))  # as the rows' URIs
    categories = Categories(summary.get("prompts", []), summary.get("config", {}).get("task"))
    counts = {"images": 0, "errors": 0}
    with tempfile.TemporaryDirectory(prefix="talora-export-") as spill:
        writer = WRITERS[config.format](spill, config)
        try:
            with open(os.path.join(spill, ERRORS), "w") as errors:
                for table in iter_parts(config.predictions, config.storage):
                    seen: set[int] = set()  # image ids of this part only: an image's rows are in one part
                    for row in table.to_pylist():
                        if row["kind"] == "error":
                            errors.write(error_line(row))
                            counts["errors"] += 1
                            continue
                        name = relative_name(row["image_uri"], prefix)
                        if row["image_id"] not in seen:
                            seen.add(row["image_id"])
                            writer.add_image({"id": row["image_id"], "file_name": name, "width": row["width"],
                                              "height": row["height"]}, name, row["image_uri"])
                            counts["images"] += 1
                        if row["kind"] == config.kind and row["score"] >= config.min_score:
                            writer.add(row, name, categories.id_of(row["task"] or row["prompt"], row["prompt"]))
                    writer.end_part()
            files = writer.finish(categories, prefix)
        finally:
            writer.close()
    return {**counts, "annotations": writer.annotations, "categories": len(categories.ids), "out": config.out,
            "files": files}
