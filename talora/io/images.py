"""Images as bytes: decoding anything Pillow reads to RGB, encoding arrays and matplotlib figures.

Pillow and numpy only (matplotlib where a figure is drawn): the labelling job's decode workers
import this without torch.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 100_000_000


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB: EXIF orientation applied, grey/RGBA/CMYK/16-bit
    converted (16-bit scaled to 8-bit, not clipped); an animated image gives its first frame.
    An image over `max_pixels` is refused from its header, before its pixels are decoded."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(f"image of {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        # 16-bit modes span 0..65535 whatever this image's own range (a dark image stays dark);
        # 32-bit "I" carries no range, so values above 8 bits mean 16-bit data.
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray((array / top * 255.0 + 0.5).astype(np.uint8))
    return np.asarray(image.convert("RGB"))


def encode_image(image: np.ndarray, ext: str) -> bytes:
    """HWC uint8 -> PNG (fast, lossless) or JPEG (quality 95) bytes, by extension."""
    buffer = io.BytesIO()
    if ext == "png":
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    elif ext in ("jpg", "jpeg"):
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    else:
        raise ValueError(f"image format {ext!r}: expected png or jpg")
    return buffer.getvalue()


def pyplot():
    """matplotlib's pyplot on the Agg backend (files, no display)."""
    import matplotlib  # imported where a figure is drawn: decode workers and jobs that draw nothing never load it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    return plt


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes, laid out tight; the figure is closed."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    pyplot().close(fig)
    return buffer.getvalue()
