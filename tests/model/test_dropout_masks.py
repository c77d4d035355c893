"""model/dropout.py: DropoutMasks draws each resnet's keep-mask when read, and take_rows gives a piece of the
batch exactly its rows of the whole batch's masks (shards and gradient accumulation rely on it)."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minidiff.fast.cpu.shard_messages import decode, encode, pack, unpack
from minidiff.fast.cpu.shards import batch_rows
from minidiff.model.config import get_preset
from minidiff.model.dropout import DropoutMasks, draw_dropout_masks, resnet_shapes
from minidiff.nn.dropout import dropout_mask
from minidiff.training.accumulate import rows

CONFIG = dataclasses.replace(get_preset("tiny"), dropout=0.3)


def _whole(masks):
    return {k: dropout_mask(masks.seeds[k], masks.shapes[k], masks.p) for k in masks}


def test_draw_takes_one_seed_per_resnet_in_forward_order_and_draws_the_whole_batchs_masks():
    rng = np.random.default_rng(7)
    masks = draw_dropout_masks(CONFIG, rng, (5, 3, 8, 8))
    expected_seeds = np.random.default_rng(7).integers(2**63 - 1, size=len(masks))  # the same generator calls
    assert list(masks.seeds.values()) == [int(s) for s in expected_seeds]
    assert list(masks) == list(resnet_shapes(CONFIG, (5, 3, 8, 8))) and masks.rows == (0, 5)
    for k, m in masks.items():
        assert m.dtype == bool and m.shape == masks.shapes[k] and 0.5 < m.mean() < 0.9  # P(keep) = 0.7
        np.testing.assert_array_equal(m, masks[k])  # a function of (seed, shape): the same on every read


@given(st.integers(1, 7), st.data())
def test_take_rows_gives_the_rows_of_the_whole_batchs_masks(n, data):
    """Any piece, and any piece of a piece (shards of a micro-batch), is those rows of the unsplit masks."""
    masks = draw_dropout_masks(CONFIG, np.random.default_rng(n), (n, 3, 8, 8))
    whole = _whole(masks)
    a = data.draw(st.integers(0, n - 1))
    b = data.draw(st.integers(a + 1, n))
    piece = masks.take_rows(a, b)
    assert batch_rows({"masks": piece, "x": np.zeros((b - a, 2))}) == b - a
    for k in masks:
        np.testing.assert_array_equal(piece[k], whole[k][a:b])
    c = data.draw(st.integers(0, b - a - 1))
    d = data.draw(st.integers(c + 1, b - a))
    inner = rows({"dropout_masks": piece}, c, d)["dropout_masks"]
    assert inner.rows == (a + c, a + d)
    for k in masks:
        np.testing.assert_array_equal(inner[k], whole[k][a + c:a + d])


def test_take_rows_past_the_end_is_clipped_as_an_array_slice_is():
    masks = draw_dropout_masks(CONFIG, np.random.default_rng(0), (4, 3, 8, 8))
    assert masks.take_rows(2, 10).rows == (2, 4) and masks.take_rows(5, 9).num_rows == 0
    assert masks.take_rows(1, 3).take_rows(1, 5).rows == (2, 3)


def test_a_batch_whose_masks_have_other_rows_is_refused():
    masks = draw_dropout_masks(CONFIG, np.random.default_rng(0), (4, 3, 8, 8))
    with pytest.raises(ValueError, match="same number of rows"):
        batch_rows({"x0": np.zeros((3, 3, 8, 8)), "dropout_masks": masks})


def test_masks_travel_to_a_worker_as_numbers_not_arrays():
    """A shard worker gets the seeds, shapes, p and its rows (no mask bytes) and draws the same masks."""
    masks = draw_dropout_masks(dataclasses.replace(get_preset("small"), dropout=0.1), np.random.default_rng(1),
                               (64, 3, 32, 32)).take_rows(32, 64)
    arrays = {}
    message = pack({"batch": encode({"dropout_masks": masks}, arrays, "batch")}, arrays)
    assert arrays == {} and len(message) < 4000  # as arrays these 32 rows would be 5.4 MB
    meta, got_arrays = unpack(message)
    got = decode(meta["batch"], got_arrays)["dropout_masks"]
    assert isinstance(got, DropoutMasks) and got.rows == (32, 64) and got.shapes == masks.shapes
    for k in ("down_blocks.0.resnets.0.", "mid_block.resnets.1."):
        np.testing.assert_array_equal(got[k], masks[k])
