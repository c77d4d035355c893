"""Loaders for real data, and load_dataset(spec) which picks one from the spec.

Shape legend: N images, C channels (1 gray or 3 RGB), H W stored size, S = image side after loading.

    spec                                         dataset
    None, "", "shapes16", "shapes32", "shapes"   ShapesDataset, drawn fresh (no download)
    DIR with one subfolder per class             folder of images (PIL), labels = sorted subfolders
    DIR with images and no subfolders            folder of images, unlabelled
    DIR or FILE train-images-idx3-ubyte[.gz]     MNIST / Fashion-MNIST IDX (labels file beside it)
    DIR cifar-10-batches-py (data_batch_1..5)    CIFAR-10 python batches, parsed without unpickling
    FILE.npz with images [, labels, class_names]  arrays, read with allow_pickle=False (data/npz.py)
    {"images": x [, "labels", "class_names"]}   the same arrays in memory (or the images array alone)

Every image ends as uint8 (N, C, S, S) and is scaled to [-1, 1] per batch: x = u8 / 127.5 - 1.
With image_size S (--resolution S) each image is cropped to a square of its shorter side, in the
center (or, with random_crop, at an offset drawn once per image from rng) and resized to S x S
(PIL, bicubic), as diffusers' Resize(S) + CenterCrop(S) / RandomCrop(S). Without image_size,
non-square images are center-cropped to their shorter side; images of mixed sizes need --resolution.

IDX format (big-endian): magic = 0x00 0x00 type ndim, then ndim int32 dims, then the data;
type 0x08 is uint8. Images have ndim 3 (N, H, W), labels ndim 1 (N,).
"""

from __future__ import annotations

import gzip
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .cifar import read_cifar_batch, read_cifar_label_names
from .dataset import ArrayDataset, ShapesDataset
from .npz import MAX_DATA_BYTES, dataset_from_arrays, load_npz
from .resize import MAX_RESOLUTION, check_resolution, finish as _finish, resize_u8

BUILTIN = {"shapes16": 16, "shapes32": 32, "shapes": None}
DEFAULT_DATA = "shapes16"
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
FASHION_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle boot"]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
KINDS = "a built-in name (shapes16, shapes32), a folder of class subfolders, MNIST IDX files, " \
        "a cifar-10-batches-py folder, or an .npz"


# ----------------------------------------------------------------------------- folder of images


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def to_8bit_gray(im):
    """A 16-bit gray image (PIL mode I;16*, or I from a 16-bit PNG) scaled to 8 bits: round(v * 255 / 65535).
    PIL's convert("L") clips instead (a 16-bit gradient came out 99.6% white: issue 17)."""
    from PIL import Image

    a = np.clip(np.asarray(im, np.int64), 0, 65535)
    return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")


MAX_IMAGE_PIXELS = 1 << 26  # 67,108,864 (8192 x 8192): the most one image file may declare (checked on its header)
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error, zlib.error)  # PIL's


