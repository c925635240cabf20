"""The numerical experiments behind `python -m gmm_theory.verify`: each returns plain records (lists of dicts)."""
import math
from collections.abc import Callable, Iterable

import numpy as np

from .closed_forms import (VERSIONS, Gaussian, class_means, expected_mean_gain, generated_distribution,
                           learned_target, theorem2_lower_bound)
from .exact_optimum import check_exact_optimum
from .gaussians import (empirical_stats, entropy, entropy_from_eigenvalues, w2_squared_to_isotropic,
                        w2_squared_to_isotropic_from_eigenvalues)
from .label_flip import (effective_gamma, flipped_training_sets, labelled_mixture_weights, mixture_entropy,
                         sample_mixture, sample_w2_squared)
from .simulation import simulate_probability_flow


def sample_empirical_stats(true_mean: np.ndarray, n_k: int, num_pairs: int, rng: np.random.Generator):
    """(mu_hat, Sigma) of `2 num_pairs` training sets of n_k points from N(true_mean, I), drawn exactly from their
    sampling laws instead of from the points: mu_hat ~ N(mu, I/n_k) independent of n_k Sigma ~ Wishart(n_k - 1, I)
    (Bartlett decomposition). Draws come in antithetic pairs (mu + delta, Sigma), (mu - delta, Sigma), an unbiased
    variance reduction that cancels the zero-mean mu^T delta term; standard errors must be taken over pair means."""
    d = true_mean.shape[0]
    if n_k <= d:
        raise ValueError(f"n_k must exceed d for a full-rank empirical covariance, got n_k={n_k}, d={d}")
    delta = rng.standard_normal((num_pairs, d)) / math.sqrt(n_k)
    bartlett = np.tril(rng.standard_normal((num_pairs, d, d)), k=-1)
    degrees = n_k - 1 - np.arange(d)  # diagonal entries: sqrt(chi^2 with n_k - 1 - i degrees of freedom)
    bartlett[:, np.arange(d), np.arange(d)] = np.sqrt(rng.chisquare(degrees, size=(num_pairs, d)))
    sigma_hat = bartlett @ np.swapaxes(bartlett, -1, -2) / n_k
    mu_hat = np.concatenate([true_mean + delta, true_mean - delta])
    return mu_hat, np.concatenate([sigma_hat, sigma_hat])


