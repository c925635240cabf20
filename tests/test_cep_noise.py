"""Statistics and reproducibility of the CEP noise stream (cep::perturb with x = 0 and gamma = sqrt(dim) is the noise)."""
import numpy as np
import pytest
import torch
from scipy import stats

from models import cep

NUM_SAMPLES = 1 << 18


def noise(mode, seed=1, offset=0, numel=NUM_SAMPLES, device="cpu"):
    return cep.perturb(torch.zeros(numel, device=device), gamma=1.0, mode=mode, seed=seed, offset=offset, dim=1)


@pytest.mark.parametrize("mode, distribution, mean, variance, bound", [
    ("uniform", stats.uniform(loc=-1, scale=2), 0.0, 1 / 3, 1.0),
    ("gaussian", stats.norm(), 0.0, 1.0, None),
])
def test_noise_moments_range_and_kolmogorov_smirnov(mode, distribution, mean, variance, bound):
    sample = noise(mode).double().numpy()
    standard_error = np.sqrt(variance / sample.size)
    assert abs(sample.mean() - mean) < 5 * standard_error
    assert abs(sample.var() - variance) < 0.01 * variance
    if bound is not None:
        assert sample.min() > -bound and sample.max() < bound and sample.max() > 0.999 * bound
    else:  # Box-Muller from 24-bit uniforms: |z| <= sqrt(2 ln 2^24) ~ 5.77
        assert np.abs(sample).max() < 5.8 and np.abs(sample).max() > 3.5
    assert stats.kstest(sample, distribution.cdf).pvalue > 1e-3
    # a wrong distribution must be rejected, or the test above could not fail
    other = stats.norm(scale=0.6) if mode == "uniform" else stats.uniform(loc=-1, scale=2)
    assert stats.kstest(sample, other.cdf).pvalue < 1e-6


@pytest.mark.parametrize("mode", cep.MODES)
def test_same_noise_for_any_thread_count(mode):
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(noise(mode, seed=77, offset=5, numel=100_003))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.parametrize("mode", cep.MODES)
def test_offsets_and_seeds_give_independent_streams(mode):
    base = noise(mode, seed=3, offset=0).double().numpy()
    shifted = noise(mode, seed=3, offset=NUM_SAMPLES).double().numpy()
    reseeded = noise(mode, seed=4, offset=0).double().numpy()
    limit = 5 / np.sqrt(NUM_SAMPLES)  # |correlation| of independent samples is ~ N(0, 1/n)
    for other in (shifted, reseeded):
        assert abs(np.corrcoef(base, other)[0, 1]) < limit
        assert stats.ks_2samp(base, other).pvalue > 1e-3  # same distribution, different values
        assert not np.array_equal(base, other)
    # neighbouring elements (lanes of one Philox call, consecutive calls) are uncorrelated too
    assert abs(np.corrcoef(base[:-1], base[1:])[0, 1]) < limit
    assert abs(np.corrcoef(base[:-4], base[4:])[0, 1]) < limit


def test_offset_windows_overlap_exactly():
    full = noise("gaussian", seed=8, offset=0, numel=4096)
    window = noise("gaussian", seed=8, offset=1001, numel=2000)
    assert torch.equal(window, full[1001:3001])


def test_cross_attention_uses_the_perturb_stream():
    q, context = torch.randn(1, 2, 3, 4), torch.randn(1, 5, 6)
    w_k, w_v = torch.randn(8, 6), torch.randn(8, 6)
    fused = cep.cross_attention(q, context, w_k, w_v, gamma=2.0, mode="gaussian", seed=21, offset=9)
    noisy = cep.perturb(context, 2.0, "gaussian", seed=21, offset=9)
    torch.testing.assert_close(fused, cep.cross_attention(q, noisy, w_k, w_v), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fused, cep.cross_attention(q, context, w_k, w_v), atol=1e-3)
