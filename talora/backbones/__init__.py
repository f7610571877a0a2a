"""The registry of SAM variants: every place that needs a SAM asks here.

A variant names its family (one module under ``talora.backbones`` with a `Backbone` subclass and a
builder per variant), its square input side, and how many encoder blocks its adapted tail has by
default. Adding a family = one new module + its entries below; nothing else changes.

This module imports no model code (argument parsers and configs read it); a family module is
imported the first time one of its variants is built.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import numpy as np
    import torch

    from talora.backbones.base import Backbone


@dataclass(frozen=True)
class Variant:
    name: str  # what --sam-type takes
    family: str  # module under talora.backbones
    image_size: int  # the encoder's square input side (S)
    tail_blocks: int  # default k: encoder blocks adapted per prompt (about an eighth of the trunk, >= 1)
    cpu_preset: bool = False  # a tiny model for CPU tests and the demo: it gets a small hypernet


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("vit_tiny", "sam1", 256, 1, cpu_preset=True),
    Variant("vit_b", "sam1", 1024, 2),
    Variant("vit_l", "sam1", 1024, 3),
    Variant("vit_h", "sam1", 1024, 4),
)}

SAM_TYPES = tuple(VARIANTS)


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown SAM variant {name!r}; expected one of {SAM_TYPES}")
    return VARIANTS[name]


def family_module(family: str):
    return importlib.import_module(f"talora.backbones.{family}")


def build_backbone(sam_type: str, state_dict: dict[str, torch.Tensor] | None = None, source: str = "") -> Backbone:
    """Variant `sam_type`, frozen and in eval mode, with `state_dict` loaded strictly (None = random init).

    `source` names where the weights came from in errors. A state dict of another variant is refused
    before the (possibly 2.5 GB) model is built."""
    variant = get_variant(sam_type)
    if state_dict is not None:
        found = detect_variant(state_dict)
        if found is None:
            raise ValueError(f"checkpoint {source} holds no SAM image encoder weights (expected a {sam_type} checkpoint)")
        if found != sam_type:
            raise ValueError(f"checkpoint {source} has keys for {found}, but --sam-type {sam_type} was given")
    module = family_module(variant.family)
    backbone = module.Backbone(variant, module.build_model(sam_type))
    if state_dict is not None:
        backbone.load_base_state_dict(state_dict, source)
    return backbone.freeze()


def image_resizer(sam_type: str) -> Callable[[np.ndarray], np.ndarray]:
    """HWC uint8 -> the variant's resized input frame, without building a model (CPU stages)."""
    variant = get_variant(sam_type)
    return family_module(variant.family).image_resizer(variant.image_size)


def detect_variant(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The registered variant whose architecture `state_dict` fits, or None if no family knows it."""
    for family in dict.fromkeys(v.family for v in VARIANTS.values()):
        found = family_module(family).detect_variant(state_dict)
        if found is not None:
            return found
    return None
