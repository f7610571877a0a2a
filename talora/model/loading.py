"""Model loading: files at any URI -> a frozen backbone, a TaskAwareSam with its parts, the demo defaults.

This is the one module between storage and the model layer: it reads checkpoints, hypernet and
adapter files through `talora.io.storage` (local paths, ``s3://``, ``demo://``, ...) and hands tensors
to the model modules, which never see a URI. Checkpoints load safely: safetensors, or
``torch.load(weights_only=True)``; a missing, corrupt or wrong-variant file is an error naming it.

`ModelSpec` says which model a job runs: a hypernet file, or a static adapter file on a base SAM,
or (for smoke runs) nothing trained at all. On the default variant with no weights given, jobs run
the shipped demo models (``demo://``, inside the package).
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass

import torch
from torch import nn

from talora.adapters.hypernet import TaskAwareHyperNet
from talora.backbones import build_backbone, check_variant
from talora.backbones.base import Backbone
from talora.backbones.variants import DEFAULT_VARIANT
from talora.config import ModelConfig, default_config, dump_config, load_config
from talora.core.lora import Adapter, LoraTarget
from talora.core.text import TextEncoder
from talora.io.storage import StorageOptions, local_copy, read_bytes
from talora.io.weights import parse_safetensors, read_shapes, read_weights, write_weights
from talora.model.files import load_adapter
from talora.model.task_aware_sam import TaskAwareSam, build_presence_head

HYPERNET_FORMAT = "talora.hypernet/1"

# The shipped demo models (make demo-models): the pretrained default-variant base and a hypernet trained on it.
DEMO_SAM_CHECKPOINT = f"demo://sam_{DEFAULT_VARIANT}.safetensors"
DEMO_HYPERNET = "demo://hypernet.safetensors"


# --- the base SAM ------------------------------------------------------------------------------------


def read_state_dict(uri: str, storage: StorageOptions | None = None) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` or a ``torch.save`` file, never unpickling code."""
    data = read_bytes(uri, storage)
    if uri.endswith(".safetensors"):
        return parse_safetensors(data, uri)[0]
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {uri} is corrupt or not a weights file: {type(e).__name__}: {e}") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # training checkpoints that wrap the weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {uri} does not hold a state dict of tensors")
    return state


def load_backbone(sam_type: str, checkpoint: str | None = None, storage: StorageOptions | None = None) -> Backbone:
    """SAM `sam_type`, frozen, with weights from `checkpoint` (any URI; None = random init).

    The checkpoint is read and checked against the variant before the model is built."""
    state = None if checkpoint is None else read_state_dict(checkpoint, storage)
    return build_backbone(sam_type, state, checkpoint or "")


def check_checkpoint(uri: str, sam_type: str, storage: StorageOptions | None = None) -> None:
    """Fails (naming `uri`) unless it holds weights of `sam_type`; builds nothing. A safetensors file
    is checked from its header (shapes suffice); a torch.save file has to be read whole."""
    state = read_shapes(uri, storage) if uri.endswith(".safetensors") else read_state_dict(uri, storage)
    check_variant(state, sam_type, uri)


def save_backbone(backbone: Backbone, uri: str, storage: StorageOptions | None = None) -> None:
    """The base SAM weights as safetensors (LoRA wrappers, if injected, are looked through)."""
    write_weights(uri, backbone.base_state_dict(), {"format": "talora.sam/1"}, storage)


# --- TaskAwareSam --------------------------------------------------------------------------------------


def build_task_aware_sam(
    config: ModelConfig,
    text_encoder: TextEncoder | None = None,
    storage: StorageOptions | None = None,
    fixed_adapter: Adapter | None = None,
) -> TaskAwareSam:
    """SAM (from config.sam) + LoRA targets + an untrained hypernet (bias-HyperInit) + presence head."""
    backbone = load_backbone(config.sam.sam_type, config.sam.checkpoint, storage)
    return assemble(config, backbone, find_targets(backbone, config), text_encoder, fixed_adapter)


def find_targets(backbone: Backbone, config: ModelConfig) -> list[LoraTarget]:
    """The LoRA targets `config` names on `backbone`; none at all is an error."""
    targets = backbone.find_targets(config.lora, config.tail_blocks)
    if not targets:
        raise ValueError(f"no LoRA targets found for patterns {sorted(config.lora.target_patterns)} and "
                         f"components {config.lora}")
    return targets


def assemble(config: ModelConfig, backbone: Backbone, targets: list[LoraTarget], text_encoder: TextEncoder | None,
             fixed_adapter: Adapter | None) -> TaskAwareSam:
    hypernet = TaskAwareHyperNet(targets, config.hypernet, config.lora.rank, config.lora.scale)
    # A detector has a presence token of its own, which its adapters reach; a decoder gets a head on its IoU token.
    presence = nn.Identity() if backbone.detector else build_presence_head(backbone.decoder_dim)
    return TaskAwareSam(backbone, targets, hypernet, presence, config, text_encoder, fixed_adapter)


