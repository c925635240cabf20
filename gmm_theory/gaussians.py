"""Gaussian building blocks in float64: argument checks, empirical statistics, entropy and 2-Wasserstein (Bures).

Every function accepts leading batch dimensions (e.g. many training-set draws at once): means are [..., d],
covariances [..., d, d].
"""
import numpy as np


def as_array(name: str, value, ndim: int | None = None, min_ndim: int | None = None) -> np.ndarray:
    """float64 copy of `value`, checked to be finite and of the right rank; errors name the argument."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be a numeric array, got {type(value).__name__}") from error
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if min_ndim is not None and array.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def check_gamma(gamma) -> np.ndarray:
    """The corruption scale gamma (scalar or array) must be finite and >= 0."""
    gamma = as_array("gamma", gamma)
    if np.any(gamma < 0):
        raise ValueError(f"gamma must be >= 0, got {gamma.min()}")
    return gamma


def check_mean_cov(mean: np.ndarray, cov: np.ndarray, mean_name: str = "mean", cov_name: str = "cov"):
    mean = as_array(mean_name, mean, min_ndim=1)
    cov = as_array(cov_name, cov, min_ndim=2)
    d = mean.shape[-1]
    if cov.shape[-2:] != (d, d):
        raise ValueError(f"{cov_name} must have trailing shape ({d}, {d}) to match {mean_name}, got {cov.shape}")
    return mean, cov


def empirical_stats(x) -> tuple[np.ndarray, np.ndarray]:
    """mu_hat and the biased (1/n_k) covariance of the rows of x [..., n_k, d] (paper §4: Sigma_k uses 1/n_k).

    The theory needs a full-rank Sigma_k, hence n_k > d.
    """
    x = as_array("x", x, min_ndim=2)
    n, d = x.shape[-2:]
    if n <= d:
        raise ValueError(f"n_k must exceed d for a full-rank empirical covariance, got n_k={n} samples with d={d}")
    mean = x.mean(axis=-2)
    centred = x - mean[..., None, :]
    cov = np.einsum("...ni,...nj->...ij", centred, centred) / n
    return mean, cov


def entropy(cov) -> np.ndarray:
    """Differential entropy of N(., cov): 1/2 log det(2 pi e cov)."""
    return entropy_from_eigenvalues(np.linalg.eigvalsh(as_array("cov", cov, min_ndim=2)))


def entropy_from_eigenvalues(eigenvalues: np.ndarray) -> np.ndarray:
    """1/2 sum_i log(2 pi e lambda_i), for covariance eigenvalues [..., d]."""
    if np.any(eigenvalues <= 0):
        raise ValueError("cov must be positive definite to have a differential entropy")
    return 0.5 * (eigenvalues.shape[-1] * np.log(2 * np.pi * np.e) + np.log(eigenvalues).sum(-1))


def sqrtm_psd(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix (tiny negative eigenvalues from round-off -> 0)."""
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    root = np.sqrt(np.clip(eigenvalues, 0.0, None))
    return np.einsum("...ij,...j,...kj->...ik", eigenvectors, root, eigenvectors)


def w2_squared(mean1, cov1, mean2, cov2) -> np.ndarray:
    """Squared 2-Wasserstein distance between Gaussians (Bures):
    ||m1 - m2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)."""
    mean1, cov1 = check_mean_cov(mean1, cov1, "mean1", "cov1")
    mean2, cov2 = check_mean_cov(mean2, cov2, "mean2", "cov2")
    if mean1.shape[-1] != mean2.shape[-1]:
        raise ValueError(f"mean1 and mean2 must have the same dimension, got {mean1.shape} and {mean2.shape}")
    root1 = sqrtm_psd(cov1)
    cross = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    trace_cross = np.sqrt(np.clip(cross, 0.0, None)).sum(axis=-1)
    mean_term = ((mean1 - mean2) ** 2).sum(axis=-1)
    return mean_term + np.trace(cov1, axis1=-2, axis2=-1) + np.trace(cov2, axis1=-2, axis2=-1) - 2 * trace_cross


def w2_squared_to_isotropic(mean, cov, true_mean) -> np.ndarray:
    """W2^2 from N(true_mean, I) (the paper's ground-truth class distribution) to N(mean, cov):
    ||mean - true_mean||^2 + d + tr(cov) - 2 tr(cov^1/2)  (paper Theorem 2 proof, Appendix C)."""
    mean, cov = check_mean_cov(mean, cov)
    return w2_squared_to_isotropic_from_eigenvalues(mean, np.linalg.eigvalsh(cov), true_mean)


def w2_squared_to_isotropic_from_eigenvalues(mean: np.ndarray, eigenvalues: np.ndarray, true_mean) -> np.ndarray:
    """`w2_squared_to_isotropic` given the eigenvalues [..., d] of cov (tr(cov^1/2) = sum sqrt(lambda_i))."""
    true_mean = as_array("true_mean", true_mean, min_ndim=1)
    mean_term = ((mean - true_mean) ** 2).sum(axis=-1)
    roots = np.sqrt(np.clip(eigenvalues, 0.0, None))
    return mean_term + eigenvalues.shape[-1] + eigenvalues.sum(axis=-1) - 2 * roots.sum(axis=-1)
