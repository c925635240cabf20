"""The corruption the experiments actually use: label flips at ratio eta (paper §3.1, Appendix B.1).

A sample keeps its label with probability 1 - eta; otherwise its new label is drawn from the class prior without the
true class, P(new = k | true = j) = w_k / (1 - w_j). The points labelled k then come from the mixture
  pi_k ∝ w_k (1 - eta),   pi_j ∝ w_j eta w_k / (1 - w_j)  (j != k)
of the true class conditionals N(mu_j, I). Two learners are modelled:
  - the paper's linear denoiser, which learns the Gaussian with the labelled set's mean and (1/n) covariance
    (Lemma 1 applied to the corrupted set), on finite training sets: closed-form entropy and W2;
  - an expressive model that learns the labelled mixture itself (population limit): entropy by Monte Carlo,
    W2 by exact optimal transport on samples (POT `emd2`), whose sample-size bias is estimated by the same
    computation between two independent samples of the truth.
"""
import math

import numpy as np
import ot
from scipy.special import logsumexp

from .gaussians import as_array


def check_eta(eta: float) -> float:
    eta = float(eta)
    if not 0 <= eta < 1:
        raise ValueError(f"eta must be in [0, 1), got {eta}")
    return eta


def effective_gamma(eta: float, num_classes: int) -> float:
    """gmm_theory's eta-to-gamma bridge: the CEP gamma whose mean shrinkage 1/(1+gamma^2) equals that of symmetric
    flips at ratio eta under a uniform prior with centred class means, where the labelled mean is
    mu_k (1 - eta K/(K-1)); so gamma^2 = 1/(1 - eta K/(K-1)) - 1 (inf once flips erase the class)."""
    shrink = 1 - check_eta(eta) * num_classes / (num_classes - 1)
    return math.sqrt(1 / shrink - 1) if shrink > 0 else math.inf


def labelled_mixture_weights(weights, eta: float, class_index: int) -> np.ndarray:
    """pi_j = P(true class j | label k) under symmetric prior-weighted flips at ratio eta."""
    weights = as_array("weights", weights, ndim=1)
    if np.any(weights <= 0) or not np.isclose(weights.sum(), 1.0):
        raise ValueError("weights must be positive and sum to 1")
    if weights.size < 2:
        raise ValueError("weights must describe at least 2 classes for label flips")
    if not 0 <= class_index < weights.size:
        raise ValueError(f"class_index must be in [0, {weights.size}), got {class_index}")
    eta = check_eta(eta)
    joint = weights * eta * weights[class_index] / (1 - weights)
    joint[class_index] = weights[class_index] * (1 - eta)
    return joint / joint.sum()


def mixture_log_density(points: np.ndarray, means: np.ndarray, mixture: np.ndarray) -> np.ndarray:
    """log sum_j pi_j N(x; mu_j, I) for points [N, d]."""
    d = means.shape[1]
    squared = ((points[:, None, :] - means[None]) ** 2).sum(-1)
    with np.errstate(divide="ignore"):
        log_pi = np.log(mixture)
    return logsumexp(log_pi - 0.5 * squared, axis=1) - 0.5 * d * np.log(2 * np.pi)


def sample_mixture(means: np.ndarray, mixture: np.ndarray, num: int, rng: np.random.Generator) -> np.ndarray:
    components = rng.choice(len(mixture), size=num, p=mixture)
    return means[components] + rng.standard_normal((num, means.shape[1]))


def mixture_entropy(means, mixture, num_samples: int, rng: np.random.Generator) -> tuple[float, float]:
    """Monte-Carlo differential entropy -E log p(x) of the mixture, with its standard error."""
    points = sample_mixture(means, mixture, num_samples, rng)
    log_density = mixture_log_density(points, means, mixture)
    return float(-log_density.mean()), float(log_density.std() / np.sqrt(num_samples))


def sample_w2_squared(a: np.ndarray, b: np.ndarray) -> float:
    """Exact W2^2 between two equal-size empirical measures (POT network simplex)."""
    uniform = np.full(len(a), 1.0 / len(a))
    return float(ot.emd2(uniform, np.full(len(b), 1.0 / len(b)), ot.dist(a, b), numItermax=10_000_000))


def flipped_training_sets(means, class_index: int, mixture: np.ndarray, n_k: int, num_draws: int,
                          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Coupled clean and label-flipped training sets for class k, each [num_draws, n_k, d].

    The flipped set replaces a Binomial(n_k, 1 - pi_k) share of the clean points by points of the other classes
    (drawn in proportion to pi_j), so clean and corrupted learners see the same noise where they overlap.
    """
    means = as_array("means", means, ndim=2)
    d = means.shape[1]
    clean = means[class_index] + rng.standard_normal((num_draws, n_k, d))
    flipped = clean.copy()
    others = np.delete(np.arange(len(means)), class_index)
    other_share = mixture[others] / mixture[others].sum() if mixture[others].sum() > 0 else None
    num_replaced = rng.binomial(n_k, 1 - mixture[class_index], size=num_draws)
    for draw, count in enumerate(num_replaced):
        if count:
            sources = rng.choice(others, size=count, p=other_share)
            flipped[draw, :count] = means[sources] + rng.standard_normal((count, d))
    return clean, flipped

