"""Dataset loaders, each tested on small files the test writes. Nothing is ever unpickled."""

import gzip
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from minidiff.data import ArrayDataset, ShapesDataset, load_dataset
from minidiff.data.cifar import scan_pickle

RNG = np.random.default_rng(0)


def rand_u8(*shape):
    return RNG.integers(0, 256, shape).astype(np.uint8)


# ----------------------------------------------------------------------------- built-in, Dataset


def test_builtin_names_and_default():
    ds = load_dataset()
    assert isinstance(ds, ShapesDataset) and ds.image_size == 16 and ds.channels == 3 and ds.num_classes == 9
    assert load_dataset("shapes32").image_size == 32
    assert load_dataset("shapes", image_size=32).image_size == 32
    with pytest.raises(ValueError, match="shapes16.*16x16"):
        load_dataset("shapes16", image_size=32)
    x, labels, captions = ds.batch(np.random.default_rng(0), 5)
    assert x.dtype == np.float32 and x.shape == (5, 3, 16, 16) and -1 <= x.min() and x.max() <= 1
    assert labels.shape == (5,) and len(captions) == 5
    x2 = ds.batch(np.random.default_rng(1), 5)[0]
    assert not np.array_equal(x, x2)  # fresh images per draw
    np.testing.assert_array_equal(x, ds.batch(np.random.default_rng(0), 5)[0])  # but seeded


def test_array_dataset_scaling_and_batch():
    u8 = np.array([0, 255, 127, 128], np.uint8).reshape(4, 1, 1, 1).repeat(2, 2).repeat(2, 3)
    ds = ArrayDataset(u8, labels=np.array([0, 1, 1, 2]), class_names=["a_b", "c", "d"])
    assert ds.images.dtype == np.float32 and ds.images.shape == (4, 1, 2, 2)
    np.testing.assert_allclose(ds.images[:, 0, 0, 0], [-1.0, 1.0, 127 / 127.5 - 1, 128 / 127.5 - 1],
                               rtol=0, atol=2**-23)  # float32 x/127.5 - 1 near 0: error <= ulp(1) = 2^-23
    assert ds.captions == ["a b", "c", "c", "d"] and ds.all_captions == ["a b", "c", "d"]
    x, lab, cap = ds.batch(np.random.default_rng(3), 16)
    idx = np.random.default_rng(3).integers(0, 4, 16)
    np.testing.assert_array_equal(lab, ds.labels[idx])
    np.testing.assert_array_equal(x, ds.images[idx])
    assert cap == [ds.captions[i] for i in idx]
    with pytest.raises(ValueError, match="batch size"):
        ds.batch(np.random.default_rng(0), 0)


