"""Image bytes -> a variant's resized input frame, on the CPU and without torch.

The labelling job's decode stage runs as Ray Data tasks: each task's worker imports only this
module (numpy, PIL and the registry), so a fresh worker starts in well under a second and the
model actors, not the decode workers, get the cores while the job starts. The backbones resize
through the same functions, so the job and `TaskAwarePredictor.predict` see the same pixels.
"""

from __future__ import annotations

import posixpath
import re
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from talora.backbones.variants import family_of, get_variant
from talora.io.images import decode_image


def longest_side_shape(height: int, width: int, side: int) -> tuple[int, int]:
    """(h, w) with the long side scaled to `side`, rounded as segment_anything's ResizeLongestSide,
    except that the short side is at least 1 pixel (there, a 4 x 3000 image rounds to 0 x 1024)."""
    scale = side * 1.0 / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_longest_side(image: np.ndarray, side: int) -> np.ndarray:
    """HWC uint8 -> the long side at `side`, bilinear through PIL: ResizeLongestSide.apply_image's
    pixels (it resizes a PIL image the same way; tested equal), without importing torch."""
    h, w = longest_side_shape(image.shape[0], image.shape[1], side)
    return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def resize_square(image: np.ndarray, side: int) -> np.ndarray:
    """HWC uint8 -> side x side (the aspect is not kept), bilinear through PIL: SAM 2's frame."""
    return np.array(Image.fromarray(image).resize((side, side), Image.BILINEAR))


# The frame geometries a family names (Family.frame): how it resizes an image before its encoder
# pads/normalises it on the device.
FRAMES: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {"longest_side": resize_longest_side,
                                                              "square": resize_square}


def image_resizer(sam_type: str) -> Callable[[np.ndarray], np.ndarray]:
    """HWC uint8 -> the variant's resized input frame, without building a model."""
    variant = get_variant(sam_type)
    resize = FRAMES[family_of(sam_type).frame]
    return lambda image: resize(image, variant.image_size)


_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def error_message(uri: str, error: Exception | str) -> str:
    """A bad image's error row as a sentence: "<file name>: <reason>", without object reprs."""
    if isinstance(error, UnidentifiedImageError):
        reason = "cannot identify image format: not an image, or a format Pillow cannot read"
    elif isinstance(error, str):
        reason = error
    else:
        reason = str(error) or type(error).__name__
        if isinstance(error, (KeyError, IndexError, RuntimeError, TypeError, AttributeError)):
            reason = f"{type(error).__name__}: {reason}"  # a fault, not a verdict on the image: keep its kind
    return f"{posixpath.basename(uri.rstrip('/')) or uri}: {_OBJECT_REPR.sub('', reason)}"


def decode_stage(batch: dict, max_pixels: int, sam_type: str) -> dict:
    """Ray Data task: bytes -> the model's resized frame (EXIF applied, RGB, 16-bit scaled) and
    the oriented original size; a bad image becomes an error, never a crash."""
    resize = image_resizer(sam_type)
    resized, heights, widths, errors = [], [], [], []
    for uri, data, error in zip(batch["uri"], batch["bytes"], batch["error"]):
        try:
            if error:
                raise OSError(error)  # the read failed: its message already names the file
            image = decode_image(bytes(data), max_pixels)
            resized.append(resize(image))
            heights.append(image.shape[0])
            widths.append(image.shape[1])
            errors.append("")
        except Exception as e:
            resized.append(np.zeros((1, 1, 3), np.uint8))
            heights.append(0)
            widths.append(0)
            errors.append(str(e) if error else error_message(uri, e))
    out = {k: v for k, v in batch.items() if k != "bytes"}
    return {**out, "resized": np.array(resized + [None], dtype=object)[:-1], "height": np.array(heights),
            "width": np.array(widths), "error": np.array(errors, dtype=object)}
