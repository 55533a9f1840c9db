"""Image files in and out of sampling: chat-image preprocessing, PNG writing, grids.

Preprocessing follows Janus' processor: RGB, resize so the long side is the model's image
size (bicubic, short side at least MIN_SIZE), pad to a centred square with (127, 127, 127),
then scale to [-1, 1] (mean = std = 0.5).
"""
from __future__ import annotations

import math
import os

import numpy as np

BACKGROUND = (127, 127, 127)
MIN_SIZE = 14


def preprocess_image(image, size: int) -> np.ndarray:
    """A PIL image (any mode, any size) -> float32 [size, size, 3] in [-1, 1]."""
    from PIL import Image

    img = image.convert("RGB")
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(round(w * scale), MIN_SIZE), max(round(h * scale), MIN_SIZE)
    img = img.resize((nw, nh), Image.BICUBIC)
    canvas = np.empty((max(nw, nh), max(nw, nh), 3), np.uint8)
    canvas[...] = BACKGROUND
    top, left = (canvas.shape[0] - nh) // 2, (canvas.shape[1] - nw) // 2
    canvas[top:top + nh, left:left + nw] = np.asarray(img)
    return canvas.astype(np.float32) / 127.5 - 1.0


def load_image(path: str, size: int) -> np.ndarray:
    """Reads an image file -> float32 [1, size, size, 3] in [-1, 1]; a clear error if it is not one."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} does not exist.")
    try:
        with Image.open(path) as img:
            img.load()
            return preprocess_image(img, size)[None]
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path!r} is not a readable image (PNG/JPEG/...): {e}") from None


def to_uint8(images) -> np.ndarray:
    """float [N, H, W, 3] in [-1, 1] -> uint8 (clipped; DeepSeek's (x + 1) / 2 * 255, truncated)."""
    x = np.asarray(images, np.float32)
    return np.clip((x + 1.0) / 2.0 * 255.0, 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, cols: int | None = None, gap: int = 2) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one uint8 [rows*H + gaps, cols*W + gaps, 3] image (white gaps)."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * (h + gap):r * (h + gap) + h, q * (w + gap):q * (w + gap) + w] = im
    return grid


def save_images(images, out_dir: str, prefix: str = "image", grid: bool = True) -> list[str]:
    """Writes float [N, H, W, 3] in [-1, 1] as out_dir/{prefix}_{i}.png (+ grid.png). Returns paths."""
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    pixels = to_uint8(images)
    paths = []
    for i, im in enumerate(pixels):
        paths.append(os.path.join(out_dir, f"{prefix}_{i:03d}.png"))
        Image.fromarray(im).save(paths[-1])
    if grid:
        paths.append(os.path.join(out_dir, "grid.png"))
        Image.fromarray(make_grid(pixels)).save(paths[-1])
    return paths