def pair_mean_and_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of antithetic draws laid out as [first halves, second halves]."""
    half = len(values) // 2
    pairs = 0.5 * (values[:half] + values[half:])
    return float(pairs.mean()), float(pairs.std(ddof=1) / math.sqrt(half))


MU_SCALINGS = ("fixed", "proportional")


def theorem_sweep(dims: Iterable[int], sample_sizes: Iterable[int], gammas: Iterable[float], num_pairs: int,
                  mu_norm: float, horizon: float, rng: np.random.Generator,
                  progress: Callable[[Iterable], Iterable] = iter, mu_scaling: str = "fixed") -> list[dict]:
    """Delta-H (Theorem 1) and Delta-W2^2 = W2^2(P, clean) - W2^2(P, corrupted) (Theorem 2), both versions, averaged
    over training-set draws; by rotation invariance mu_k = |mu| e_1. mu_scaling "fixed" holds ||mu_k|| = mu_norm at
    every d (the theorems' assumption); "proportional" grows ||mu_k||^2 = mu_norm^2 d / min(dims) with d, the case in
    which the exact optimum's Delta-H = 1/2 log(1 + gamma^2/(1+gamma^2) mu^T Sigma^-1 mu) scales like gamma^2 d."""
    if mu_scaling not in MU_SCALINGS:
        raise ValueError(f"mu_scaling must be one of {MU_SCALINGS}, got {mu_scaling!r}")
    records = []
    dims = list(dims)
    grid = [(d, n) for d in dims for n in sample_sizes if n > d]
    for d, n_k in progress(grid):
        norm = mu_norm * math.sqrt(d / min(dims)) if mu_scaling == "proportional" else mu_norm
        true_mean = np.zeros(d)
        true_mean[0] = norm
        mu_hat, sigma_hat = sample_empirical_stats(true_mean, n_k, num_pairs, rng)

        def entropy_and_w2(target):
            generated = generated_distribution(target, horizon)
            eigenvalues = np.linalg.eigvalsh(generated.cov)  # one decomposition serves both quantities
            return (entropy_from_eigenvalues(eigenvalues),
                    w2_squared_to_isotropic_from_eigenvalues(generated.mean, eigenvalues, true_mean))

        entropy_clean, w2_clean = entropy_and_w2(learned_target(mu_hat, sigma_hat))
        for gamma in gammas:
            for version in VERSIONS:
                entropy_corrupted, w2_corrupted = entropy_and_w2(learned_target(mu_hat, sigma_hat, gamma, version))
                delta_h = entropy_corrupted - entropy_clean
                delta_w2 = w2_clean - w2_corrupted
                dh_mean, dh_se = pair_mean_and_se(delta_h)
                dw_mean, dw_se = pair_mean_and_se(delta_w2)
                records.append(dict(
                    d=d, n_k=n_k, mu_norm=norm, gamma=float(gamma), version=version, delta_h=dh_mean,
                    delta_h_se=dh_se, delta_h_min=float(delta_h.min()), delta_w2=dw_mean, delta_w2_se=dw_se,
                    bound=float(theorem2_lower_bound(gamma, d, n_k, norm**2)),
                    mean_gain_exact=float(expected_mean_gain(gamma, d, n_k, norm**2)),
                    in_theorem2_range=bool(0 < gamma <= 1 / math.sqrt(n_k)),
                ))
    return records


def moment_errors(particles: np.ndarray, closed: Gaussian, true_mean: np.ndarray) -> dict:
    mean, cov = empirical_stats(particles)
    return dict(
        mean_error=float(np.linalg.norm(mean - closed.mean)),
        cov_rel_error=float(np.linalg.norm(cov - closed.cov) / np.linalg.norm(closed.cov)),
        entropy_error=float(abs(entropy(cov) - entropy(closed.cov))),
        w2_error=float(abs(w2_squared_to_isotropic(mean, cov, true_mean)
                           - w2_squared_to_isotropic(closed.mean, closed.cov, true_mean))),
    )


def simulation_study(d: int, n_k: int, gamma: float, horizon: float, steps: Iterable[int],
                     particles: Iterable[int], mu_norm: float, rng: np.random.Generator,
                     progress: Callable[[Iterable], Iterable] = iter) -> list[dict]:
    """Euler ODE particles vs the finite-T closed forms (Lemmas 3, 4 and the exact optimum) for one training set."""
    true_mean = np.zeros(d)
    true_mean[0] = mu_norm
    mu_hat, sigma_hat = empirical_stats(true_mean + rng.standard_normal((n_k, d)))
    targets = {"clean": learned_target(mu_hat, sigma_hat)}
    targets.update({f"corrupted-{v}": learned_target(mu_hat, sigma_hat, gamma, v) for v in VERSIONS})
    # Steps are swept at the most particles and particles at the most steps (the two error sources separately).
    steps, particles = sorted(steps), sorted(particles)
    settings = sorted({(s, particles[-1]) for s in steps} | {(steps[-1], p) for p in particles})
    records = []
    for (name, target), (num_steps, num_particles) in progress(
            [(item, setting) for item in targets.items() for setting in settings]):
        z = simulate_probability_flow(target, horizon, num_steps, num_particles, rng)
        closed = generated_distribution(target, horizon)
        records.append(dict(model=name, steps=num_steps, particles=num_particles,
                            **moment_errors(z, closed, true_mean)))
    return records


def exact_optimum_study(d: int, n_k: int, gammas: Iterable[float], t: float, num_classes: int, num_samples: int,
                        mu_norm: float, rng: np.random.Generator) -> list[dict]:
    """Least squares on Monte-Carlo samples vs the paper's (isotropic) and exact (rank-one) optimal W_t."""
    true_mean = np.zeros(d)
    true_mean[0] = mu_norm
    x = true_mean + rng.standard_normal((n_k, d))
    records = []
    for gamma in gammas:
        check = check_exact_optimum(x, gamma, t, num_classes, 0, num_samples, seed=int(rng.integers(2**31)))
        records.append(dict(d=d, n_k=n_k, gamma=float(gamma), t=t, num_samples=num_samples,
                            w_error_paper=check.relative_error["paper"], w_error_exact=check.relative_error["exact"],
                            b_error_paper=check.bias_relative_error["paper"],
                            b_error_exact=check.bias_relative_error["exact"]))
    return records


def label_flip_study(d: int, num_classes: int, n_k: int, etas: Iterable[float], num_draws: int, mu_norm: float,
                     mc_samples: int, ot_samples: int, rng: np.random.Generator,
                     progress: Callable[[Iterable], Iterable] = iter) -> list[dict]:
    """Entropy and W2 of what is learned from label-flipped data, class 0, uniform class prior; gamma_eff is the CEP
    gamma with the same mean shrinkage (label_flip.effective_gamma)."""
    means = class_means(num_classes, d, mu_norm)
    weights = np.full(num_classes, 1.0 / num_classes)
    truth = means[0]
    truth_entropy = float(entropy(np.eye(d)))
    # Sample-size bias of the OT estimate: W2^2 between two independent samples of the truth itself. Every estimate
    # uses the same reference sample of the truth, so its noise partly cancels in the difference.
    reference = truth + rng.standard_normal((ot_samples, d))
    ot_bias = sample_w2_squared(truth + rng.standard_normal((ot_samples, d)), reference)
    records = []
    for eta in progress(list(etas)):
        mixture = labelled_mixture_weights(weights, eta, 0)
        clean_sets, flipped_sets = flipped_training_sets(means, 0, mixture, n_k, num_draws, rng)
        clean_mean, clean_cov = empirical_stats(clean_sets)
        flip_mean, flip_cov = empirical_stats(flipped_sets)
        delta_h = entropy(flip_cov) - entropy(clean_cov)
        delta_w2 = (w2_squared_to_isotropic(clean_mean, clean_cov, truth)
                    - w2_squared_to_isotropic(flip_mean, flip_cov, truth))
        gamma_eff = effective_gamma(eta, num_classes)
        mixture_h, mixture_h_se = mixture_entropy(means, mixture, mc_samples, rng)
        mixture_w2 = sample_w2_squared(sample_mixture(means, mixture, ot_samples, rng), reference)
        records.append(dict(
            eta=float(eta), gamma_eff=gamma_eff, pi_true=float(mixture[0]),
            delta_h_gaussian=float(delta_h.mean()), delta_h_gaussian_se=float(delta_h.std(ddof=1) / math.sqrt(num_draws)),
            delta_w2_gaussian=float(delta_w2.mean()),
            delta_w2_gaussian_se=float(delta_w2.std(ddof=1) / math.sqrt(num_draws)),
            mixture_entropy_gain=mixture_h - truth_entropy, mixture_entropy_se=mixture_h_se,
            mixture_w2_ot=mixture_w2, ot_bias=ot_bias, mixture_w2_debiased=mixture_w2 - ot_bias,
        ))
    return records