def test_missing_path_and_unknown_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*shapes16"):
        load_dataset(str(tmp_path / "nope"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="cannot tell"):
        load_dataset(str(tmp_path / "x.txt"))


# ----------------------------------------------------------------------------- folder


def write_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_folder_of_class_subfolders(tmp_path):
    imgs = {"cat": [rand_u8(8, 8, 3) for _ in range(2)], "dog_big": [rand_u8(8, 8, 3) for _ in range(3)]}
    for cls, arrs in imgs.items():
        for i, a in enumerate(arrs):
            write_png(tmp_path / cls / f"{i}.png", a)
    ds = load_dataset(str(tmp_path))
    assert ds.class_names == ["cat", "dog_big"] and ds.num_classes == 2 and len(ds) == 5
    assert ds.labels.tolist() == [0, 0, 1, 1, 1] and ds.captions[-1] == "dog big"
    want = np.stack(imgs["cat"] + imgs["dog_big"]).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(ds.data, want)  # PNG is lossless: exact pixels
    np.testing.assert_allclose(ds.images, want / 127.5 - 1, atol=1e-6)
    # resizing on request
    ds16 = load_dataset(str(tmp_path), image_size=16)
    assert ds16.images.shape == (5, 3, 16, 16)


def test_folder_gray_flat_and_errors(tmp_path):
    for i in range(3):
        write_png(tmp_path / "flat" / f"{i}.png", rand_u8(6, 6))
    ds = load_dataset(str(tmp_path / "flat"))
    assert ds.channels == 1 and ds.labels is None and ds.captions is None and len(ds) == 3
    # mixed sizes
    write_png(tmp_path / "mixed" / "a" / "0.png", rand_u8(6, 6, 3))
    write_png(tmp_path / "mixed" / "b" / "0.png", rand_u8(7, 7, 3))
    with pytest.raises(ValueError, match="mixed sizes.*--resolution"):
        load_dataset(str(tmp_path / "mixed"))
    assert load_dataset(str(tmp_path / "mixed"), image_size=6).images.shape == (2, 3, 6, 6)
    # empty folder, and a class folder with no images
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        load_dataset(str(tmp_path / "empty"))
    write_png(tmp_path / "holes" / "a" / "0.png", rand_u8(6, 6, 3))
    (tmp_path / "holes" / "b").mkdir()
    with pytest.raises(ValueError, match=r"\['b'\].*hold no images"):
        load_dataset(str(tmp_path / "holes"))
    # unreadable image
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        load_dataset(str(tmp_path / "bad"))
    # not square: center-cropped to the shorter side (issue 20)
    rect = rand_u8(6, 9, 3)
    write_png(tmp_path / "rect" / "0.png", rect)
    np.testing.assert_array_equal(load_dataset(str(tmp_path / "rect")).data[0], rect[:, 1:7].transpose(2, 0, 1))


# ----------------------------------------------------------------------------- MNIST IDX


def idx_bytes(arr):
    return b"\x00\x00\x08" + bytes([arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_idx_dir_and_file(tmp_path, gz):
    images, labels = rand_u8(5, 28, 28), np.array([3, 1, 4, 1, 5], np.uint8)
    suffix = ".gz" if gz else ""
    pack = gzip.compress if gz else (lambda b: b)
    (tmp_path / f"train-images-idx3-ubyte{suffix}").write_bytes(pack(idx_bytes(images)))
    (tmp_path / f"train-labels-idx1-ubyte{suffix}").write_bytes(pack(idx_bytes(labels)))
    for spec in (tmp_path, tmp_path / f"train-images-idx3-ubyte{suffix}"):
        ds = load_dataset(str(spec))
        np.testing.assert_array_equal(ds.data[:, 0], images)
        assert ds.labels.tolist() == [3, 1, 4, 1, 5] and ds.channels == 1 and ds.class_names[3] == "3"
    assert load_dataset(str(tmp_path), image_size=32).images.shape == (5, 1, 32, 32)


def test_idx_fashion_names_no_labels_and_errors(tmp_path):
    d = tmp_path / "fashion"
    d.mkdir()
    (d / "train-images-idx3-ubyte").write_bytes(idx_bytes(rand_u8(2, 4, 4)))
    ds = load_dataset(str(d))
    assert ds.labels is None and ds.name == "fashion-mnist"
    (d / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([9, 0], np.uint8)))
    assert load_dataset(str(d)).captions == ["ankle boot", "t-shirt"]
    (d / "train-images-idx3-ubyte").write_bytes(idx_bytes(rand_u8(2, 4, 4))[:-3])
    with pytest.raises(ValueError, match="truncated"):
        load_dataset(str(d))
    (d / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 20)
    with pytest.raises(ValueError, match="not a uint8 IDX"):
        load_dataset(str(d))


# ----------------------------------------------------------------------------- CIFAR-10


def py2_cifar_batch(data, labels):
    """Opcode by opcode, the pickle Python 2's cPickle wrote for CIFAR-10 (protocol 2, str keys)."""
    def s(text):  # SHORT_BINSTRING
        return b"U" + bytes([len(text)]) + text
    out = b"\x80\x02}(" + s(b"data")
    out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
    out += b"(K\x01K" + bytes([data.shape[0]]) + b"M" + struct.pack("<H", data.shape[1]) + b"\x86"
    out += b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    out += b"\x89T" + struct.pack("<i", data.size) + data.tobytes() + b"tb"
    out += s(b"labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    out += s(b"batch_label") + s(b"training batch 1 of 5") + b"u."
    return out


@pytest.mark.parametrize("how", ["py2", "protocol2", "protocol4", "protocol5"])
def test_cifar_batches_exact_recovery(tmp_path, how):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    want_x, want_y = [], []
    for b in (1, 2):
        data, labels = rand_u8(3, 3072), RNG.integers(0, 10, 3).tolist()
        if how == "py2":
            blob = py2_cifar_batch(data, labels)
        else:
            blob = pickle.dumps({b"batch_label": b"x", b"data": data, b"labels": labels,
                                 b"filenames": [b"a.png"] * 3}, protocol=int(how[-1]))
        (root / f"data_batch_{b}").write_bytes(blob)
        want_x.append(data.reshape(3, 3, 32, 32))
        want_y += labels
    for spec in (tmp_path, root):
        ds = load_dataset(str(spec))
        np.testing.assert_array_equal(ds.data, np.concatenate(want_x))
        assert ds.labels.tolist() == want_y and ds.class_names[0] == "airplane"
    meta = pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}, protocol=2)
    (root / "batches.meta").write_bytes(meta)
    assert load_dataset(str(root)).class_names[9] == "c9"
    assert load_dataset(str(root / "data_batch_2")).labels.tolist() == want_y[3:]


class _Trap:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))  # would create the file if it were ever unpickled