def save_hypernet(model: TaskAwareSam, uri: str, storage: StorageOptions | None = None) -> None:
    """Hypernet + presence head as safetensors; the header carries the resolved config and targets."""
    metadata = {
        "format": HYPERNET_FORMAT,
        "config": dump_config(model.config),
        "targets": json.dumps([t.name for t in model.targets]),
        "digest": model.hypernet.digest(),
    }
    write_weights(uri, model.trainable_modules().state_dict(), metadata, storage)


def read_hypernet_file(uri: str, storage: StorageOptions | None = None) -> tuple[ModelConfig, dict, dict[str, torch.Tensor]]:
    """(resolved config, header, weights) of a hypernet file; a non-talora file is a clear error."""
    state, header = read_weights(uri, storage)
    if header.get("format") != HYPERNET_FORMAT:
        raise ValueError(f"{uri} is not a talora hypernet file (format {header.get('format')!r}, expected {HYPERNET_FORMAT!r})")
    return load_config(header["config"]), header, state


def load_task_aware_sam(
    hypernet_uri: str,
    sam_checkpoint: str | None = None,
    text_encoder: TextEncoder | None = None,
    storage: StorageOptions | None = None,
) -> TaskAwareSam:
    """The model a hypernet file was trained for, with its weights; `sam_checkpoint` overrides the base's URI."""
    config, header, state = read_hypernet_file(hypernet_uri, storage)
    if sam_checkpoint is not None:
        config = dataclasses.replace(config, sam=dataclasses.replace(config.sam, checkpoint=sam_checkpoint))
    model = build_task_aware_sam(config, text_encoder, storage)
    expected = json.loads(header["targets"])
    if expected != [t.name for t in model.targets]:
        raise ValueError(f"hypernet {hypernet_uri} was trained for other LoRA targets than this {config.sam.sam_type} model finds")
    model.load_hypernet_weights(state, hypernet_uri)
    return model


# --- what a job runs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Which model labels: a hypernet file, or a static adapter file on a base SAM."""

    sam_type: str = DEFAULT_VARIANT
    sam_checkpoint: str | None = None
    hypernet: str | None = None
    adapter: str | None = None

    def files(self) -> dict[str, str]:
        """The model files given, by field name."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v and k != "sam_type"}


def model_spec(sam_type: str, sam_checkpoint: str | None = None, hypernet: str | None = None,
               adapter: str | None = None, untrained: bool = False) -> ModelSpec:
    """The ModelSpec users mean: on the default variant with no weights given, the shipped demo models (the
    hypernet names its base; an adapter gets the demo base). `untrained`: a random base and the
    untrained hypernet (Delta W = 0), for smoke runs."""
    if untrained:
        if hypernet or adapter:
            raise ValueError("--untrained runs without trained weights; drop --hypernet/--adapter")
        return ModelSpec(sam_type, sam_checkpoint)
    if hypernet and adapter:
        raise ValueError("give --hypernet or --adapter, not both")
    if sam_type == DEFAULT_VARIANT and not hypernet and not adapter:
        return ModelSpec(sam_type, sam_checkpoint, DEMO_HYPERNET)
    if sam_type == DEFAULT_VARIANT and adapter and not sam_checkpoint:
        return ModelSpec(sam_type, DEMO_SAM_CHECKPOINT, None, adapter)
    return ModelSpec(sam_type, sam_checkpoint, hypernet, adapter)


def load_model(spec: ModelSpec, storage: StorageOptions | None = None) -> TaskAwareSam:
    """The TaskAwareSam for `spec`, remote model files copied once per node."""
    checkpoint = local_copy(spec.sam_checkpoint, storage) if spec.sam_checkpoint else None
    if spec.hypernet:
        return load_task_aware_sam(local_copy(spec.hypernet, storage), checkpoint, TextEncoder(), storage)
    torch.manual_seed(0)  # untrained parts are the same in every actor and every run
    config = default_config(spec.sam_type, checkpoint=checkpoint)
    if spec.adapter:
        backbone = load_backbone(spec.sam_type, checkpoint, storage)
        targets = find_targets(backbone, config)
        adapter, _ = load_adapter(local_copy(spec.adapter, storage), targets, spec.sam_type, storage)
        return assemble(config, backbone, targets, None, adapter)
    # no trained weights at all: the untrained hypernet (Delta W = 0), for smoke runs
    return build_task_aware_sam(config, TextEncoder(), storage)
