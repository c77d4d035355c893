"""Training data: the built-in procedural shapes, real-data loaders, and the caption tokenizer.

    ds = load_dataset("shapes16")              # or a folder, MNIST IDX, CIFAR-10 batches, an .npz
    x, labels, captions = ds.batch(rng, 64)    # x float32 (B, C, S, S) in [-1, 1]
    tok = Tokenizer.from_captions(ds.all_captions)
"""

from .dataset import ArrayDataset, Dataset, ShapesDataset, caption_of, to_float
from .loaders import BUILTIN, DEFAULT_DATA, load_cifar10, load_dataset, load_folder, load_idx, load_npz
from .shapes import (
    CLASS_NAMES,
    COLORS,
    SHAPES,
    classify_shape_image,
    classify_shape_images,
    make_shapes,
    prompt_accuracy,
    sample_shapes,
)
from .tokenizer import PAD, Tokenizer

__all__ = [
    "ArrayDataset", "Dataset", "ShapesDataset", "caption_of", "to_float",
    "BUILTIN", "DEFAULT_DATA", "load_cifar10", "load_dataset", "load_folder", "load_idx", "load_npz",
    "CLASS_NAMES", "COLORS", "SHAPES", "classify_shape_image", "classify_shape_images", "make_shapes",
    "prompt_accuracy", "sample_shapes", "PAD", "Tokenizer",
]
