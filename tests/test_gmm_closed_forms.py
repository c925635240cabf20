import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gmm_theory.closed_forms import (delta_entropy_formula, expected_mean_gain, generated_distribution,
                                     learned_target, linear_denoiser, theorem2_lower_bound)
from gmm_theory.experiments import sample_empirical_stats
from gmm_theory.gaussians import empirical_stats, entropy, w2_squared, w2_squared_to_isotropic
from gmm_theory.label_flip import sample_w2_squared


def random_covariance(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.2 * np.eye(d)


def test_w2_matches_exact_optimal_transport_on_large_samples():
    rng = np.random.default_rng(0)
    m1, m2 = np.array([0.0, 0.0]), np.array([1.0, -0.5])
    s1, s2 = np.array([[1.0, 0.3], [0.3, 0.5]]), np.array([[2.0, -0.2], [-0.2, 1.0]])
    closed = w2_squared(m1, s1, m2, s2)
    estimates = [sample_w2_squared(rng.multivariate_normal(m1, s1, 2000), rng.multivariate_normal(m2, s2, 2000))
                 for _ in range(3)]
    # 2000-point OT in 2-D has a sampling error of a few percent (measured: 1.63-1.72 around 1.66).
    assert np.mean(estimates) == pytest.approx(closed, rel=0.06)


def test_w2_one_dimensional_and_identical_cases():
    assert w2_squared([1.0], [[4.0]], [-1.0], [[1.0]]) == pytest.approx((1 + 1) ** 2 + (2 - 1) ** 2)
    rng = np.random.default_rng(1)
    cov = random_covariance(rng, 5)
    mean = rng.standard_normal(5)
    assert w2_squared(mean, cov, mean, cov) == pytest.approx(0.0, abs=1e-10)
    assert w2_squared_to_isotropic(mean, np.eye(5), mean) == pytest.approx(0.0, abs=1e-12)
    # the isotropic special case agrees with the general Bures formula
    assert w2_squared_to_isotropic(mean, cov, np.zeros(5)) == pytest.approx(w2_squared(mean, cov, np.zeros(5), np.eye(5)))


def test_entropy_of_standard_normal():
    assert entropy(np.eye(3)) == pytest.approx(1.5 * math.log(2 * math.pi * math.e))


def test_finite_horizon_forms_converge_to_the_limits():
    rng = np.random.default_rng(2)
    target = learned_target(rng.standard_normal(4), random_covariance(rng, 4), 0.5, "exact")
    errors = []
    for horizon in (1.0, 3.0, 6.0, 12.0):
        finite = generated_distribution(target, horizon)
        errors.append(np.abs(finite.mean - target.mean).max() + np.abs(finite.cov - target.cov).max())
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-4
    limit = generated_distribution(target, math.inf)
    assert limit.cov is target.cov


def test_finite_horizon_clean_model_is_lemma3():
    """Lemma 3 per eigen-direction, written out for a diagonal Sigma."""
    lam, mu, horizon = np.array([0.5, 2.0]), np.array([1.0, -2.0]), 0.7
    finite = generated_distribution(learned_target(mu, np.diag(lam)), horizon)
    e = 1 - np.sqrt(lam) * math.exp(-horizon) / np.sqrt(1 + (lam - 1) * math.exp(-2 * horizon))
    np.testing.assert_allclose(finite.mean, e * mu)
    np.testing.assert_allclose(np.diag(finite.cov), lam / (1 + (lam - 1) * math.exp(-2 * horizon)))


@settings(max_examples=40, deadline=None)
@given(gamma=st.floats(1e-3, 5.0), d=st.integers(1, 12), extra=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_entropy_gain_is_positive_and_matches_closed_forms(gamma, d, extra, seed):
    rng = np.random.default_rng(seed)
    mu_hat, sigma_hat = empirical_stats(rng.standard_normal((d + extra, d)) + 1.0)
    clean = learned_target(mu_hat, sigma_hat)
    for version in ("paper", "exact"):
        corrupted = learned_target(mu_hat, sigma_hat, gamma, version)
        generic = entropy(corrupted.cov) - entropy(clean.cov)
        assert generic > 0
        assert delta_entropy_formula(mu_hat, sigma_hat, gamma, version) == pytest.approx(generic, rel=1e-6, abs=1e-12)


def test_exact_entropy_gain_does_not_grow_with_dimension():
    """With ||mu|| fixed, the exact optimum's Delta-H stays O(gamma^2) while the paper's grows like d (digest §1.9)."""
    gains = {}
    for d in (4, 64):
        mu = np.zeros(d)
        mu[0] = 2.0
        gains[d] = {v: float(delta_entropy_formula(mu, np.eye(d), 0.1, v)) for v in ("paper", "exact")}
    assert gains[64]["paper"] / gains[4]["paper"] == pytest.approx(16, rel=0.01)
    assert gains[64]["exact"] == pytest.approx(gains[4]["exact"])


def test_gamma_zero_reproduces_the_clean_model():
    rng = np.random.default_rng(3)
    mu_hat, sigma_hat = rng.standard_normal(3), random_covariance(rng, 3)
    for version in ("paper", "exact"):
        target = learned_target(mu_hat, sigma_hat, 0.0, version)
        np.testing.assert_allclose(target.cov, sigma_hat)
        np.testing.assert_allclose(target.mean, mu_hat)


def test_linear_denoiser_is_the_score_of_the_noised_target():
    rng = np.random.default_rng(4)
    target = learned_target(rng.standard_normal(3), random_covariance(rng, 3))
    t = 0.3
    weight, bias = linear_denoiser(target, t)
    r, sigma = math.exp(-t), math.sqrt(1 - math.exp(-2 * t))
    x = rng.standard_normal(3)
    noised_cov = r**2 * target.cov + sigma**2 * np.eye(3)
    score = -np.linalg.solve(noised_cov, x - r * target.mean)
    np.testing.assert_allclose(-(weight @ x + bias) / sigma, score)


def test_sampled_statistics_follow_their_sampling_laws():
    rng = np.random.default_rng(5)
    mu = np.array([2.0, 0.0, 0.0])
    mu_hat, sigma_hat = sample_empirical_stats(mu, 20, 20000, rng)
    np.testing.assert_allclose(mu_hat.mean(0), mu, atol=1e-10)  # antithetic pairs average to mu exactly
    np.testing.assert_allclose(mu_hat[:20000].var(0), 1 / 20, rtol=0.05)
    np.testing.assert_allclose(sigma_hat.mean(0), (19 / 20) * np.eye(3), atol=0.01)
    # compare with the statistics of real samples
    direct = empirical_stats(mu + rng.standard_normal((20000, 20, 3)))[1]
    assert np.trace(direct, axis1=1, axis2=2).var() == pytest.approx(
        np.trace(sigma_hat[:20000], axis1=1, axis2=2).var(), rel=0.1)


def test_expected_mean_gain_matches_monte_carlo():
    rng = np.random.default_rng(6)
    d, n_k, gamma = 6, 30, 0.4
    mu = np.zeros(d)
    mu[0] = 1.5
    mu_hat = mu + rng.standard_normal((200_000, d)) / math.sqrt(n_k)
    gain = ((mu_hat - mu) ** 2).sum(1) - ((mu_hat / (1 + gamma**2) - mu) ** 2).sum(1)
    assert gain.mean() == pytest.approx(expected_mean_gain(gamma, d, n_k, 1.5**2), abs=4 * gain.std() / 447)


def test_theorem2_bound_is_positive_and_scales_with_gamma_squared():
    assert theorem2_lower_bound(0.1, 8, 100, 4.0) > 0
    assert theorem2_lower_bound(0.2, 8, 100, 4.0) == pytest.approx(4 * theorem2_lower_bound(0.1, 8, 100, 4.0))


@pytest.mark.parametrize("call, name", [
    (lambda: learned_target(np.zeros(2), np.eye(2), -0.1), "gamma"),
    (lambda: empirical_stats(np.zeros((3, 3))), "n_k"),
    (lambda: learned_target(np.zeros(3), np.eye(2)), "sigma_hat"),
    (lambda: learned_target(np.zeros(2), np.eye(2), 0.1, "isotropic"), "version"),
    (lambda: w2_squared(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3)), "mean1 and mean2"),
    (lambda: generated_distribution(learned_target(np.zeros(2), np.eye(2)), -1.0), "horizon"),
    (lambda: entropy(-np.eye(2)), "cov"),
    (lambda: empirical_stats([[1.0, np.nan], [0, 0], [1, 1]]), "x"),
    (lambda: theorem2_lower_bound(0.1, 4, 1, 1.0), "n_k"),
])
def test_invalid_arguments_name_the_argument(call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call()
