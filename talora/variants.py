"""The registry of SAM variants: every place that needs to know which SAMs exist asks here.

A variant names its family (one module under ``talora/backbones/`` that builds and runs it), its
square input side, and how many encoder blocks its adapted tail has by default. This module is
plain data with no imports of model code: argument parsers and configs read it, and
`talora.backbones` builds what it names. Adding a family = one module under ``talora/backbones/``
plus its entries here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str  # what --sam-type takes
    family: str  # module under talora.backbones
    image_size: int  # the encoder's square input side (S)
    tail_blocks: int  # default k: encoder blocks adapted per prompt (about an eighth of the encoder, >= 1)
    cpu_preset: bool = False  # a tiny model for CPU tests and the demo: it gets a small hypernet


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("vit_tiny", "sam1", 256, 1, cpu_preset=True),
    Variant("vit_b", "sam1", 1024, 2),
    Variant("vit_l", "sam1", 1024, 3),
    Variant("vit_h", "sam1", 1024, 4),
    # SAM 2.1: the tail is the last k blocks of Hiera's last stage (after its pooling block).
    Variant("sam2_tiny", "sam2", 256, 1, cpu_preset=True),
    Variant("sam2.1_hiera_t", "sam2", 1024, 1),
    Variant("sam2.1_hiera_s", "sam2", 1024, 1),
    Variant("sam2.1_hiera_b+", "sam2", 1024, 2),
    Variant("sam2.1_hiera_l", "sam2", 1024, 3),
)}

SAM_TYPES = tuple(VARIANTS)


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown SAM variant {name!r}; expected one of {SAM_TYPES}")
    return VARIANTS[name]
