"""The export of a labelling run: reads it shard by shard, one committed part at a time, and hands
each image and row to the writer of the chosen format (`WRITERS`), placing every exported image in
the dataset (`ImageFiles`) and assigning it to train or val (`Split`).

Every image the run processed without error is exported: those with rows from the parts, those
on which nothing was found (backgrounds) from their shard's manifest, which recorded each image's
id and size as it was processed, so no image is read to be measured. Error rows never become
annotations: they are listed in ``OUT/errors.jsonl``.
"""

from __future__ import annotations

import os
import tempfile

from talora.batch.rows import iter_shards, read_part, read_summary
from talora.io.storage import absolute, join
from talora.label.export.coco import CocoWriter
from talora.label.export.config import ExportConfig
from talora.label.export.writer import ERRORS, Categories, ImageFiles, Split, Writer, dataset_name, error_line, put
from talora.label.export.yolo import YoloWriter

WRITERS: dict[str, type[Writer]] = {"coco": CocoWriter, "yolo": YoloWriter}


def relative_name(uri: str, prefix: str | None) -> str:
    """`uri` relative to the labelled prefix (the whole URI when it is not under it)."""
    if prefix and uri.startswith(prefix.rstrip("/") + "/"):
        return uri[len(prefix.rstrip("/")) + 1:]
    return uri


def export_run(config: ExportConfig) -> dict:
    """Writes the dataset; returns its counts {images, train, val, backgrounds, annotations,
    categories, errors, out, files}."""
    if config.format not in WRITERS:  # before the run is read
        raise ValueError(f"--format must be one of {tuple(WRITERS)}, got {config.format!r}")
    summary = read_summary(config.predictions, config.storage)
    prefix = absolute(config.images_prefix or summary.get("config", {}).get("images"))  # as the rows' URIs
    images = ImageFiles(config.out, config.image_files, prefix, config.storage)  # refuses a link it cannot make
    categories = Categories(summary.get("prompts", []), summary.get("config", {}).get("task"))
    total, unsized, first = 0, 0, None  # a first pass over the manifests (one held at a time), before any write
    for manifest, _ in iter_shards(config.predictions, config.storage):
        for item, rows in manifest.items.items():
            total += item not in manifest.errors
            if rows == 0 and item not in manifest.errors and item not in manifest.images:
                unsized, first = unsized + 1, first or (manifest.shard, item)
    if unsized:
        raise ValueError(f"{config.predictions}: shard {first[0]} records no size for {first[1]} ({unsized} images "
                         "found empty in all): its manifests predate image sizes; relabel into a new --output to "
                         "export its backgrounds")
    split = Split(total, config.val_fraction)
    counts = {"images": 0, "backgrounds": 0, "errors": 0}

    def add_image(uri: str, image_id: int, width: int, height: int) -> tuple[str, str]:
        name, where = dataset_name(relative_name(uri, prefix)), split.next()
        writer.add_image({"id": image_id, "file_name": name, "width": width, "height": height}, where)
        images.add(uri, where, name)
        counts["images"] += 1
        return name, where

    with tempfile.TemporaryDirectory(prefix="talora-export-") as spill:
        writer = WRITERS[config.format](spill, config)
        try:
            with open(os.path.join(spill, ERRORS), "w") as errors:
                for manifest, parts in iter_shards(config.predictions, config.storage):
                    for uri in parts:
                        placed: dict[int, tuple[str, str]] = {}  # this part's images: every row of one is here
                        for row in read_part(uri, config.storage).to_pylist():
                            if row["kind"] == "error":
                                errors.write(error_line(row))
                                counts["errors"] += 1
                                continue
                            if row["image_id"] not in placed:
                                placed[row["image_id"]] = add_image(row["image_uri"], row["image_id"], row["width"],
                                                                    row["height"])
                            if row["kind"] == config.kind and row["score"] >= config.min_score:
                                writer.add(row, *placed[row["image_id"]],
                                           categories.id_of(row["task"] or row["prompt"], row["prompt"]))
                        writer.end_part()
                        images.flush()
                    for item, rows in manifest.items.items():  # processed, nothing found: a background
                        if rows == 0 and item not in manifest.errors:
                            add_image(item, *manifest.images[item])
                            counts["backgrounds"] += 1
                    writer.end_part()
                    images.flush()
            files = [*writer.finish(categories, prefix),
                     put(os.path.join(spill, ERRORS), join(config.out, ERRORS), config.storage)]
        finally:
            writer.close()
    return {**counts, **split.counts, "annotations": writer.annotations, "categories": len(categories.ids),
            "out": config.out, "files": files}
