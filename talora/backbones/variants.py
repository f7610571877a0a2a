"""The registry of SAM families and variants: every place that needs to know which SAMs exist asks here.

A family is one module under ``talora/backbones/`` that builds and runs its variants; its entry
says what it needs installed (the dependency check, the GPU carry), how it frames an image (a
geometry of `talora.backbones.frames`) and the base name its PEFT exports carry. A variant names
its family, its square input side, and how many encoder blocks its adapted tail has by default.

This module is plain data, standard library only: argument parsers and configs read it, the GPU
carry loads it by path before talora's dependencies exist, and `talora.backbones` builds what it
names. Adding a family = one module under ``talora/backbones/`` plus its entries here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str  # module under talora.backbones
    title: str  # what users call it, in messages and reports
    modules: tuple[str, ...]  # Python modules it imports (talora refuses to start without them)
    requirements: tuple[str, ...]  # the pip requirements that provide them
    frame: str  # how it frames an image: a geometry of talora.backbones.frames.FRAMES
    peft_base: str  # base_model_name_or_path of its PEFT exports ({variant}: the variant's name)
    build_env: tuple[tuple[str, str], ...] = ()  # environment for building its wheel from an sdist
    no_deps: bool = False  # its requirements install without their own dependencies (pip --no-deps)
    # A detector finds every instance of a text prompt itself (queries -> masks, scores, presence):
    # no point grid, no point or box prompts.
    detector: bool = False


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sam1", "SAM", ("segment_anything",), ("segment-anything",), "longest_side",
           "segment_anything/sam_{variant}"),
    Family("sam2", "SAM 2.1", ("sam2", "hydra"), ("sam2",), "square", "sam2/{variant}",
           build_env=(("SAM2_BUILD_CUDA", "0"),)),  # its CUDA extension only speeds up video post-processing
    # SAM 3's wheel pins numpy / huggingface_hub below what talora runs: installed without its
    # dependencies, with what its image model imports; open_clip_torch ships the BPE vocabulary it reads.
    Family("sam3", "SAM 3", ("sam3", "timm", "ftfy", "einops", "wcwidth", "open_clip"),
           ("sam3==0.1.4", "timm>=1.0.17", "ftfy>=6.1,<6.4", "einops>=0.8,<0.9", "wcwidth", "open_clip_torch>=3"),
           "square", "sam3/{variant}", no_deps=True, detector=True),
)}


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
    # SAM 3: the tail is the last k ViT blocks (the last one global) and the neck; a detector after it.
    Variant("sam3_tiny", "sam3", 224, 1, cpu_preset=True),
    Variant("sam3", "sam3", 1008, 4),
)}

SAM_TYPES = tuple(VARIANTS)
# What runs when no --sam-type is given: the CPU preset the demo models were trained on.
DEFAULT_VARIANT = "vit_tiny"


def install_line(family: Family) -> str:
    """The pip command that installs what `family` imports (make setup runs it)."""
    flags = "--no-deps " if family.no_deps else ""
    return f"pip install {flags}" + " ".join(f"'{r}'" for r in family.requirements)


def family_of(name: str) -> Family:
    return FAMILIES[get_variant(name).family]


def cpu_preset(family: str) -> str:
    """The family's tiny CPU preset (tests, dry runs)."""
    return next(v.name for v in VARIANTS.values() if v.family == family and v.cpu_preset)


def largest(family: str) -> str:
    """The family's largest variant (registered last)."""
    return [v.name for v in VARIANTS.values() if v.family == family][-1]


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown SAM variant {name!r}; expected one of {SAM_TYPES}")
    return VARIANTS[name]
