"""What an export is asked for: the run, where it goes, the format's name, which rows, how the
images get into the dataset and how it is split."""

from __future__ import annotations

from dataclasses import dataclass, field

from talora.io.storage import StorageOptions

KINDS = ("instance", "semantic")
IMAGE_FILES = ("copy", "link")  # link: a symlink per image, local images into a local dataset only


@dataclass(frozen=True)
class ExportConfig:
    predictions: str  # a labelling run: OUT/<run_key>
    out: str  # the dataset's folder (any URI): images/, and labels/ + data.yaml or annotations/
    format: str = "coco"  # a name of run.WRITERS (checked there, where the writers are)
    kind: str = "instance"  # instance | semantic: the rows that become annotations
    min_score: float = 0.0
    images_prefix: str | None = None  # file names are relative to it (default: the run's --images)
    image_files: str = "copy"  # one of IMAGE_FILES
    val_fraction: float = 0.1  # of the exported images, every (1 / fraction)-th goes to val
    storage: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"--kind must be instance or semantic, got {self.kind!r}")
        if self.image_files not in IMAGE_FILES:
            raise ValueError(f"--image-files must be one of {IMAGE_FILES}, got {self.image_files!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
