"""Issue 17 items 1 and 7 (loaders): .npz member headers, IDX dims and streamed gzip, CIFAR labels checked before
they allocate; 16-bit gray PNGs are scaled to 8 bits (round(v * 255 / 65535)), not clipped;
labels are 0..K-1 with K <= MAX_CLASSES, checked before any per-class allocation."""

import numpy as np
from PIL import Image

from minidiff.data.loaders import load_folder


def test_issue17_a_16_bit_gradient_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    for i in range(2):
        Image.fromarray(ramp).save(tmp_path / f"g{i}.png")
    with Image.open(tmp_path / "g0.png") as im:
        assert im.mode.startswith("I")  # PIL reads it as 16 bits
    data = load_folder(tmp_path)
    expected = (ramp.astype(np.int64) * 255 + 32767) // 65535
    np.testing.assert_array_equal(data.data[0, 0], expected)  # the uint8 store
    assert (expected == 255).mean() < 0.05


def test_issue17_a_label_past_the_class_bound_is_one_line(tmp_path, capsys):
    import pytest

    from minidiff.cli import main
    from minidiff.data.dataset import MAX_CLASSES, ArrayDataset

    images = np.zeros((8, 1, 8, 8), np.uint8)
    for big in (MAX_CLASSES, 100_000, 2**40):
        labels = np.arange(8, dtype=np.int64)
        labels[3] = big
        with pytest.raises(ValueError, match=f"a label of {big} .*K <= {MAX_CLASSES}"):
            ArrayDataset(images, labels, name="x")
    np.savez(tmp_path / "big.npz", images=images, labels=np.full(8, 100_000))
    assert main(["train", "--data", str(tmp_path / "big.npz"), "--out", str(tmp_path / "run"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "100000" in err[0] and str(MAX_CLASSES) in err[0]


def test_issue17_an_npz_member_declaring_a_tebibyte_is_refused_before_allocation(tmp_path):
    import io
    import zipfile

    import pytest

    from minidiff.data.npz import MAX_DATA_BYTES, load_npz

    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False, "shape": (2**40,)})
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("images.npy", head.getvalue() + b"\0" * 16)
    with pytest.raises(ValueError, match=f"huge.npz.*'images' declares.*{MAX_DATA_BYTES:,}.*MAX_DATA_BYTES"):
        load_npz(path)


def _idx(dims, body: bytes) -> bytes:
    return b"\x00\x00\x08" + bytes([len(dims)]) + np.array(dims, ">i4").tobytes() + body


def test_issue17_idx_dims_are_checked_and_gzip_is_streamed_with_a_cap(tmp_path):
    import gzip

    import pytest

    from minidiff.data.loaders import read_idx

    big = tmp_path / "big-idx3-ubyte.gz"
    big.write_bytes(gzip.compress(_idx([2**20, 2**10, 2**10], b"")))  # declares 1 TiB
    with pytest.raises(ValueError, match="big-idx3-ubyte.gz declares dims .*MAX_DATA_BYTES"):
        read_idx(big)
    bomb = tmp_path / "bomb-idx3-ubyte.gz"  # a tiny declared body, then many zeros: never read past it
    bomb.write_bytes(gzip.compress(_idx([2, 2, 2], b"\0" * 8)) + gzip.compress(b"\0" * (8 << 20)))
    with pytest.raises(ValueError, match="bomb-idx3-ubyte.gz is truncated or has extra bytes"):
        read_idx(bomb)
    ok = tmp_path / "ok-idx3-ubyte.gz"
    ok.write_bytes(gzip.compress(_idx([2, 2, 2], bytes(range(8)))))
    np.testing.assert_array_equal(read_idx(ok), np.arange(8, dtype=np.uint8).reshape(2, 2, 2))
    with pytest.raises(ValueError, match="declares dims \\[2, 2, 2\\] = 8 bytes; at most 7"):
        read_idx(ok, cap=7)


def test_issue17_cifar_labels_must_be_a_flat_list_of_ints(tmp_path):
    import pickle

    import pytest

    from minidiff.data.cifar import read_cifar_batch

    inner = [0] * 1000
    shared = [inner] * 1000  # a few KB pickled, 10**6 ints expanded; one more level: 10**9
    for labels in (shared, [0, 1.5], [0, True]):
        path = tmp_path / "data_batch_1"
        path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}, protocol=2))
        with pytest.raises(ValueError, match="data_batch_1 is not a readable.*flat list of ints"):
            read_cifar_batch(path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 4]}, protocol=2))
    assert read_cifar_batch(path)[1].tolist() == [3, 4]
