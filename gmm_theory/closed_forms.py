"""Closed forms of paper 1's Gaussian-mixture model (arXiv 2405.20494, §4 and Appendix C).

Class k: x | y=k ~ N(mu_k, I); the forward process is the OU process x_t = r_t x + sigma_t eps with r_t = e^-t,
sigma_t^2 = 1 - e^-2t. With a per-class linear denoiser eps = W x_t + b the optimum is the score of a Gaussian
"target" N(m, S) noised by the forward process (Lemma 1: m = mu_hat, S = Sigma), so everything reduces to the pair
(m, S) a version of the model learns:

  clean               m = mu_hat                 S = Sigma                                   (Lemmas 1, 3)
  corrupted, paper    m = mu_hat / (1+gamma^2)   S = Sigma + gamma^2/(1+gamma^2) ||mu_hat||^2 I  (Lemmas 2, 4)
  corrupted, exact    m = mu_hat / (1+gamma^2)   S = Sigma + gamma^2/(1+gamma^2) mu_hat mu_hat^T (the true optimum of
                                                                          the stated objective; digest §1.9)
"""
from typing import NamedTuple

import numpy as np

from .gaussians import as_array, check_gamma, check_mean_cov

VERSIONS = ("paper", "exact")


class Gaussian(NamedTuple):
    mean: np.ndarray  # [..., d]
    cov: np.ndarray  # [..., d, d]


def check_version(version: str) -> str:
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    return version