def test_cifar_scan_executes_nothing(tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps({b"data": _Trap(marker), b"labels": [1]}, protocol=2)
    root = tmp_path / "c"
    root.mkdir()
    (root / "data_batch_1").write_bytes(blob)
    with pytest.raises(ValueError, match="not a readable CIFAR-10"):
        load_dataset(str(root))
    assert not marker.exists()
    assert scan_pickle(pickle.dumps({"a": [1, (2, 3.5)], "b": None}, protocol=2)) == {"a": [1, (2, 3.5)], "b": None}
    (root / "data_batch_1").write_bytes(blob[:40])  # truncated
    with pytest.raises(ValueError, match="re-download"):
        load_dataset(str(root))


# ----------------------------------------------------------------------------- npz


def test_npz_gray_and_color(tmp_path):
    g = rand_u8(4, 8, 8)
    np.savez(tmp_path / "g.npz", images=g)
    ds = load_dataset(str(tmp_path / "g.npz"))
    np.testing.assert_array_equal(ds.data[:, 0], g)
    assert ds.labels is None and ds.channels == 1
    c, y = rand_u8(4, 8, 8, 3), np.array([0, 2, 1, 2])
    np.savez(tmp_path / "c.npz", images=c, labels=y)
    ds = load_dataset(str(tmp_path / "c.npz"))
    np.testing.assert_array_equal(ds.data, c.transpose(0, 3, 1, 2))
    assert ds.labels.tolist() == [0, 2, 1, 2] and ds.num_classes == 3 and ds.captions[1] == "2"


@pytest.mark.parametrize("arrays, match", [
    ({"imgs": np.zeros((2, 4, 4), np.uint8)}, "key 'images'"),
    ({"images": np.full((2, 4, 4), 1.5, np.float32)}, r"in \[0, 1\]"),
    ({"images": np.zeros((2, 4, 4), np.int32)}, "uint8 or float"),
    ({"images": np.zeros((2, 4, 4, 2), np.uint8)}, "C 1 or 3"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(3, np.int64)}, "labels must be"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(2, np.float32)}, "labels must be"),
    ({"images": np.array([None, 1], object)}, "without pickle"),
    ({"images": np.zeros((0, 4, 4), np.uint8)}, "no images"),
])
def test_npz_errors(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        load_dataset(str(tmp_path / "bad.npz"))


def test_npz_corrupt(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(ValueError, match="cannot read"):
        load_dataset(str(tmp_path / "bad.npz"))
