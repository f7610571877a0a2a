"""The speed suite's prompts and configuration (from flags or a training preset), validated before any work."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from talora.config import ModelConfig, default_config
from talora.io.storage import StorageOptions
from talora.train.config import load_run_spec

# Prompts of the demo domain, the first K of which the floor labels (any text works: these have tasks).
PROMPTS = ("segment vehicles", "segment red objects", "segment all circles", "segment fruit", "segment blue objects",
           "segment cars", "segment green objects", "segment shapes")


PROMPT_COUNTS = (1, 2, 4, 8)


@dataclass(frozen=True)
class SpeedConfig:
    model: ModelConfig  # the variant, and the hypernet of the train step (random weights)
    device: str = "cpu"
    images: str | None = None  # an image prefix; None = demo images generated in a temporary folder
    num_images: int = 1000  # images listed (or generated); the model paths time the first `timed_images`
    timed_images: int = 16
    prompts: int = 2  # K of the floor and naive paths
    points_per_side: int = 16  # the instance grid, as the labelling job's --points-per-side
    batch_images: int = 8  # train step
    tasks_per_image: int = 2
    min_run_time: float = 2.0  # seconds of timed runs per path (at least one run)
    job: bool = True  # run the labelling job end to end (needs Ray)
    train_step: bool = True  # time the hypernet (and, on CPU presets, pretraining) train steps
    precision: str = "fp32"  # autocast of the model paths (PredictConfig.precision)
    storage: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self) -> None:
        if not 1 <= self.prompts <= len(PROMPTS):
            raise ValueError(f"--prompts must be in [1, {len(PROMPTS)}], got {self.prompts}")
        for name in ("num_images", "timed_images", "points_per_side", "batch_images", "tasks_per_image"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"--precision must be fp32, bf16 or fp16, got {self.precision!r}")


def speed_config(sam_type: str, device: str, preset: str | None = None, **kwargs) -> SpeedConfig:
    """The model and train batch of a training preset (`preset`: YAML text) or the variant's defaults;
    a preset for another variant is refused before any work. `kwargs`: SpeedConfig fields (None = default)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if not preset:
        return SpeedConfig(default_config(sam_type), device, **kwargs)
    spec = load_run_spec(preset)
    if spec.model.sam.sam_type != sam_type:
        raise ValueError(f"the preset is for {spec.model.sam.sam_type}; pass --sam-type {spec.model.sam.sam_type}")
    model = dataclasses.replace(spec.model, sam=dataclasses.replace(spec.model.sam, checkpoint=None))
    return SpeedConfig(model, device, **{"batch_images": spec.train.batch_images,
                                         "tasks_per_image": spec.train.tasks_per_image, **kwargs})


def describe(config: SpeedConfig) -> dict:
    return {"sam_type": config.model.sam.sam_type, "images": config.images or "demo (generated)",
            "num_images": config.num_images, "timed_images": config.timed_images, "prompts": config.prompts,
            "points_per_side": config.points_per_side, "precision": config.precision,
            "batch_images": config.batch_images, "tasks_per_image": config.tasks_per_image,
            "min_run_time": config.min_run_time, "job": config.job, "train_step": config.train_step}
