"""The caption word tokenizer."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidiff.data import shapes
from minidiff.data.tokenizer import PAD, Tokenizer

CAPTIONS = ["red circle", "small blue square", "Large green triangle", "red square"]


def test_vocab_is_sorted_words_after_padding():
    tok = Tokenizer.from_captions(CAPTIONS)
    assert tok.vocab == [PAD, "blue", "circle", "green", "large", "red", "small", "square", "triangle"]
    assert tok.vocab_size == 9 and tok.max_len == 3


def test_encode_pads_with_zero_and_matches_vocab_index():
    tok = Tokenizer.from_captions(CAPTIONS)
    ids = tok.encode(["small blue square", "red circle", "  RED   Circle "], max_len=4)
    assert ids.dtype == np.int64 and ids.shape == (3, 4)
    v = tok.vocab
    np.testing.assert_array_equal(ids[0], [v.index("small"), v.index("blue"), v.index("square"), 0])
    np.testing.assert_array_equal(ids[1], [v.index("red"), v.index("circle"), 0, 0])
    np.testing.assert_array_equal(ids[1], ids[2])  # lowercase, whitespace split
    assert tok.encode("red circle").shape == (1, 3)  # default max_len, a single string


def test_empty_prompt_is_all_padding():
    tok = Tokenizer.from_captions(CAPTIONS)
    np.testing.assert_array_equal(tok.encode(["", "   "], max_len=5), np.zeros((2, 5), np.int64))
    assert tok.decode(np.zeros((1, 3), np.int64)) == [""]


def test_unknown_word_names_it_and_lists_vocab():
    tok = Tokenizer.from_captions(CAPTIONS)
    with pytest.raises(ValueError, match=r"unknown word 'purple'.*known words: blue, circle"):
        tok.encode(["purple circle"])
    with pytest.raises(ValueError, match="unknown word '<pad>'"):
        tok.encode(["<pad> circle"])
    with pytest.raises(ValueError, match="max_len is 2"):
        tok.encode(["small red circle"], max_len=2)
    with pytest.raises(ValueError, match="prompt must be a string"):
        tok.encode([3])


def test_dict_round_trip_through_json():
    tok = Tokenizer.from_captions(shapes.ALL_CAPTIONS)
    back = Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert back.vocab == tok.vocab and back.max_len == tok.max_len
    np.testing.assert_array_equal(back.encode(["large blue triangle"]), tok.encode(["large blue triangle"]))


def test_bad_vocab_and_dict():
    with pytest.raises(ValueError, match="padding token"):
        Tokenizer(["red"], 2)
    with pytest.raises(ValueError, match="lowercase"):
        Tokenizer([PAD, "Red"], 2)
    with pytest.raises(ValueError, match="repeat"):
        Tokenizer([PAD, "red", "red"], 2)
    with pytest.raises(ValueError, match="max_len"):
        Tokenizer([PAD, "red"], 0)
    with pytest.raises(ValueError, match="keys"):
        Tokenizer.from_dict({"vocab": [PAD, "red"]})
    with pytest.raises(ValueError, match="at least one word"):
        Tokenizer.from_captions(["", " "])
    with pytest.raises(ValueError, match="ids must lie"):
        Tokenizer.from_captions(CAPTIONS).decode(np.array([[99]]))


@given(st.lists(st.lists(st.sampled_from(["red", "blue", "small", "circle", "square"]), max_size=4), min_size=1))
def test_decode_inverts_encode(prompts):
    tok = Tokenizer.from_captions(CAPTIONS)
    texts = [" ".join(p) for p in prompts]
    ids = tok.encode(texts, max_len=4)
    assert tok.decode(ids) == texts
    assert (ids > 0).sum(1).tolist() == [len(p) for p in prompts]