def open_image(f: Path):
    """PIL's lazy open of f (the header only: nothing is decoded); one line naming f when the header declares more
    than MAX_IMAGE_PIXELS pixels (a 50000 x 50000 PNG header is a few dozen bytes) or cannot be read."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # PIL's own bomb check warns at 89 M pixels: ours below is stricter
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(f)
    except (Image.DecompressionBombError, *IMAGE_ERRORS) as err:
        raise ValueError(f"cannot read image {f} ({' '.join(str(err).split())}); remove or replace the file"
                         ) from None
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        im.close()
        raise ValueError(f"image {f} declares {w} x {h} = {w * h:,} pixels; at most {MAX_IMAGE_PIXELS:,} per image "
                         "(loaders.MAX_IMAGE_PIXELS): shrink it or remove it")
    return im


def load_folder(path, image_size=None, rng=None) -> ArrayDataset:
    """One subfolder per class (labels in sorted name order), or a flat folder of images (no labels). Every
    header is read first: each image's pixels (MAX_IMAGE_PIXELS) and the decoded total (MAX_DATA_BYTES) are
    checked before anything is decoded."""
    path = Path(path)
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups = [(i, _list_images(d)) for i, d in enumerate(classes)] if classes else [(None, _list_images(path))]
    files = [(lab, f) for lab, fs in groups for f in fs]
    if not files:
        raise ValueError(f"no images found in {path}; expected image files ({'/'.join(sorted(IMAGE_EXTS))}), with "
                         "or without one subfolder per class, MNIST's train-images-idx3-ubyte[.gz] + "
                         "train-labels-idx1-ubyte[.gz], or CIFAR-10's cifar-10-batches-py/data_batch_1..5")
    total = 0
    for _, f in files:  # headers only
        with open_image(f) as im:
            total += im.size[0] * im.size[1] * 3
        if total > MAX_DATA_BYTES:
            raise ValueError(f"the images in {path} declare more than {MAX_DATA_BYTES:,} bytes of pixels (up to "
                             f"{f.name}); at most {MAX_DATA_BYTES:,} (MAX_DATA_BYTES): use fewer or smaller images")
    pics = []
    for _, f in files:
        im = open_image(f)
        try:
            with im:
                pics.append(to_8bit_gray(im) if im.mode.startswith("I") else
                            im.convert("L") if im.mode in ("1", "L") else im.convert("RGB"))
        except IMAGE_ERRORS as err:
            raise ValueError(f"cannot read image {f} ({' '.join(str(err).split())}); remove or replace the file"
                             ) from None
    if len({p.mode for p in pics}) > 1:  # some gray, some color: make all RGB
        pics = [p.convert("RGB") for p in pics]
    sizes = {p.size for p in pics}
    if len(sizes) > 1 and image_size is None:
        raise ValueError(f"images in {path} have mixed sizes {sorted(sizes)[:4]}; "
                         "pass --resolution S (image_size) to crop and resize them all to S x S")
    arrays = []
    for p in pics:
        a = np.asarray(p, np.uint8)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (H, W[, 3]) -> (C, H, W)
        arrays.append(resize_u8(a[None], image_size, rng)[0] if image_size is not None else a)
    labels = None if classes == [] else np.array([lab for lab, _ in files], np.int64)
    names = [d.name for d in classes] if classes else None
    if labels is not None and len(set(labels.tolist())) < len(classes):
        empty = [d.name for i, d in enumerate(classes) if i not in set(labels.tolist())]
        raise ValueError(f"{len(empty)} class folders {empty[:5]}{' ...' if len(empty) > 5 else ''} in {path} hold no "
                         "images; add images or remove them")
    return _finish(np.stack(arrays), labels, names, path.name, image_size, rng, source=str(path))


# ----------------------------------------------------------------------------- MNIST IDX


def read_idx(path, cap: int | None = None) -> np.ndarray:
    """An IDX file (gzipped or raw, streamed) -> uint8 array of its dims. The dims the header declares are
    checked against cap (MAX_DATA_BYTES) before the body is read, and the body must end there: a gzip
    bomb is never decompressed past its declared size."""
    path, cap = Path(path), MAX_DATA_BYTES if cap is None else cap
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\x00\x00" or head[2] != 0x08:
                raise ValueError(f"{path} is not a uint8 IDX file (magic {head[:4].hex()}, want 000008nn)")
            ndim = head[3]
            dim_bytes = f.read(4 * ndim)
            if len(dim_bytes) != 4 * ndim:
                raise ValueError(f"IDX file {path} is truncated or has extra bytes; re-download it")
            dims = np.frombuffer(dim_bytes, ">i4").tolist()
            if any(d < 0 for d in dims):
                raise ValueError(f"IDX file {path} declares negative dims {dims}; re-download it")
            size = 1
            for d in dims:
                size *= d
            if size > cap:
                raise ValueError(f"IDX file {path} declares dims {dims} = {size:,} bytes; at most {cap:,} "
                                 "(MAX_DATA_BYTES)")
            body = f.read(size + 1)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"cannot read IDX file {path} ({err}); re-download it") from None
    if len(body) != size:
        raise ValueError(f"IDX file {path} is truncated or has extra bytes; re-download it")
    return np.frombuffer(body, np.uint8).reshape(dims).copy()


def _idx_partner(images_file: Path) -> Path | None:
    """The labels file beside an images file: '...images-idx3-ubyte' -> '...labels-idx1-ubyte'."""
    base = images_file.name.replace("images", "labels").replace("idx3", "idx1")
    for name in (base, base[:-3] if base.endswith(".gz") else base + ".gz"):
        if (images_file.parent / name).is_file():
            return images_file.parent / name
    return None


def load_idx(path, image_size=None) -> ArrayDataset:
    """MNIST / Fashion-MNIST: a folder with train-images-idx3-ubyte[.gz] (+ labels), or that file."""
    path = Path(path)
    if path.is_dir():
        found = [p for p in sorted(path.glob("train-images*idx3-ubyte*")) or sorted(path.glob("*idx3-ubyte*"))
                 if p.is_file()]  # not a folder or a FIFO (reading one would block)
        if not found:
            raise ValueError(f"no *idx3-ubyte[.gz] images file in {path}")
        path = found[0]
    images = read_idx(path)
    if images.ndim != 3:
        raise ValueError(f"IDX images file {path} must have 3 dims (N, H, W), got {images.shape}")
    partner = _idx_partner(path)
    labels = None if partner is None else read_idx(partner).astype(np.int64)
    if labels is not None and labels.shape != (images.shape[0],):
        raise ValueError(f"labels {partner} hold {labels.shape} entries for {images.shape[0]} images")
    fashion = "fashion" in str(path).lower()
    names = FASHION_NAMES if fashion else [str(i) for i in range(10)]
    if labels is not None and labels.size and labels.max() >= 10:
        names = None
    return _finish(images[:, None], labels, names, "fashion-mnist" if fashion else "mnist", image_size,
                   source=str(partner))


# ----------------------------------------------------------------------------- CIFAR-10


def load_cifar10(path, image_size=None) -> ArrayDataset:
    """CIFAR-10 python batches data_batch_1..5 in path (or in path/cifar-10-batches-py)."""
    path = Path(path)
    if path.is_dir() and (path / "cifar-10-batches-py").is_dir():
        path = path / "cifar-10-batches-py"
    files = [path] if path.is_file() else [p for p in sorted(path.glob("data_batch_[0-9]*")) if p.is_file()]
    if not files:
        raise ValueError(f"no data_batch_1..5 files in {path}")
    parts = [read_cifar_batch(f) for f in files]
    images = np.concatenate([p[0] for p in parts])  # (N, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts])
    names = read_cifar_label_names(path.parent / "batches.meta" if path.is_file() else path / "batches.meta")
    if names is None or len(names) <= labels.max(initial=0):
        names = CIFAR10_NAMES if labels.max(initial=0) < 10 else None
    return _finish(images, labels, names, "cifar10", image_size, source=str(path))


# ----------------------------------------------------------------------------- dispatch


def load_dataset(spec=None, image_size=None, random_crop=False, seed=0):
    """Return the dataset that spec names (see the module docstring for the table); image_size S
    (--resolution) crops and resizes to S x S, random_crop draws the crops from default_rng(seed)."""
    image_size = check_resolution(image_size)
    rng = np.random.default_rng(seed) if random_crop else None
    if isinstance(spec, (dict, np.ndarray)):  # in memory: {"images", "labels", "class_names"} or the images
        return dataset_from_arrays(spec, image_size, rng)
    spec = DEFAULT_DATA if spec in (None, "") else spec
    if isinstance(spec, str) and spec in BUILTIN:
        native = BUILTIN[spec]
        if native is not None and image_size is not None and image_size != native:
            raise ValueError(f"data {spec!r} is {native}x{native}; drop --resolution or use 'shapes{image_size}'")
        return ShapesDataset(native or image_size or 16)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist; pass {KINDS}")
    if path.is_file():
        name = path.name.lower()
        if name.endswith(".npz"):
            return load_npz(path, image_size, rng)
        if "idx3-ubyte" in name or "idx3_ubyte" in name:
            return load_idx(path, image_size)
        if name.startswith("data_batch"):
            return load_cifar10(path, image_size)
        raise ValueError(f"cannot tell what kind of data file {path} is; pass {KINDS}")
    try:
        entries = list(path.iterdir())
    except OSError as err:
        raise ValueError(f"cannot read the folder {path} ({err}); check its permissions") from None
    names = {p.name for p in entries}
    if "cifar-10-batches-py" in names or any(n.startswith("data_batch_") for n in names):
        return load_cifar10(path, image_size)
    if any("idx3-ubyte" in n for n in names):
        return load_idx(path, image_size)
    return load_folder(path, image_size, rng)
