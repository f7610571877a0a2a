"""What every export writer shares: its interface, the categories, the spill folder, the upload.

A writer receives a run's rows as the exporter reads them, one committed part at a time (every
row of an image is in one part), spills what it keeps to a local folder, and at the end assembles
its output there and uploads it (fsspec `put`). Memory holds one part and the categories,
whatever the number of images.
"""

from __future__ import annotations

import json
import os
import shutil

from talora.io.storage import StorageOptions, filesystem, protocol_of
from talora.label.export.config import ExportConfig

ERRORS = "errors.jsonl"  # error rows, beside every export's output; they never become annotations


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
    """One output format. The exporter calls `add_image` once per labelled image, `add` for each of
    its rows of the exported kind at the minimum score, `end_part` after each part, then `finish`."""

    def __init__(self, spill: str, config: ExportConfig) -> None:
        self.spill, self.config = spill, config
        self.annotations = 0

    def add_image(self, entry: dict, name: str, uri: str) -> None:
        """`entry`: {id, file_name, width, height}; `name`: the file name relative to the prefix."""

    def add(self, row: dict, name: str, category: int) -> None:
        raise NotImplementedError

    def end_part(self) -> None:
        """Everything of this part's images has been added."""

    def finish(self, categories: Categories, prefix: str | None) -> list[str]:
        """Assembles the output in the spill folder and uploads it with the errors; returns the URIs."""
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
