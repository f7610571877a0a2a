"""The training config: one YAML with a `model` section (talora.config.ModelConfig) and a `train`
section (TrainConfig), loaded strictly; flags override it; the resolved result is written next to
every checkpoint and refused on resume if it changed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import yaml

from talora.backbones.variants import DEFAULT_VARIANT
from talora.config import ModelConfig, default_config, from_dict, to_dict

MODES = ("hypernet", "static", "pretrain")


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "hypernet"  # hypernet | static (one plain LoRA) | pretrain (the whole SAM: the demo base)
    train_annotations: str = ""  # COCO instances JSON URI
    val_annotations: str = ""  # held-out images; empty = no validation metric beyond the loss
    train_image_root: str | None = None  # default: images/ beside the JSON
    val_image_root: str | None = None
    embeddings: str | None = None  # embedding cache run URI (jobs/embed_images.py); None = encode on the fly
    task: str | None = None  # static mode: train on this task id only (None = every training task)
    max_steps: int = 1000
    batch_images: int = 4  # images per worker per step
    tasks_per_image: int = 2  # half present in the image, half absent (presence training)
    num_points: int = 1  # positive and negative point samples per (image, task)
    box_share: float = 0.0  # hypernet/static: share of positive samples prompted by their instance's box instead
    lr: float = 1e-3  # for the global batch of num_workers * batch_images; scaled linearly (docs/training.md)
    weight_decay: float = 0.0
    warmup_steps: int = 20
    lr_schedule: str = "constant"  # constant | cosine (to 0 at max_steps), both after the linear warmup
    grad_clip: float = 1.0
    focal_weight: float = 20.0  # SAM's 20:1 focal:dice (SAM's decoders; a detector's are talora.train.detector's)
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    presence_weight: float = 1.0
    # pretrain mode: prompted instances per image, the share prompted by a box (else one point),
    # and the weight of the per-cell category/attribute heads on the trunk (talora.train.pretrain)
    prompts_per_image: int = 4
    box_fraction: float = 0.5
    aux_weight: float = 1.0
    # pretrain mode, random base: the decoder's high-resolution skips (SAM 2's conv_s0 / conv_s1; SAM 1
    # has none) start at zero and stay there for this many steps, so the decoder first learns masks
    # from the image embedding (docs/training.md)
    high_res_hold_steps: int = 0
    val_every: int = 100  # validation + checkpoint every N steps (and at the last step)
    val_images: int = 32  # validation images (sharded across workers)
    memo_gb: float = 4.0  # per worker and memo (train, val): CPU memory for per-image trunk features / inputs
    log_every: int = 10
    amp: bool = False  # autocast on CUDA (opt-in on CPU), in `amp_dtype`
    amp_dtype: str = "float16"  # float16 (+ GradScaler; T4) | bfloat16 (fp32's range, no scaler; A100/H100)
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    storage_path: str = "runs/train"  # local path or URI; checkpoints under <storage_path>/<name>
    name: str = "talora"
    max_failures: int = 0
    num_to_keep: int = 3  # best checkpoints kept (by val_score); the latest is always kept

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(f"train.mode must be one of {MODES}, got {self.mode!r}")
        for name in ("max_steps", "batch_images", "tasks_per_image", "prompts_per_image", "val_every", "num_workers",
                     "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr_schedule not in ("constant", "cosine"):
            problems.append(f"train.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.amp_dtype not in ("float16", "bfloat16"):
            problems.append(f"train.amp_dtype must be 'float16' or 'bfloat16', got {self.amp_dtype!r}")
        if not 0.0 <= self.box_share <= 1.0:
            problems.append(f"train.box_share must be in [0, 1], got {self.box_share}")
        if not 0.0 <= self.box_fraction <= 1.0:
            problems.append(f"train.box_fraction must be in [0, 1], got {self.box_fraction}")
        if self.mode == "pretrain" and self.embeddings:
            problems.append("train.embeddings: the embedding cache holds frozen trunk features; pretraining trains "
                            "the trunk itself, so it cannot use a cache (drop --embeddings)")
        if self.high_res_hold_steps < 0:
            problems.append(f"train.high_res_hold_steps must be >= 0, got {self.high_res_hold_steps}")
        if self.lr <= 0:
            problems.append(f"train.lr must be > 0, got {self.lr}")
        if self.memo_gb < 0:
            problems.append(f"train.memo_gb must be >= 0 (0 = rebuild every image when drawn), got {self.memo_gb}")
        if self.cpus_per_worker <= 0:
            problems.append(f"train.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if not self.train_annotations:
            problems.append("train.train_annotations is required (a COCO instances JSON)")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class RunSpec:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(train_annotations="<unset>"))


def deep_merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied key by key at every depth (a flag sets one field, not a section)."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = deep_merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def load_run_spec(text: str, overrides: dict | None = None) -> RunSpec:
    """A RunSpec from YAML text, strict, with `overrides` ({"train": {...}, "model": {...}}) applied.

    The model section starts from the variant's recommended defaults (`default_config`)."""
    data = yaml.safe_load(text) or {}
    unknown = sorted(set(data) - {"model", "train"})
    if unknown:
        raise ValueError(f"unknown config key(s): {unknown}; expected 'model' and 'train'")
    data = deep_merge(data, overrides or {})
    model_data = data.get("model") or {}
    sam_type = (model_data.get("sam") or {}).get("sam_type", DEFAULT_VARIANT)
    base = to_dict(default_config(sam_type))
    merged = {k: {**base[k], **(model_data.get(k) or {})} if isinstance(base[k], dict) else model_data.get(k, base[k])
              for k in base}
    unknown = sorted(set(model_data) - set(base))
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join('model.' + k for k in unknown)}")
    model = from_dict(ModelConfig, merged, "model.")
    train = from_dict(TrainConfig, data.get("train") or {}, "train.")
    return RunSpec(model, train)


def dump_run_spec(spec: RunSpec) -> str:
    return yaml.safe_dump({"model": to_dict(spec.model), "train": to_dict(spec.train)}, sort_keys=False)


def result_affecting(spec: RunSpec) -> dict:
    """What must not change when a run resumes (scaling and bookkeeping may)."""
    train = dataclasses.asdict(spec.train)
    for free in ("max_steps", "num_workers", "use_gpu", "cpus_per_worker", "storage_path", "max_failures",
                 "log_every", "num_to_keep"):
        train.pop(free)
    return {"model": to_dict(spec.model), "train": train}