def check_time(name: str, value: float, allow_inf: bool = False) -> float:
    value = float(value)
    if np.isnan(value) or value <= 0 or (np.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a positive {'number or inf' if allow_inf else 'finite number'}, got {value}")
    return value


def ou_coefficients(t) -> tuple[np.ndarray, np.ndarray]:
    """r_t = e^-t and sigma_t = sqrt(1 - e^-2t) of the OU forward process dx = -x dt + sqrt(2) dw (§1.2)."""
    t = np.asarray(t, dtype=np.float64)
    return np.exp(-t), np.sqrt(-np.expm1(-2 * t))


def learned_target(mu_hat, sigma_hat, gamma=0.0, version: str = "paper") -> Gaussian:
    """The Gaussian N(m, S) whose diffused score the optimal linear denoiser of class k equals.

    gamma = 0 is the clean model (Lemma 1). gamma broadcasts against the batch dimensions of mu_hat.
    """
    mu_hat, sigma_hat = check_mean_cov(mu_hat, sigma_hat, "mu_hat", "sigma_hat")
    gamma = check_gamma(gamma)
    check_version(version)
    inflation = (gamma**2 / (1 + gamma**2))[..., None, None]  # gamma^2/(1+gamma^2)
    if version == "paper":  # Lemma 2: isotropic a I with a = gamma^2/(1+gamma^2) ||mu_hat||^2
        extra = inflation * (mu_hat**2).sum(-1)[..., None, None] * np.eye(mu_hat.shape[-1])
    else:  # exact optimum: rank-one gamma^2/(1+gamma^2) mu_hat mu_hat^T
        extra = inflation * mu_hat[..., :, None] * mu_hat[..., None, :]
    mean = mu_hat / (1 + gamma**2)[..., None]
    return Gaussian(mean, sigma_hat + extra)


def linear_denoiser(target: Gaussian, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Optimal (W_t, b_t) with eps = W_t x_t + b_t for target N(m, S) (Lemma 1/2):
    W_t = sigma_t A_t^-1, b_t = -r_t sigma_t A_t^-1 m, A_t = sigma_t^2 I + r_t^2 S."""
    r, sigma = ou_coefficients(check_time("t", t))
    d = target.mean.shape[-1]
    a_inv = np.linalg.inv(sigma**2 * np.eye(d) + r**2 * target.cov)
    return sigma * a_inv, -r * sigma * np.einsum("...ij,...j->...i", a_inv, target.mean)


def generated_distribution(target: Gaussian, horizon: float = np.inf) -> Gaussian:
    """Law of z_T from the probability-flow ODE dz = [z + score(z, T - s)] ds started at z_0 ~ N(0, I) (Lemmas 3, 4).

    The ODE is linear, so per eigen-direction u_i of S (eigenvalue lambda_i):
      E[u_i^T z_T]   = e_i u_i^T m,  e_i = 1 - sqrt(lambda_i) e^-T / sqrt(1 + (lambda_i - 1) e^-2T)
      Var[u_i^T z_T] = lambda_i / (1 + (lambda_i - 1) e^-2T)
    and T -> inf gives N(m, S).
    """
    horizon = check_time("horizon", horizon, allow_inf=True)
    if np.isinf(horizon):
        return target
    eigenvalues, eigenvectors = np.linalg.eigh(target.cov)
    decay = np.exp(-horizon)
    denominator = 1 + (eigenvalues - 1) * decay**2
    mean_factor = 1 - np.sqrt(eigenvalues) * decay / np.sqrt(denominator)
    variances = eigenvalues / denominator
    projected_mean = np.einsum("...ji,...j->...i", eigenvectors, target.mean)
    mean = np.einsum("...ij,...j->...i", eigenvectors, mean_factor * projected_mean)
    cov = np.einsum("...ij,...j,...kj->...ik", eigenvectors, variances, eigenvectors)
    return Gaussian(mean, cov)


def delta_entropy_formula(mu_hat, sigma_hat, gamma, version: str = "paper") -> np.ndarray:
    """H(corrupted) - H(clean) at T -> inf in closed form.

    paper (Theorem 1 proof): 1/2 sum_i log(1 + gamma^2 ||mu_hat||^2 / ((1+gamma^2) lambda_i))
    exact (matrix determinant lemma on the rank-one inflation): 1/2 log(1 + gamma^2/(1+gamma^2) mu_hat^T Sigma^-1 mu_hat)
    """
    mu_hat, sigma_hat = check_mean_cov(mu_hat, sigma_hat, "mu_hat", "sigma_hat")
    gamma = check_gamma(gamma)
    inflation = gamma**2 / (1 + gamma**2)
    if check_version(version) == "paper":
        eigenvalues = np.linalg.eigvalsh(sigma_hat)
        a = inflation * (mu_hat**2).sum(-1)
        return 0.5 * np.log1p(a[..., None] / eigenvalues).sum(-1)
    mahalanobis = np.einsum("...i,...i->...", mu_hat, np.linalg.solve(sigma_hat, mu_hat[..., None])[..., 0])
    return 0.5 * np.log1p(inflation * mahalanobis)


def expected_mean_gain(gamma, d: int, n_k: int, mu_norm_sq: float) -> np.ndarray:
    """Exact E||mu_hat - mu||^2 - E||mu_hat/(1+gamma^2) - mu||^2 with mu_hat ~ N(mu, I/n_k) (Theorem 2 proof):
    d/n - d/(n (1+gamma^2)^2) - (gamma^2/(1+gamma^2))^2 ||mu||^2."""
    gamma = check_gamma(gamma)
    return d / n_k - d / (n_k * (1 + gamma**2) ** 2) - (gamma**2 / (1 + gamma**2)) ** 2 * mu_norm_sq


def theorem2_lower_bound(gamma, d: int, n_k: int, mu_norm_sq: float) -> np.ndarray:
    """Leading terms of the paper's bound E[W2^2(P,Q) - W2^2(P,Q^c)] >= 2 d gamma^2 / n
    + gamma^2 (sqrt(n/(n-1)) - 1)(d^2/n + d ||mu||^2) - o(gamma^4 d)  (o-term dropped; sign typo of the paper fixed:
    sqrt(n/(n-1)) - 1 = +Theta(1/2n))."""
    gamma = check_gamma(gamma)
    if n_k <= 1:
        raise ValueError(f"n_k must be > 1, got {n_k}")
    return 2 * d * gamma**2 / n_k + gamma**2 * (np.sqrt(n_k / (n_k - 1)) - 1) * (d**2 / n_k + d * mu_norm_sq)


def class_means(num_classes: int, d: int, mu_norm: float) -> np.ndarray:
    """Centred class means of equal norm: +-mu_norm e_i pairs (needs d >= ceil(K/2)); for K = 1 a single mean."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if mu_norm < 0:
        raise ValueError(f"mu_norm must be >= 0, got {mu_norm}")
    if num_classes > 2 * d:
        raise ValueError(f"num_classes must be <= 2 d for centred +-e_i means, got num_classes={num_classes}, d={d}")
    means = np.zeros((num_classes, d))
    for k in range(num_classes):
        means[k, k // 2] = mu_norm if k % 2 == 0 else -mu_norm
    return as_array("means", means)
