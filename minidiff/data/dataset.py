"""Datasets: a fixed array of images, or the built-in shapes drawn fresh every batch.

Shape legend: N images in the set, B batch size, C channels (1 or 3), H = W = S image side.

    x = u8 / 127.5 - 1          uint8 0..255  ->  float32 [-1, 1]   (0 -> -1, 255 -> 1)

Both classes share one interface, which is all the train loop uses:
    images        float32 (N, C, S, S) in [-1, 1], or None for the infinite built-in set
    labels        int64 (N,) or None;  captions: list of N str or None
    num_classes, class_names, image_size, channels, infinite, name
    all_captions  the distinct captions the set can produce (to build the tokenizer from)
    has_captions  True when the captions come from real class names (not the label numbers "0", "1", ...)
    batch(rng, B) -> (x float32 (B, C, S, S), labels int64 (B,) or None, captions list[str] or None)
"""

from __future__ import annotations

import numpy as np

from . import shapes


def to_float(u8: np.ndarray) -> np.ndarray:
    """x = u8 / 127.5 - 1, float32, same shape."""
    return u8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def caption_of(class_name: str) -> str:
    """The caption of a class: its name in lowercase words ('golden_retriever' -> 'golden retriever')."""
    return " ".join(str(class_name).replace("_", " ").lower().split())


def _check_batch_args(rng, n) -> int:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (batch size) must be a positive integer, got {n!r}")
    return int(n)


MAX_CLASSES = 10_000  # labels 0..K-1 with K at most this (a label of 2**40 would make 2**40 class names)


def check_labels(labels: np.ndarray, where: str) -> None:
    """Labels must be 0..K-1 with K <= MAX_CLASSES: checked before one class name per label up to the largest is
    made (a label of 2**40 would make 2**40 names); one line naming `where` (the file) otherwise."""
    if labels.size and labels.min() < 0:
        raise ValueError(f"{where}: labels must be >= 0, got a label of {labels.min()}")
    if labels.size and labels.max() >= MAX_CLASSES:
        raise ValueError(f"{where}: a label of {labels.max()} means {int(labels.max()) + 1} classes; labels must be "
                         f"0..K-1 with K <= {MAX_CLASSES} (MAX_CLASSES)")


class ArrayDataset:
    """Images held in memory as uint8 (N, C, S, S); converted to float per batch (4x less memory)."""

    infinite = False

    def __init__(self, images_u8, labels=None, class_names=None, name: str = "array", source: str | None = None):
        images_u8 = np.asarray(images_u8)
        if images_u8.dtype != np.uint8 or images_u8.ndim != 4 or images_u8.shape[1] not in (1, 3):
            raise ValueError(f"images must be uint8 (N, C, H, W) with C 1 or 3, got {images_u8.dtype} "
                             f"{images_u8.shape}")
        n, c, h, w = images_u8.shape
        if n == 0:
            raise ValueError(f"dataset {name!r} holds no images; give it at least one")
        if h != w:
            raise ValueError(f"images must be square, got {h}x{w}; pass --resolution S (image_size) to crop them")
        self.data = np.ascontiguousarray(images_u8)  # (N, C, S, S) uint8
        self.name = name
        self.channels, self.image_size = c, h
        self._images = None  # float32 copy, made on first use of .images
        self.labels = None
        self.class_names = None
        self.num_classes = 0
        self.captions = None
        self.all_captions = []
        self.has_captions = class_names is not None and labels is not None  # numbers alone are no captions
        where = source or f"dataset {name!r}"  # the file the labels came from, where there is one
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"{where}: labels must be integers of shape (N,) = ({n},), got {labels.dtype} "
                                 f"{labels.shape}")
            check_labels(labels, where)
            self.labels = labels.astype(np.int64)
            self.num_classes = int(self.labels.max()) + 1
            if class_names is None:
                class_names = [str(i) for i in range(self.num_classes)]
            class_names = [str(c) for c in class_names]
            if len(class_names) > MAX_CLASSES:
                raise ValueError(f"{where}: {len(class_names)} class names; at most {MAX_CLASSES} "
                                 "(MAX_CLASSES)")
            if len(class_names) < self.num_classes:
                raise ValueError(f"{where}: class_names has {len(class_names)} names but labels go up to "
                                 f"{self.num_classes - 1}")
            self.num_classes = len(class_names)
            self.class_names = class_names
            self.all_captions = [caption_of(c) for c in class_names]
            self.captions = [self.all_captions[i] for i in self.labels.tolist()]

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def images(self) -> np.ndarray:
        """All images as float32 (N, C, S, S) in [-1, 1] (computed once, then cached)."""
        if self._images is None:
            self._images = to_float(self.data)
        return self._images

    def batch(self, rng: np.random.Generator, n: int):
        """B images drawn uniformly with replacement: idx = rng.integers(0, N, B)."""
        n = _check_batch_args(rng, n)
        idx = rng.integers(0, len(self), n)  # (B,)
        x = to_float(self.data[idx])  # (B, C, S, S)
        labels = None if self.labels is None else self.labels[idx]
        captions = None if self.captions is None else [self.captions[i] for i in idx.tolist()]
        return x, labels, captions

    def __repr__(self):
        return (f"ArrayDataset({self.name!r}, n={len(self)}, channels={self.channels}, "
                f"image_size={self.image_size}, num_classes={self.num_classes})")


class ShapesDataset:
    """The built-in set: every batch is drawn fresh from rng by shapes.sample_shapes (infinite data)."""

    infinite = True
    has_captions = True
    images = None  # no fixed image array: there is no end to it
    labels = None
    captions = None

    def __init__(self, size: int = 16):
        self.image_size = shapes.check_size(size)
        self.name = f"shapes{self.image_size}"
        self.channels = 3
        self.num_classes = shapes.NUM_CLASSES
        self.class_names = list(shapes.CLASS_NAMES)
        self.all_captions = list(shapes.ALL_CAPTIONS)

    def batch(self, rng: np.random.Generator, n: int):
        """(x float32 (B, 3, S, S), labels int64 (B,), captions list of B str), all fresh."""
        n = _check_batch_args(rng, n)
        d = shapes.sample_shapes(rng, n, self.image_size)
        x = to_float(d["images"].transpose(0, 3, 1, 2))  # (B, S, S, 3) -> (B, 3, S, S)
        return x, d["labels"], d["captions"]

    def __repr__(self):
        return f"ShapesDataset(size={self.image_size})"


# one name for "a dataset", whichever kind
Dataset = ArrayDataset | ShapesDataset
