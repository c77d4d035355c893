"""Softmax cross-entropy (minidiff/nn/cross_entropy.py): finite differences and PyTorch autograd in float64,
log_softmax, float32 and no mutation, bad input. The classifier that uses it is tested in tests/model/test_classifier.py.

Tolerances. Against finite differences: 1e-7 (smooth op, logits of size <= 30). Against torch: 1e-10 (same
formulas, float64).
"""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gradcheck import check_grads, rel_error
from minidiff.nn.cross_entropy import log_softmax, softmax_cross_entropy_backward, softmax_cross_entropy_forward


@pytest.fixture
def torch1():
    """torch with one thread: these tensors are tiny, and a second thread only fights for a busy core."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


def _ce_inputs(n, k, scale, seed=0):
    rng = np.random.default_rng(seed)
    return scale * rng.standard_normal((n, k)), rng.integers(0, k, n)


@given(n=st.integers(1, 5), k=st.integers(1, 6), scale=st.sampled_from([1e-3, 1.0, 30.0]), seed=st.integers(0, 999))
@example(n=1, k=1, scale=1.0, seed=0)  # one class: loss 0, gradient 0
@example(n=4, k=2, scale=30.0, seed=0)  # saturated softmax
@example(n=1, k=2, scale=30.0, seed=0)  # found by the dev profile when the label could be the argmax (see below)
def test_cross_entropy_matches_finite_differences(n, k, scale, seed):
    """Labels are random except row 0's, which is its smallest logit: its gradient (p_y - 1)/N ~ -1/N keeps
    the largest gradient O(1/N). When every label is its row's argmax by a gap D, every gradient is ~exp(-D)
    and a relative check against differences (noise ~ 1e-16 |z| / h) means nothing; torch checks that case."""
    logits, labels = _ce_inputs(n, k, scale, seed)
    labels[0] = np.argmin(logits[0])
    cache = {}

    def fwd(logits):
        loss, cache["c"] = softmax_cross_entropy_forward(logits, labels)
        return loss

    # h = 1e-5: rounding noise 1e-16 * 90 / h ~ 1e-9 against gradients >= 0.1; truncation h^2 |f(3)| ~ 1e-11
    check_grads(fwd, {"logits": logits}, lambda g: {"logits": softmax_cross_entropy_backward(g, cache["c"])},
                h=1e-5, tol=1e-7)
    loss, _ = softmax_cross_entropy_forward(logits, labels)
    assert loss.shape == () and loss.dtype == np.float64
    ref = -np.mean([logits[i, labels[i]] - np.log(np.sum(np.exp(logits[i]))) for i in range(n)])
    assert abs(float(loss) - ref) <= 1e-12 * max(1.0, abs(ref))


def test_cross_entropy_against_torch_float64(torch1):
    torch = torch1
    for scale in (1.0, 40.0, 1e4):  # 1e4: exp overflows without the max shift
        logits, labels = _ce_inputs(6, 5, scale, seed=3)
        z = torch.tensor(logits, requires_grad=True)
        ref = torch.nn.functional.cross_entropy(z, torch.tensor(labels))
        ref.backward(torch.tensor(0.7, dtype=torch.float64))
        loss, cache = softmax_cross_entropy_forward(logits, labels)
        dz = softmax_cross_entropy_backward(0.7, cache)
        assert rel_error(loss, ref.detach().numpy()) < 1e-10
        assert rel_error(dz, z.grad.numpy()) < 1e-10
        assert rel_error(log_softmax(logits), torch.log_softmax(torch.tensor(logits), 1).numpy()) < 1e-10
        assert np.all(np.isfinite(dz))


def test_cross_entropy_float32_and_no_mutation():
    logits, labels = _ce_inputs(3, 4, 1.0)
    logits = logits.astype(np.float32)
    loss, cache = softmax_cross_entropy_forward(logits, labels)
    p_before = cache[0].copy()
    dz = softmax_cross_entropy_backward(np.float32(1.0), cache)
    assert loss.dtype == np.float32 and dz.dtype == np.float32
    np.testing.assert_array_equal(cache[0], p_before)  # the backward left the cache alone
    np.testing.assert_allclose(dz.sum(axis=1), 0.0, atol=1e-7)  # softmax rows sum to 1, onehot too


def test_cross_entropy_bad_input():
    logits, labels = _ce_inputs(3, 4, 1.0)
    with pytest.raises(ValueError, match="labels must lie in"):
        softmax_cross_entropy_forward(logits, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="labels must lie in"):
        softmax_cross_entropy_forward(logits, np.array([0, -1, 1]))
    with pytest.raises(ValueError, match="labels must be an integer array"):
        softmax_cross_entropy_forward(logits, labels.astype(np.float64))
    with pytest.raises(ValueError, match="labels must have shape"):
        softmax_cross_entropy_forward(logits, labels[:2])
    with pytest.raises(ValueError, match="logits must have shape"):
        softmax_cross_entropy_forward(logits[0], labels[:1])
    with pytest.raises(ValueError, match="dloss must be a scalar"):
        softmax_cross_entropy_backward(np.ones(2), softmax_cross_entropy_forward(logits, labels)[1])
