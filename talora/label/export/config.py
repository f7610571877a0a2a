"""What an export is asked for: the run, where it goes, the format's name and which rows."""

from __future__ import annotations

from dataclasses import dataclass, field

from talora.io.storage import StorageOptions

KINDS = ("instance", "semantic")


@dataclass(frozen=True)
class ExportConfig:
    predictions: str  # a labelling run: OUT/<run_key>
    out: str  # coco: the instances JSON to write; yolo: a folder
    format: str = "coco"  # a name of run.WRITERS (checked there, where the writers are)
    kind: str = "instance"  # instance | semantic: the rows that become annotations
    min_score: float = 0.0
    images_prefix: str | None = None  # file names are relative to it (default: the run's --images)
    storage: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"--kind must be instance or semantic, got {self.kind!r}")
