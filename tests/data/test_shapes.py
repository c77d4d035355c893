"""The built-in shapes dataset and its pixel-reading checker."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidiff.data import shapes
from minidiff.data.shapes import (
    CLASS_NAMES,
    COLORS,
    SHAPES,
    classify_shape_image,
    classify_shape_images,
    make_shapes,
    parse_prompt,
    prompt_accuracy,
    render_coverage,
    sample_shapes,
)


def test_make_shapes_is_deterministic_and_well_formed():
    a, b = make_shapes(50, 16, seed=3), make_shapes(50, 16, seed=3)
    c = make_shapes(50, 16, seed=4)
    assert a["images"].dtype == np.uint8 and a["images"].shape == (50, 16, 16, 3)
    assert a["labels"].dtype == np.int64 and a["labels"].shape == (50,)
    np.testing.assert_array_equal(a["images"], b["images"])
    assert a["captions"] == b["captions"]
    assert not np.array_equal(a["images"], c["images"])
    assert make_shapes(7, 32, seed=0)["images"].shape == (7, 32, 32, 3)


def test_labels_captions_and_class_names_agree():
    d = sample_shapes(np.random.default_rng(1), 400, 16)
    assert len(CLASS_NAMES) == 9 and CLASS_NAMES[0] == "red circle" and CLASS_NAMES[5] == "blue square"
    np.testing.assert_array_equal(d["labels"], d["shape"] * 3 + d["color"])
    with_size = 0
    for lab, cap, large in zip(d["labels"], d["captions"], d["large"]):
        words = cap.split()
        assert " ".join(words[-2:]) == CLASS_NAMES[lab]
        if len(words) == 3:
            with_size += 1
            assert words[0] == ("large" if large else "small")
        assert cap in shapes.ALL_CAPTIONS
    assert 150 < with_size < 250  # the size word appears with probability 1/2
    assert set(d["labels"].tolist()) == set(range(9))


def test_shape_stays_inside_frame_and_background_is_dark():
    d = sample_shapes(np.random.default_rng(2), 300, 16)
    img = d["images"].astype(int)
    border = np.concatenate([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], axis=1)
    assert border.max() <= 40  # only the dark background touches the frame
    assert np.all(d["cx"] - d["r"] >= 1) and np.all(d["cx"] + d["r"] <= 15)
    # the brightest pixel has the palette color of its label (within the jitter)
    for i in range(20):
        flat = img[i].reshape(-1, 3)
        top = flat[flat.sum(1).argmax()]
        assert np.abs(top - shapes.PALETTE[d["color"][i]]).max() <= shapes.FG_JITTER + 1


def test_coverage_areas_match_the_formulas():
    # area of the rendered coverage = pi r^2, 4 r^2, 2 r^2 up to the supersampling error
    r = np.array([5.3, 5.3, 5.3])
    cov = render_coverage(np.array([0, 1, 2]), np.full(3, 15.7), np.full(3, 16.2), r, 32, ss=8)
    np.testing.assert_allclose(cov.sum((1, 2)), [np.pi * 5.3**2, 4 * 5.3**2, 2 * 5.3**2], rtol=0.02)
    # the triangle's apex row is above its base: more coverage at the bottom
    tri = cov[2]
    assert tri[19].sum() > tri[13].sum() > 0


@pytest.mark.parametrize("size", [16, 32])
def test_checker_accuracy_on_2000_images(size):
    d = make_shapes(2000, size, seed=11)
    got = classify_shape_images(d["images"])
    want = [parse_prompt(int(lab)) for lab in d["labels"]]
    acc = np.mean([g == w for g, w in zip(got, want)])
    assert acc >= 0.98, acc
    # and accuracy against wrong prompts is near 0: the checker is not a constant
    wrong = (d["labels"] + 1 + np.arange(2000) % 8) % 9
    assert np.mean([g == parse_prompt(int(w)) for g, w in zip(got, wrong)]) < 0.02


@pytest.mark.parametrize("size", [16, 32])
def test_checker_is_robust_to_noise_in_model_range(size):
    d = make_shapes(2000, size, seed=12)
    x = d["images"].astype(np.float32) / 127.5 - 1  # the model's [-1, 1] range
    x = x + np.random.default_rng(0).normal(0, 0.05, x.shape).astype(np.float32)
    x_nchw = x.transpose(0, 3, 1, 2)  # as a sampler returns them
    assert prompt_accuracy(x_nchw, d["captions"]) >= 0.98


@pytest.mark.parametrize("kernel, min_acc", [((0.25, 0.5, 0.25), 0.98), ((1 / 3, 1 / 3, 1 / 3), 0.97)])
def test_checker_is_robust_to_soft_edges(kernel, min_acc):
    # samples are often soft; a 3x3 box blur at 16x16 makes small squares look round to a sharp
    # template (84% measured before blurred templates were added; 99.5% after)
    d = make_shapes(600, 16, seed=13)
    x = np.pad(d["images"].astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    k = np.asarray(kernel)
    blurred = sum(k[i] * k[j] * x[:, i:i + 16, j:j + 16] for i in range(3) for j in range(3))
    assert prompt_accuracy(np.rint(blurred).astype(np.uint8), d["labels"].tolist()) >= min_acc


def test_checker_says_none_when_nothing_is_there():
    blank = np.full((16, 16, 3), 24, np.uint8)
    assert classify_shape_image(blank) == (None, None)
    gray = make_shapes(1, 16, seed=5)["images"][0].copy()
    fg = gray.astype(int).sum(-1) > 200
    gray[fg] = 160  # a gray shape: no palette color within COLOR_TOL
    assert classify_shape_image(gray)[1] is None
    # uniform noise over the whole frame is no shape
    noise = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    assert classify_shape_image(noise)[0] is None


def test_checker_reads_each_shape_and_color():
    for k, shape in enumerate(SHAPES):
        for c, color in enumerate(COLORS):
            cov = render_coverage(np.array([k]), np.array([16.0]), np.array([15.0]), np.array([8.0]), 32)[0]
            img = 24 + cov[..., None] * (shapes.PALETTE[c] - 24)
            assert classify_shape_image(np.rint(img).astype(np.uint8)) == (shape, color)
            assert classify_shape_image((img.transpose(2, 0, 1) / 127.5 - 1).astype(np.float32)) == (shape, color)


@given(seed=st.integers(0, 2**32 - 1), size=st.sampled_from([16, 32]))
def test_checker_on_random_draws(seed, size):
    d = sample_shapes(np.random.default_rng(seed), 8, size)
    got = classify_shape_images(d["images"])
    assert sum(g == parse_prompt(int(lab)) for g, lab in zip(got, d["labels"])) >= 7


def test_parse_prompt_and_bad_input():
    assert parse_prompt("Small BLUE triangle") == ("triangle", "blue")
    assert parse_prompt(4) == ("square", "green")
    with pytest.raises(ValueError, match="class id"):
        parse_prompt(9)
    with pytest.raises(ValueError, match="prompt 'red'"):
        parse_prompt("red")
    imgs = make_shapes(2, 16)["images"]
    with pytest.raises(ValueError, match="one entry per image"):
        prompt_accuracy(imgs, ["red circle"])
    with pytest.raises(ValueError, match="size"):
        make_shapes(4, size=8)
    with pytest.raises(ValueError, match="images must be"):
        classify_shape_images(np.zeros((2, 16, 16, 4), np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        classify_shape_images(np.zeros((2, 16, 16, 3), np.int32))
    with pytest.raises(ValueError, match="n must be"):
        sample_shapes(np.random.default_rng(0), -1, 16)
