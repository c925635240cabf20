"""Monte-Carlo least squares for the per-class linear denoiser with noisy one-hot condition (paper Eq. 5, 16).

Solves  min_{W,V} E_i E_xi E_eps || W (r_t x_i + sigma_t eps) + V (e_k + gamma xi) - eps ||^2
on samples, with xi ~ N(0, I_|Y|) of the one-hot's dimension (digest §1.9 caveat 2), and compares W and V e_k with
the closed forms of both versions (`closed_forms.linear_denoiser`). This is the independent check that the exact
optimum inflates the covariance along mu_hat only.
"""
from typing import NamedTuple

import numpy as np

from .closed_forms import check_time, learned_target, linear_denoiser, ou_coefficients
from .gaussians import as_array, check_gamma, empirical_stats


class LeastSquaresCheck(NamedTuple):
    weight: np.ndarray  # fitted W [d, d]
    bias: np.ndarray  # fitted V e_k [d]
    relative_error: dict  # version -> ||W_fit - W_version||_F / ||W_version||_F
    bias_relative_error: dict  # version -> ||b_fit - b_version|| / ||b_version||


def fit_linear_denoiser(x, gamma: float, t: float, num_classes: int, class_index: int, num_samples: int,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (W, V) on `num_samples` draws of (training point, eps, xi); returns W [d, d] and V [d, |Y|]."""
    x = as_array("x", x, ndim=2)
    gamma = float(check_gamma(gamma))
    r, sigma = ou_coefficients(check_time("t", t))
    if not 0 <= class_index < num_classes:
        raise ValueError(f"class_index must be in [0, num_classes={num_classes}), got {class_index}")
    if num_samples < 10 * (x.shape[1] + num_classes):
        raise ValueError(f"num_samples must be >= 10 (d + num_classes) for a well-posed fit, got {num_samples}")
    n, d = x.shape
    points = x[rng.integers(0, n, num_samples)]
    eps = rng.standard_normal((num_samples, d))
    condition = np.zeros((num_samples, num_classes))
    condition[:, class_index] = 1.0
    condition += gamma * rng.standard_normal((num_samples, num_classes))
    features = np.concatenate([r * points + sigma * eps, condition], axis=1)
    solution, *_ = np.linalg.lstsq(features, eps, rcond=None)  # features @ solution ~ eps
    return solution[:d].T, solution[d:].T


def check_exact_optimum(x, gamma: float, t: float = 0.5, num_classes: int = 10, class_index: int = 0,
                        num_samples: int = 400_000, seed: int = 0) -> LeastSquaresCheck:
    rng = np.random.default_rng(seed)
    weight, v = fit_linear_denoiser(x, gamma, t, num_classes, class_index, num_samples, rng)
    bias = v[:, class_index]
    mu_hat, sigma_hat = empirical_stats(x)
    errors, bias_errors = {}, {}
    for version in ("paper", "exact"):
        w_closed, b_closed = linear_denoiser(learned_target(mu_hat, sigma_hat, gamma, version), t)
        errors[version] = float(np.linalg.norm(weight - w_closed) / np.linalg.norm(w_closed))
        bias_errors[version] = float(np.linalg.norm(bias - b_closed) / np.linalg.norm(b_closed))
    return LeastSquaresCheck(weight, bias, errors, bias_errors)
