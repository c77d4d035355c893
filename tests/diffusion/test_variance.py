"""diffusion/variance.py (ddpm_variance, ddim_variance) and the negative-prev_t rule: any prev_t < 0 is
"before the start", as DDIMScheduler's raw t - T // n."""

import numpy as np
import pytest

from minidiff.diffusion import sampler as SM
from minidiff.diffusion.schedule import make_schedule
from minidiff.diffusion.variance import ddim_variance, ddpm_variance

S = make_schedule()


@pytest.mark.parametrize("t,prev_t", [(500, 400), (10, 9), (1, 0), (20, -1)])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_variance_is_the_steps_sigma_squared(t, prev_t, set_alpha_to_one):
    x, out = np.ones((1, 2)), np.full((1, 2), 0.3)
    kw = dict(eta=0.7, set_alpha_to_one=set_alpha_to_one)
    with_z = SM.ddim_step(S, out, t, prev_t, x, noise=np.ones((1, 2)), **kw)[0]
    without = SM.ddim_step(S, out, t, prev_t, x, noise=np.zeros((1, 2)), **kw)[0]
    np.testing.assert_allclose((with_z - without)[0, 0] ** 2, ddim_variance(S, t, prev_t, **kw), rtol=1e-10, atol=1e-30)


def test_ddpm_variance_by_the_formulas():
    assert np.isclose(ddpm_variance(S, 500, 499), S.posterior_variance[500], rtol=1e-12)
    assert np.isclose(ddpm_variance(S, 500, 499, "fixed_large"), S.betas[500], rtol=1e-12)
    a, b = S.alphas_cumprod[500], S.alphas_cumprod[400]
    assert np.isclose(ddpm_variance(S, 500, 400), (1 - b) / (1 - a) * (1 - a / b), rtol=1e-12)
    assert np.isclose(ddim_variance(S, 500, 400), ddpm_variance(S, 500, 400), rtol=1e-12)  # eta = 1
    np.testing.assert_allclose(ddpm_variance(S, np.array([500, 3]), np.array([400, -7])),
                               [ddpm_variance(S, 500, 400), ddpm_variance(S, 3, -1)])


def test_any_negative_prev_t_is_before_the_start():
    rng = np.random.default_rng(0)
    x, out, z = (rng.standard_normal((2, 3)) for _ in range(3))
    for prev_t in (-2, -10, -980):  # DDIMScheduler with 50 steps at t = 10: 10 - 20 = -10
        np.testing.assert_array_equal(SM.ddim_step(S, out, 10, prev_t, x, 0.5, z)[0],
                                      SM.ddim_step(S, out, 10, -1, x, 0.5, z)[0])
        np.testing.assert_array_equal(SM.ddpm_step(S, out, 10, prev_t, x, z)[0], SM.ddpm_step(S, out, 10, -1, x, z)[0])
    with pytest.raises(ValueError, match="prev_t must be < t"):
        SM.ddim_step(S, out, 10, 10, x)
    with pytest.raises(ValueError, match="prev_t must be an int"):
        SM.ddim_step(S, out, 10, -2.0, x)
