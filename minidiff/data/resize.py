"""Images to squares: crop to the shorter side (centered or at a random offset), resize to S x S.

Shape legend: N images, C channels, H W stored size, m = min(H, W), S = side after loading.

    crop   (N, C, H, W) -> (N, C, m, m)   centered: top = (H - m) // 2, left = (W - m) // 2
    resize (N, C, m, m) -> (N, C, S, S)   PIL bicubic, one 8-bit plane at a time
"""

from __future__ import annotations

import numpy as np

from .dataset import ArrayDataset

MAX_RESOLUTION = 512  # --resolution's upper limit (a 512 x 512 U-Net is far beyond a CPU's reach already)


def check_resolution(size) -> int | None:
    """size (--resolution S) as an int in [1, MAX_RESOLUTION], or None (the data's own size); one line otherwise."""
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= MAX_RESOLUTION:
        raise ValueError(f"--resolution must be an integer in [1, {MAX_RESOLUTION}] (or left out), got {size!r}")
    return int(size)


def resize_u8(images: np.ndarray, size: int | None, rng=None) -> np.ndarray:
    """uint8 (N, C, H, W) -> (N, C, S, S): crop a square of side m = min(H, W) (centered, or at an offset
    drawn from rng), then bicubic resize (PIL) to S = size (None: S = m, no resize)."""
    from PIL import Image

    n, c, h, w = images.shape
    size = min(h, w) if size is None else size
    if h == w == size:
        return images
    m = min(h, w)
    out = np.empty((n, c, size, size), np.uint8)
    for i in range(n):
        top, left = (h - m) // 2, (w - m) // 2
        if rng is not None:
            top, left = int(rng.integers(0, h - m + 1)), int(rng.integers(0, w - m + 1))
        crop = images[i, :, top:top + m, left:left + m]
        for ch in range(c):  # PIL resizes one 8-bit plane at a time ('L' mode)
            plane = Image.fromarray(np.ascontiguousarray(crop[ch]))
            out[i, ch] = np.asarray(plane if m == size else plane.resize((size, size), Image.BICUBIC))
    return out


def finish(images_u8, labels, class_names, name, image_size, rng=None, source=None):
    """Crop (and resize, with image_size) to squares, wrap in an ArrayDataset (source: the file or folder that
    errors about the labels name)."""
    if image_size is None and min(images_u8.shape[2:]) > MAX_RESOLUTION:  # a U-Net of that size fills any memory
        raise ValueError(f"{source or name}: images of {images_u8.shape[2]}x{images_u8.shape[3]} are larger than "
                         f"{MAX_RESOLUTION} (MAX_RESOLUTION); pass --resolution S (image_size) to resize them")
    if image_size is not None or images_u8.shape[2] != images_u8.shape[3]:
        images_u8 = resize_u8(images_u8, image_size, rng)
    return ArrayDataset(images_u8, labels, class_names, name=name, source=source)
