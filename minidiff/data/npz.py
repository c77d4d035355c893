"""An .npz of arrays as a dataset: images, optional labels, optional class names (read without pickle).

Shape legend: N images, C channels (1 or 3), H W image size.

    images        uint8 0..255, or float in [0, 1] (stored as u8 = round(255 x)), one of
                  (N, H, W)       gray
                  (N, H, W, C)    NHWC, when the last axis is 1 or 3 (checked first)
                  (N, C, H, W)    NCHW, when axis 1 is 1 or 3 and the last is not
    labels        integers (N,) >= 0                                  (optional)
    class_names   str (K,), K = max(labels) + 1, names of the labels  (optional; captions for text models)

    np.savez("mine.npz", images=x, labels=y, class_names=np.array(["cat", "dog"]))

The same arrays in memory (a dict with those keys, or the images array alone) give the same dataset:
load_dataset({"images": x, "labels": y}) and train(cfg, data=...) read them through dataset_from_arrays.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .dataset import check_labels
from .resize import finish

KEYS = ("images", "labels", "class_names")
HOW = "np.savez(path, images=uint8 or [0, 1] float array, labels=int array, class_names=str array)"


def images_to_nchw_u8(images: np.ndarray, where: str) -> np.ndarray:
    """images (N, H, W), (N, H, W, C) or (N, C, H, W), uint8 or float in [0, 1] -> uint8 (N, C, H, W)."""
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[3] in (1, 3):
        images = images.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    elif not (images.ndim == 4 and images.shape[1] in (1, 3)):
        raise ValueError(f"{where}: images must be (N, H, W), NHWC or NCHW with C 1 or 3, got {images.shape}")
    if np.issubdtype(images.dtype, np.floating):
        lo, hi = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
            raise ValueError(f"{where}: float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
        images = np.round(images.astype(np.float64) * 255.0).astype(np.uint8)
    elif images.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8 or float in [0, 1], got {images.dtype}")
    return np.ascontiguousarray(images)


MAX_DATA_BYTES = 2 << 30  # 2 GiB: the most one data file (or .npz member, or IDX body) may declare


class TooLarge(ValueError):
    """A file declares more than a stated cap (its own message, not wrapped)."""


def check_npz_sizes(path: Path, cap: int = MAX_DATA_BYTES) -> None:
    """ValueError naming the file and the cap if an .npz member's header declares more than cap bytes
    (read from each .npy header, before anything is allocated)."""
    with zipfile.ZipFile(path) as zf:
        total = 0
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
            nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
            total += nbytes
            if total > cap:
                raise TooLarge(f"{path}: member {info.filename[:-4]!r} declares {shape} {dtype} = {nbytes:,} "
                                 f"bytes; the data may hold at most {cap:,} bytes (MAX_DATA_BYTES)")


def load_npz(path, image_size=None, rng=None):
    """The ArrayDataset held in an .npz (see the module docstring for the keys and layouts)."""
    path = Path(path)
    try:
        check_npz_sizes(path)
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except TooLarge:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"cannot read {path} as an .npz without pickle ({err}); save it with {HOW}") from None
    return dataset_from_arrays(arrays, image_size, rng, where=str(path), name=path.stem, source=str(path))


def dataset_from_arrays(arrays, image_size=None, rng=None, where: str = "data", name: str = "arrays",
                        source: str | None = None):
    """The ArrayDataset of {"images": x[, "labels": y][, "class_names": names]} or of an images array alone
    (the layouts of the module docstring)."""
    arrays = {"images": arrays} if isinstance(arrays, np.ndarray) else dict(arrays)
    if "images" not in arrays or set(arrays) - set(KEYS):
        raise ValueError(f"{where} must hold the key 'images' and optionally 'labels' and 'class_names', got keys "
                         f"{sorted(arrays)[:10]}"
                         f"{f' ... ({len(arrays)} in all)' if len(arrays) > 10 else ''}")
    images, labels, names = (None if arrays.get(k) is None else np.asarray(arrays[k]) for k in KEYS)
    if images.shape[:1] == (0,):
        raise ValueError(f"{where} holds no images")
    images = images_to_nchw_u8(images, where)
    if labels is not None and (labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"{where}: labels must be integers of shape (N,) = ({images.shape[0]},), got "
                         f"{labels.dtype} {labels.shape}")
    if labels is not None:
        check_labels(labels, where)  # before class_names' count (max(labels) + 1) is compared
    if names is not None:
        names = check_class_names(names, labels, where)
    return finish(images, labels, names, name, image_size, rng, source=source)


def check_class_names(names, labels, where: str) -> list:
    """names as a list of str, one per class 0..max(labels); one line when they do not match the labels."""
    names = np.asarray(names)
    if labels is None:
        raise ValueError(f"{where}: class_names needs labels (the names are the names of the labels)")
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise ValueError(f"{where}: class_names must be a 1-d array of strings, got {names.dtype} {names.shape}")
    k = int(np.max(labels)) + 1 if len(labels) else 0
    if len(names) != k:
        raise ValueError(f"{where}: class_names has {len(names)} names but the labels name {k} classes "
                         f"(0..{k - 1}); give one name per class")
    return [str(n) for n in names.tolist()]
