"""Encoded images (JPEG, PNG, ...) to uint8 arrays, the form a model batch takes."""

from __future__ import annotations

import io

import numpy as np

# Extensions decoded as images, in WebDataset shards; HF `Image` columns are decoded the same way.
EXTENSIONS = frozenset({"jpg", "jpeg", "png", "ppm", "pgm", "pbm", "bmp", "webp", "tif", "tiff"})

# Modes kept as they are (one, two or four channels of uint8); any other mode (palette, 1-bit,
# 16-bit, CMYK, ...) is converted to RGB, so every image arrives as uint8.
_KEPT = frozenset({"L", "LA", "RGB", "RGBA"})


def decode_image(data: bytes) -> np.ndarray:
    """(H, W) for grayscale, (H, W, C) otherwise, uint8: the layout of PIL and numpy (and of
    webdataset's "rgb8" decoder); `batch[name].permute(0, 3, 1, 2)` gives torchvision's NCHW."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decodes here, so a damaged file fails inside this call
        if image.mode not in _KEPT:
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        return np.asarray(image, dtype=np.uint8)
