"""What every export writer shares: its interface, the categories, the dataset's layout (names,
split, image files), the spill folder, the upload.

Every format writes one self-contained dataset folder ``OUT``::

    OUT/images/{train,val}/<name>     the images, copied or linked (--image-files)
    OUT/errors.jsonl                  images that failed in the run (never annotations)
    ... the format's own files (coco: annotations/; yolo: labels/ and data.yaml)

``<name>`` is the image's path relative to the labelled prefix. A writer receives a run's rows as
the exporter reads them, one committed part at a time (every row of an image is in one part), then
each shard's images found empty; it spills what it keeps to a local folder, and at the end
assembles its output there and uploads it (fsspec `put`). Memory holds one part and the
categories, whatever the number of images.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil

from talora.io.storage import StorageOptions, filesystem, join, protocol_of, read_bytes, write_bytes
from talora.label.export.config import ExportConfig

ERRORS = "errors.jsonl"  # error rows, beside every export's output; they never become annotations
SPLITS = ("train", "val")
# Ultralytics finds an image's labels by replacing the last "images" folder of its path with
# "labels": a name with such a folder of its own gets it renamed, so only the dataset's is found.
_RESERVED = {"images", "labels"}


def dataset_name(name: str) -> str:
    """An image's name inside the dataset: relative, normalised, never outside it."""
    inside = posixpath.normpath(name.split("://", 1)[-1]).lstrip("/")
    return "/".join(f"{part}_" if part in _RESERVED else part for part in inside.split("/") if part not in ("", ".."))


class Split:
    """Exact train/val assignment by position: of `total` images, floor(total * fraction) go to val,
    spread evenly (image i is val when floor((i + 1) * f) > floor(i * f))."""

    def __init__(self, total: int, fraction: float) -> None:
        self.total, self.fraction, self.seen = total, fraction, 0
        self.counts = dict.fromkeys(SPLITS, 0)

    def next(self) -> str:
        i, f = self.seen, self.fraction
        self.seen += 1
        split = "val" if int((i + 1) * f) > int(i * f) else "train"
        self.counts[split] += 1
        return split


class ImageFiles:
    """Puts each exported image at OUT/images/<split>/<name>: a copy (server-side within one object
    store, else through this process), or a symlink (local to local only, checked before work)."""

    def __init__(self, out: str, mode: str, images_prefix: str | None, storage: StorageOptions) -> None:
        self.out, self.mode, self.storage = out, mode, storage
        if mode == "link" and (protocol_of(out) != "file" or (images_prefix and protocol_of(images_prefix) != "file")):
            raise ValueError(f"--image-files link needs local images and a local --out (got images "
                             f"{images_prefix!r}, out {out!r}); use --image-files copy")
        self.pending: list[tuple[str, str]] = []  # (source URI, destination URI) of this part

    def add(self, uri: str, split: str, name: str) -> None:
        self.pending.append((uri, join(self.out, "images", split, name)))

    def flush(self) -> None:
        """Places this part's images (one batched copy per part where the store allows it)."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        if self.mode == "link" or protocol_of(self.out) == "file":
            for _, dst in pending:
                os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        if self.mode == "link":
            for src, dst in pending:
                if os.path.lexists(dst):
                    os.remove(dst)
                os.symlink(os.path.abspath(src), dst)
            return
        same = {protocol_of(src) for src, _ in pending} == {protocol_of(self.out)}
        if same:  # one filesystem: its own copy (S3: CopyObject, no bytes through here)
            fs, _ = filesystem(self.out, self.storage)
            fs.copy([filesystem(src, self.storage)[1] for src, _ in pending],
                    [filesystem(dst, self.storage)[1] for _, dst in pending])
        else:
            for src, dst in pending:
                write_bytes(dst, read_bytes(src, self.storage), self.storage)


class Categories:
    """Category ids by task (or prompt where a row has no task), in the order the run's summary
    names its prompts, then in order of appearance."""

    def __init__(self, prompts: list[str], task: str | None) -> None:
        self.ids: dict[str, int] = {}
        self.prompts: dict[str, list[str]] = {}
        for prompt in prompts:
            self.id_of(task or prompt, prompt)

    def id_of(self, name: str, prompt: str) -> int:
        if name not in self.ids:
            self.ids[name], self.prompts[name] = len(self.ids) + 1, []
        if prompt not in self.prompts[name]:
            self.prompts[name].append(prompt)
        return self.ids[name]

    def coco(self) -> list[dict]:
        return [{"id": i, "name": name, "supercategory": "talora", "prompts": self.prompts[name]}
                for name, i in self.ids.items()]


class Writer:
    """One output format. The exporter calls `add_image` once per exported image (with its split),
    `add` for each of its rows of the exported kind at the minimum score, `end_part` after each
    part (and after each shard's empty images), then `finish`."""

    def __init__(self, spill: str, config: ExportConfig) -> None:
        self.spill, self.config = spill, config
        self.annotations = 0

    def add_image(self, entry: dict, split: str) -> None:
        """`entry`: {id, file_name (the dataset name, relative to images/<split>/), width, height}."""

    def add(self, row: dict, name: str, split: str, category: int) -> None:
        raise NotImplementedError

    def end_part(self) -> None:
        """Everything of this part's images has been added."""

    def finish(self, categories: Categories, prefix: str | None) -> list[str]:
        """Assembles the output in the spill folder and uploads it; returns the URIs written."""
        raise NotImplementedError

    def close(self) -> None:
        """Closes the spill files (also after a failure)."""


def put(local: str, uri: str, storage: StorageOptions) -> str:
    """Uploads a local file or folder to `uri` (any fsspec URI); returns `uri`."""
    fs, path = filesystem(uri, storage)
    if protocol_of(uri) == "file":
        if os.path.isdir(local):
            shutil.copytree(local, path, dirs_exist_ok=True)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            shutil.copyfile(local, path)
    else:
        if os.path.isdir(local):
            fs.put(local.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)  # the folder's contents
        else:
            fs.put(local, path)
    return uri


def error_line(row: dict) -> str:
    return json.dumps({"image_uri": row["image_uri"], "error": row["error"]}) + "\n"
