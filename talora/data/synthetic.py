"""The demo domain: a seeded, deterministic COCO dataset of coloured objects on textured backgrounds.

Categories are simple silhouettes grouped as supercategory ``vehicle`` (car, bus, truck) and
``fruit`` (apple, banana) beside geometric ``shape``s (circle, square, triangle, star); every
object has a colour attribute (``{"color": "red"}``). Objects overlap; each instance mask is what
stays visible after the objects drawn above it, so occlusion is in the ground truth. Objects are
64-160 px on a 256-px image, i.e. they span 4-10 16-px embedding cells: telling an apple from a
circle or a bus from a truck per cell needs detail that 2-3 cells do not hold (the demo base's
category probe is the measure; docs/results.md).

Layout written by `write_demo_dataset(out, ...)`, for each split in (train, val):
``{out}/{split}/instances.json`` and ``{out}/{split}/images/[shard-XXXXX/]NNNNNN.jpg`` (file_name
is relative to ``{out}/{split}/images``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from talora.io.images import encode_image
from talora.io.storage import StorageOptions, filesystem, write_bytes

CATEGORIES = [
    {"id": 1, "name": "car", "supercategory": "vehicle"},
    {"id": 2, "name": "bus", "supercategory": "vehicle"},
    {"id": 3, "name": "truck", "supercategory": "vehicle"},
    {"id": 4, "name": "apple", "supercategory": "fruit"},
    {"id": 5, "name": "banana", "supercategory": "fruit"},
    {"id": 6, "name": "circle", "supercategory": "shape"},
    {"id": 7, "name": "square", "supercategory": "shape"},
    {"id": 8, "name": "triangle", "supercategory": "shape"},
    {"id": 9, "name": "star", "supercategory": "shape"},
]
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
}
# Another domain for the same generator (a dataset the shipped models never saw): other colour
# names and values, none of the demo's.
PALETTES = {
    "demo": COLORS,
    "other": {
        "orange": (240, 130, 20),
        "cyan": (30, 200, 210),
        "pink": (240, 120, 180),
        "white": (240, 240, 235),
        "brown": (120, 70, 30),
        "black": (25, 25, 30),
    },
}
BACKGROUNDS = ("textured", "checker")


@dataclass(frozen=True)
class SyntheticConfig:
    image_size: int = 256
    min_objects: int = 1
    max_objects: int = 6
    min_size: int = 64  # object extent in px (longest side of its box)
    max_size: int = 160
    min_visible: float = 0.35  # an object less visible than this after occlusion is dropped
    image_format: str = "jpg"  # jpg (q95: 0.4 ms, 34 KB an image) or png (lossless: 4.5 ms, 100 KB)
    palette: str = "demo"  # a key of PALETTES: the colour attribute's values
    background: str = "textured"  # textured (muted low-frequency colour + stripes) | checker (grey tiles)

    def __post_init__(self) -> None:
        if self.palette not in PALETTES:
            raise ValueError(f"palette must be one of {sorted(PALETTES)}, got {self.palette!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {self.background!r}")
        if not 1 <= self.min_size <= self.max_size:
            raise ValueError(f"object sizes need 1 <= min_size <= max_size, got {self.min_size}, {self.max_size}")


# --- silhouettes: polygons in a unit box [0, 1]^2 (x right, y down) ----------------------------


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 24, a0: float = 0.0, a1: float = 2 * math.pi):
    return [(cx + rx * math.cos(a0 + (a1 - a0) * i / n), cy + ry * math.sin(a0 + (a1 - a0) * i / n)) for i in range(n + 1)]


def _wheels(xs: list[float], y: float, r: float) -> list[list[tuple[float, float]]]:
    return [_ellipse(x, y, r, r, 12) for x in xs]


def _silhouette(name: str) -> list[list[tuple[float, float]]]:
    """Polygons (unioned when drawn) of category `name` in the unit box."""
    if name == "car":  # low body, cabin on top, two wheels
        return [[(0, 0.45), (1, 0.45), (1, 0.8), (0, 0.8)], [(0.22, 0.45), (0.32, 0.15), (0.7, 0.15), (0.82, 0.45)],
                *_wheels([0.22, 0.78], 0.82, 0.13)]
    if name == "bus":  # tall long box, three wheels
        return [[(0, 0.1), (1, 0.1), (1, 0.82), (0, 0.82)], *_wheels([0.15, 0.5, 0.85], 0.85, 0.1)]
    if name == "truck":  # cab + separate cargo box on a chassis
        return [[(0, 0.05), (0.66, 0.05), (0.66, 0.72), (0, 0.72)], [(0.7, 0.3), (1, 0.42), (1, 0.72), (0.7, 0.72)],
                [(0, 0.7), (1, 0.7), (1, 0.8), (0, 0.8)], *_wheels([0.18, 0.45, 0.85], 0.84, 0.12)]
    if name == "apple":  # round body, stem, leaf
        return [_ellipse(0.5, 0.58, 0.45, 0.4), [(0.48, 0.2), (0.53, 0.2), (0.55, 0.0), (0.5, 0.0)],
                _ellipse(0.66, 0.12, 0.12, 0.06, 10)]
    if name == "banana":  # crescent: outer arc forward, inner arc back
        outer = _ellipse(0.5, 0.1, 0.5, 0.85, 20, 0.15 * math.pi, 0.85 * math.pi)
        inner = _ellipse(0.5, 0.1, 0.42, 0.55, 20, 0.85 * math.pi, 0.15 * math.pi)
        return [outer + inner]
    if name == "circle":
        return [_ellipse(0.5, 0.5, 0.5, 0.5, 32)]
    if name == "square":
        return [[(0, 0), (1, 0), (1, 1), (0, 1)]]
    if name == "triangle":
        return [[(0.5, 0), (1, 1), (0, 1)]]
    if name == "star":
        return [[(0.5 + (0.5 if i % 2 == 0 else 0.2) * math.sin(i * math.pi / 5),
                  0.52 - (0.5 if i % 2 == 0 else 0.2) * math.cos(i * math.pi / 5)) for i in range(10)]]
    raise ValueError(f"no silhouette for {name!r}")


_ASPECT = {"car": 0.55, "bus": 0.5, "truck": 0.6, "banana": 0.6}  # height / width; others square


def _background(rng: np.random.Generator, size: int, style: str = "textured") -> np.ndarray:
    """Muted, low-frequency colour texture plus stripes (`textured`), or grey tiles of a random
    size and contrast (`checker`): (size, size, 3) float32."""
    if style == "checker":
        tile = int(rng.integers(12, 40))
        light, dark = rng.uniform(150, 210), rng.uniform(60, 120)
        ij = np.add.outer(np.arange(size) // tile, np.arange(size) // tile) % 2
        return np.repeat(np.where(ij == 0, light, dark).astype(np.float32)[:, :, None], 3, axis=2)
    coarse = rng.uniform(70, 170, size=(5, 5, 3)).astype(np.float32)
    grey = coarse.mean(axis=2, keepdims=True)
    coarse = grey + 0.35 * (coarse - grey)  # desaturated, so object colours stand out
    smooth = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.BILINEAR), np.float32)
    stripes = 10 * np.sin(np.arange(size, dtype=np.float32) * rng.uniform(0.1, 0.5) + rng.uniform(0, 6))
    return smooth + stripes[None, :, None]


def render_image(rng: np.random.Generator, config: SyntheticConfig = SyntheticConfig()):
    """One image (H, W, 3) uint8 and its objects [(category, color, visible mask (H, W) bool)]."""
    S = config.image_size
    canvas = _background(rng, S, config.background)
    colors = PALETTES[config.palette]
    noise = rng.standard_normal((S, S, 1), dtype=np.float32)  # pixel noise, shared by background and objects
    drawn = []  # (category, color, full mask) in z-order, bottom first
    for _ in range(int(rng.integers(config.min_objects, config.max_objects + 1))):
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        color_name = list(colors)[int(rng.integers(len(colors)))]
        extent = float(rng.uniform(config.min_size, config.max_size))
        w, h = extent, extent * _ASPECT.get(category["name"], 1.0)
        x0, y0 = rng.uniform(-0.1 * w, S - 0.9 * w), rng.uniform(-0.1 * h, S - 0.9 * h)
        flip = bool(rng.integers(2))
        layer = Image.new("L", (S, S), 0)
        draw = ImageDraw.Draw(layer)
        for poly in _silhouette(category["name"]):
            draw.polygon([(x0 + w * ((1 - px) if flip else px), y0 + h * py) for px, py in poly], fill=1, outline=2)
        pixels = np.asarray(layer)
        full = pixels > 0
        if not full.any():
            continue
        rgb = np.array(colors[color_name], np.float32) + rng.normal(0, 12, size=3).astype(np.float32)
        canvas[full] = rgb
        canvas[pixels == 2] *= 0.55  # a darker outline keeps touching same-colour objects apart
        drawn.append((category, color_name, full))
    canvas += 8 * noise

    objects = []
    covered = np.zeros((S, S), dtype=bool)
    for category, color_name, full in reversed(drawn):  # top first: what is above occludes
        visible = full & ~covered
        covered |= full
        if visible.sum() >= config.min_visible * full.sum() and visible.sum() >= 16:
            objects.append((category, color_name, visible))
    return np.clip(canvas, 0, 255).astype(np.uint8), objects[::-1]


def make_split(num_images: int, seed: int, config: SyntheticConfig = SyntheticConfig(), shard_size: int | None = None):
    """COCO dict + {file_name: PNG bytes} for one split. Deterministic in (num_images, seed, config)."""
    rng = np.random.default_rng(seed)
    images, annotations, files = [], [], {}
    for i in range(num_images):
        image, objects = render_image(rng, config)
        ext = config.image_format
        file_name = f"{i:06d}.{ext}" if not shard_size else f"shard-{i // shard_size:05d}/{i:06d}.{ext}"
        files[file_name] = encode_image(image, ext)
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name, "height": config.image_size, "width": config.image_size})
        for category, color_name, mask in objects:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x, y, w, h = mask_utils.toBbox(rle).tolist()
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category["id"],
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "area": float(mask_utils.area(rle)),
                "bbox": [x, y, w, h],
                "iscrowd": 0,
                "attributes": {"color": color_name},
            })
    coco = {
        "info": {"description": "talora demo domain", "version": "1", "seed": seed},
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    return coco, files


def write_demo_dataset(
    out: str,
    num_train: int,
    num_val: int,
    seed: int = 0,
    config: SyntheticConfig = SyntheticConfig(),
    shard_size: int | None = None,
    storage: StorageOptions | None = None,
) -> dict[str, str]:
    """Writes train and val splits under `out` (any URI); returns {split: instances.json URI}."""
    out = out.rstrip("/")
    written = {}
    for split, n, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1_000_003)):
        coco, files = make_split(n, split_seed, config, shard_size)
        fs, root = filesystem(f"{out}/{split}/images", storage)
        fs.makedirs(root, exist_ok=True)
        for file_name, data in files.items():
            write_bytes(f"{out}/{split}/images/{file_name}", data, storage)
        # The annotations last: a split whose instances.json exists is complete.
        write_bytes(f"{out}/{split}/instances.json", json.dumps(coco).encode(), storage)
        written[split] = f"{out}/{split}/instances.json"
    return written


# The demo datasets this repository's commands and configs name, each as it is generated.
DEMO_DATASETS: dict[str, dict] = {
    "data/demo": {"num_train": 200, "num_val": 40, "seed": 0, "shard_size": 20},  # make demo, the labelling default
    "data/demo-models": {"num_train": 3000, "num_val": 100, "seed": 0},  # configs/demo_cpu.yaml, the quality suite
    "data/demo-models-pretrain-24k": {"num_train": 24000, "num_val": 100, "seed": 0},  # configs/demo_pretrain.yaml
}


def ensure_demo_dataset(annotations: str, log: Callable[[str], None] = print) -> bool:
    """Writes a demo dataset the first time a command points at it: True when `annotations` is a
    split's instances.json of one of DEMO_DATASETS (relative to the working directory) and was
    missing, so the dataset was generated (and said so through `log`)."""
    root = os.path.dirname(os.path.dirname(os.path.normpath(annotations)))
    if root not in DEMO_DATASETS or os.path.exists(annotations):
        return False
    spec = DEMO_DATASETS[root]
    log(f"{annotations} is missing: generating the demo dataset {root}/ ({spec['num_train']} train + "
        f"{spec['num_val']} val images, seed {spec['seed']}; once)")
    write_demo_dataset(root, **spec)
    return True
