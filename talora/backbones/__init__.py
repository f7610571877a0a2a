"""Building the registered SAM variants (talora.backbones.variants): one module per family, behind `Backbone`.

A family module is imported the first time one of its variants is built, so importing this
package costs nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from talora.backbones.variants import FAMILIES, VARIANTS, get_variant, install_line

if TYPE_CHECKING:  # annotations only: the registry is read without torch or any family's model code
    import torch

    from talora.backbones.base import Backbone


def family_module(family: str):
    """The family's module; a family whose packages are not installed is an error that says how to install them."""
    missing = missing_modules(family)
    if missing:
        entry = FAMILIES[family]
        raise ModuleNotFoundError(f"{entry.title} needs {', '.join(missing)}, which this python does not have: "
                                  f"{install_line(entry)} (make setup does)")
    return importlib.import_module(f"talora.backbones.{family}")


def missing_modules(family: str) -> list[str]:
    return [m for m in FAMILIES[family].modules if importlib.util.find_spec(m) is None]


def build_backbone(sam_type: str, state_dict: dict[str, torch.Tensor] | None = None, source: str = "") -> Backbone:
    """Variant `sam_type`, frozen and in eval mode, with `state_dict` loaded strictly (None = random init).

    `source` names where the weights came from in errors. A state dict of another variant is refused
    before the (possibly 2.5 GB) model is built."""
    variant = get_variant(sam_type)
    if state_dict is not None:
        check_variant(state_dict, sam_type, source)
    module = family_module(variant.family)
    backbone = module.Backbone(variant, module.build_model(sam_type))
    if state_dict is not None:
        backbone.load_base_state_dict(state_dict, source)
    return backbone.freeze()


def check_variant(state_dict: dict[str, torch.Tensor], sam_type: str, source: str) -> None:
    """Refuses weights that are no SAM, or another variant's, naming `source` and both variants."""
    found = detect_variant(state_dict)
    if found is None:
        raise ValueError(f"checkpoint {source} holds no SAM image encoder weights (expected a {sam_type} checkpoint)")
    if found != sam_type:
        raise ValueError(f"checkpoint {source} has keys for {found}, but --sam-type {sam_type} was given")


def detect_variant(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The registered variant whose architecture `state_dict` fits, or None if no family knows it."""
    for family in dict.fromkeys(v.family for v in VARIANTS.values()):
        if missing_modules(family):  # not installed: its checkpoints cannot be run here either
            continue
        found = family_module(family).detect_variant(state_dict)
        if found is not None:
            return found
    return None
