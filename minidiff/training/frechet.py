"""The Fréchet distance between two Gaussians fitted to feature sets (FID's formula, Heusel et al. 2017).

    d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})

(S_1 S_2)^{1/2} is not symmetric, but its trace equals that of the symmetric (S_1^{1/2} S_2 S_1^{1/2})^{1/2}
(the two matrices are similar), so both square roots are taken by eigh of a symmetric matrix, with
eigenvalues below 0 (rounding of a singular covariance) set to 0. Pure NumPy on the host, float64.
Shape legend: N feature vectors, D feature dimension.
"""

from __future__ import annotations

import numpy as np


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """mu = mean_n f_n (D,), S = 1/(N-1) sum_n (f_n - mu)(f_n - mu)^T (D, D); float64. features: (N, D), N >= 2."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2 (a covariance needs two samples), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def sqrtm_psd(a) -> np.ndarray:
    """A^{1/2} = V diag(sqrt(max(w, 0))) V^T with A = V diag(w) V^T (eigh of the symmetrized A)."""
    a = np.asarray(a, np.float64)
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1^{1/2} S2 S1^{1/2})^{1/2})   (module docstring)

    Inputs: mu1, mu2 (D,); sigma1, sigma2 (D, D) symmetric positive semi-definite. Returns a float (>= 0 up to
    rounding: about 1e-12 relative for a set against itself)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"want mu (D,) and sigma (D, D) of one D, got {mu1.shape}, {s1.shape}, {mu2.shape}, "
                         f"{s2.shape}")
    r1 = sqrtm_psd(s1)  # S1^{1/2}
    cross = np.trace(sqrtm_psd(r1 @ s2 @ r1))  # Tr (S1 S2)^{1/2}
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * cross)
