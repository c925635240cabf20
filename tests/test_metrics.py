"""evaluation/metrics.py against closed forms and independent (numpy/scipy/sklearn) computations."""
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.special
import scipy.stats
import torch
from sklearn.neighbors import NearestNeighbors

from evaluation import metrics


def gaussian(n, dim, mean=0.0, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) * std + mean


def frechet_numpy(a, b):
    """Independent Frechet distance from sample statistics (scipy sqrtm, unbiased covariances)."""
    a, b = a.numpy(), b.numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


# ----------------------------------------------------------------------------- FID / sFID

def test_fid_of_a_set_against_itself_is_zero():
    x = gaussian(500, 6)
    assert abs(metrics.frechet_distance(x, x)) < 1e-6


def test_fid_matches_the_gaussian_closed_form():
    dim, shift, scale = 4, 1.5, 2.0
    real = gaussian(20000, dim, seed=1)
    fake = gaussian(20000, dim, mean=shift, std=scale, seed=2)
    fid = metrics.frechet_distance(real, fake)
    # N(0, I) vs N(shift 1, scale^2 I): ||mu||^2 + tr(I + scale^2 I - 2 scale I)
    closed_form = dim * shift ** 2 + dim * (1 + scale ** 2 - 2 * scale)
    assert fid == pytest.approx(closed_form, rel=0.05)
    assert fid == pytest.approx(frechet_numpy(real, fake), rel=1e-6)


# ----------------------------------------------------------------------------- KID / IS

def poly_mmd_numpy(a, b):
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, written out independently."""
    d = a.shape[1]
    k = lambda x, y: (x @ y.T / d + 1) ** 3
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    m = len(a)
    return ((kaa.sum() - np.trace(kaa)) + (kbb.sum() - np.trace(kbb))) / (m * (m - 1)) - 2 * kab.mean()


def test_kid_sanity_and_independent_value():
    real, same, far = gaussian(300, 5, seed=3), gaussian(300, 5, seed=4), gaussian(300, 5, mean=1.0, seed=5)
    near_mean, _ = metrics.kernel_inception_distance(real, same, subsets=20, subset_size=100)
    far_mean, _ = metrics.kernel_inception_distance(real, far, subsets=20, subset_size=100)
    assert abs(near_mean) < 0.05 < far_mean
    full, std = metrics.kernel_inception_distance(real, far, subsets=1, subset_size=300)
    assert full == pytest.approx(poly_mmd_numpy(real.numpy(), far.numpy()), rel=1e-6) and std == 0
    assert (metrics.kernel_inception_distance(real, far, subsets=3, subset_size=50, seed=7)
            == metrics.kernel_inception_distance(real, far, subsets=3, subset_size=50, seed=7))


def test_inception_score_bounds():
    k = 10
    confident = torch.nn.functional.one_hot(torch.arange(1000) % k, k).double() * 50  # balanced, certain
    assert metrics.inception_score(confident, splits=1)[0] == pytest.approx(k, rel=1e-6)
    uninformative = torch.zeros(1000, k, dtype=torch.float64)
    assert metrics.inception_score(uninformative, splits=5)[0] == pytest.approx(1.0)
    single_class = torch.nn.functional.one_hot(torch.zeros(1000, dtype=torch.long), k).double() * 50
    assert metrics.inception_score(single_class, splits=1)[0] == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------- precision / recall

def precision_recall_numpy(real, fake, k):
    real, fake = real.numpy(), fake.numpy()
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]                     # column 0 is the point itself
    def coverage(queries, centres, r):
        d = np.linalg.norm(queries[:, None] - centres[None], axis=-1)
        return np.mean([(row <= r).any() for row in d])
    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


def test_precision_recall_on_identical_and_separated_clouds():
    x = gaussian(200, 8)
    assert metrics.precision_recall(x, x) == (1.0, 1.0)
    assert metrics.precision_recall(x, gaussian(200, 8, mean=50.0, seed=1)) == (0.0, 0.0)


def test_precision_recall_matches_brute_force():
    real, fake = gaussian(150, 3, seed=2), gaussian(120, 3, mean=0.7, std=0.6, seed=3)
    got = metrics.precision_recall(real, fake, k=3)
    assert got == pytest.approx(precision_recall_numpy(real, fake, 3))
    assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0


# ----------------------------------------------------------------------------- TopP&R

def test_cosine_kde_matches_a_loop():
    data, queries, h = gaussian(40, 3, seed=4), gaussian(7, 3, seed=5), 1.3
    expected = [np.mean([math.cos(math.pi / 2 * r / h) if r <= h else 0.0
                         for r in np.linalg.norm(data.numpy() - q, axis=1)]) for q in queries.numpy()]
    assert metrics._cosine_kde(queries, data, h).numpy() == pytest.approx(expected)


def test_top_pr_identical_vs_separated():
    x = gaussian(400, 6, seed=6)
    same = metrics.top_pr(x, gaussian(400, 6, seed=7))
    apart = metrics.top_pr(x, gaussian(400, 6, mean=20.0, seed=8))
    assert same["top_f1"] > 0.8 and apart["top_f1"] == 0.0
    assert metrics.top_pr(x, gaussian(400, 6, seed=7)) == same                 # seeded bootstrap
    assert set(metrics.top_pr(gaussian(400, 64, seed=1), gaussian(400, 64, seed=2))) == {
        "top_precision", "top_recall", "top_f1"}                                # projection path


# ----------------------------------------------------------------------------- RMD

def rmd_numpy(x, y):
    x = x.numpy()
    classes = np.unique(y)
    means = {c: x[y == c].mean(0) for c in classes}
    within = np.stack([x[i] - means[y[i]] for i in range(len(x))])
    cov = within.T @ within / len(x)
    cov_agn = np.cov(x, rowvar=False, bias=True)
    mu = x.mean(0)
    inv, inv_agn = np.linalg.inv(cov), np.linalg.inv(cov_agn)
    return np.array([-(within[i] @ inv @ within[i]) + (x[i] - mu) @ inv_agn @ (x[i] - mu) for i in range(len(x))])


def clustered(separation, n=400, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % dim
    centres = torch.eye(dim, dtype=torch.float64) * separation
    return centres[labels] + torch.randn(n, dim, generator=g, dtype=torch.float64), labels


def test_rmd_matches_independent_computation():
    x, y = clustered(3.0)
    expected = rmd_numpy(x, y.numpy())
    assert metrics.rmd_scores(x, y, ridge=0.0).numpy() == pytest.approx(expected, rel=1e-8, abs=1e-8)
    got = metrics.relative_mahalanobis(x, y, top_fraction=0.05, ridge=0.0)
    top = np.sort(expected)[::-1][:20]
    assert got["rmd_top"] == pytest.approx(top.mean(), rel=1e-8) and got["rmd_threshold"] == pytest.approx(top[-1])


def test_rmd_sign_and_direction():
    # Class-distinct features score positive RMD, and more distinct classes score higher.
    low, high = (metrics.relative_mahalanobis(*clustered(s))["rmd_top"] for s in (2.0, 6.0))
    assert 0 < low < high
    # A sample at the global centre that claims a far-away class gets a negative RMD.
    x, y = clustered(6.0)
    expected = rmd_numpy(torch.cat([x, x.mean(0, keepdim=True)]), np.append(y.numpy(), 0))
    assert expected[-1] < 0
    # With no class structure at all, the top RMD stays below that of weakly separated classes.
    noise = metrics.relative_mahalanobis(gaussian(400, 4), torch.arange(400) % 4)["rmd_top"]
    assert noise < low


# ----------------------------------------------------------------------------- memorisation / L2

def test_memorization_ratio_counts_exact_training_copies():
    train = gaussian(300, 16, seed=9)
    fake = torch.cat([train[:30], gaussian(70, 16, mean=3.0, seed=10)])
    assert metrics.memorization_ratio(fake, train) == pytest.approx(0.30)
    assert metrics.memorization_ratio(train[:30], train) == 1.0
    normed = torch.nn.functional.normalize
    nn = NearestNeighbors(n_neighbors=1).fit(normed(train, dim=1).numpy())
    distances = nn.kneighbors(normed(fake, dim=1).numpy())[0][:, 0]
    for threshold in (0.12, 0.5, 1.0):
        assert metrics.memorization_ratio(fake, train, threshold) == pytest.approx(np.mean(distances < threshold))


def test_mean_top5_distance_matches_sklearn():
    train, fake = gaussian(200, 8, seed=11), gaussian(50, 8, seed=12)
    normed = torch.nn.functional.normalize
    nn = NearestNeighbors(n_neighbors=5).fit(normed(train, dim=1).numpy())
    expected = nn.kneighbors(normed(fake, dim=1).numpy())[0].mean()
    assert metrics.mean_topk_distance(fake, train) == pytest.approx(expected)
    assert metrics.mean_topk_distance(fake, train, normalize=False) > metrics.mean_topk_distance(fake, train)
    assert metrics.mean_topk_distance(train[:5], train, k=1) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- entropy / CLIP-style score

def test_vq_entropy_matches_scipy():
    g = torch.Generator().manual_seed(0)
    latents, codebook, tau = torch.randn(3, 4, 5, 5, generator=g), torch.randn(16, 4, generator=g), 2.0
    vectors = latents.permute(0, 2, 3, 1).reshape(-1, 4).double().numpy()
    dist = ((vectors[:, None] - codebook.double().numpy()[None]) ** 2).sum(-1)
    expected = scipy.stats.entropy(scipy.special.softmax(-dist / tau, axis=1), axis=1).mean()
    assert metrics.vq_sample_entropy(latents, codebook, tau) == pytest.approx(expected)
    # Latents on code words at a tiny temperature: certain assignment, zero entropy; huge temperature: log K.
    on_codes = codebook[torch.arange(25) % 16].reshape(1, 5, 5, 4).permute(0, 3, 1, 2)
    assert metrics.vq_sample_entropy(on_codes, codebook, 1e-4) == pytest.approx(0.0, abs=1e-6)
    assert metrics.vq_sample_entropy(latents, codebook, 1e6) == pytest.approx(math.log(16), rel=1e-4)


def test_quantization_temperature_keeps_the_entropy_off_its_floor_and_ceiling():
    g = torch.Generator().manual_seed(0)
    live = 0.01 * torch.randn(16, 3, generator=g)      # code words ~0.01 apart, as a small VQ's (tau = 1 >> that)
    # Dead code words a hair from live ones, on the side away from the data, as a trained VQ's: a code-spacing tau
    # (their ~1e-12 distances) would put the entropy at its floor.
    codebook = torch.cat([live, live + 1e-6])
    train = (live[torch.arange(64) % 16] - 0.002 * torch.rand(64, 3, generator=g)).reshape(4, 4, 4, 3)
    samples = (live[torch.arange(32) % 16] - 0.003 * torch.rand(32, 3, generator=g)).reshape(2, 4, 4, 3)
    train, samples = train.permute(0, 3, 1, 2), samples.permute(0, 3, 1, 2)
    distances = scipy.spatial.distance.cdist(train.permute(0, 2, 3, 1).reshape(-1, 3).double().numpy(),
                                             codebook.double().numpy(), "sqeuclidean")
    tau = metrics.quantization_temperature(train, codebook)
    assert tau == pytest.approx(np.median(distances.min(axis=1)))
    assert metrics.vq_sample_entropy(samples, codebook, 1.0) > 0.999 * math.log(32)   # saturated: blind to the data
    entropy = metrics.vq_sample_entropy(samples, codebook, tau)
    assert 0.2 < entropy < 0.5 * math.log(32)
    # In the codebook's own units the entropy does not depend on the latent space's scale.
    scaled = metrics.quantization_temperature(1000 * train, 1000 * codebook)
    assert metrics.vq_sample_entropy(1000 * samples, 1000 * codebook, scaled) == pytest.approx(entropy)
    with pytest.raises(ValueError, match="latents"):
        metrics.quantization_temperature(codebook[torch.arange(4)].reshape(1, 2, 2, 3).permute(0, 3, 1, 2), codebook)
    with pytest.raises(ValueError, match="latents"):
        metrics.quantization_temperature(train[0], codebook)
    with pytest.raises(ValueError, match="codebook"):
        metrics.quantization_temperature(train, codebook[:, :2])


def test_label_agreement():
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 2]), 3).double()
    assert metrics.label_agreement(logits, torch.tensor([0, 1, 2, 0])) == 0.75


def test_clip_score_range():
    a = gaussian(10, 6)
    assert metrics.clip_score(a, a) == pytest.approx(100.0)
    assert metrics.clip_score(a, -a) == 0.0
    assert metrics.clip_score(a, 3 * a, scale=2.5) == pytest.approx(2.5)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("call, match", [
    (lambda: metrics.frechet_distance(gaussian(10, 3), gaussian(10, 4)), "fake"),
    (lambda: metrics.frechet_distance(gaussian(10, 3).numpy(), gaussian(10, 3)), "real"),
    (lambda: metrics.precision_recall(gaussian(10, 3), gaussian(10, 3)[:, :, None]), "fake"),
    (lambda: metrics.precision_recall(gaussian(3, 3), gaussian(10, 3)), "real"),
    (lambda: metrics.frechet_distance(gaussian(10, 3) * float("nan"), gaussian(10, 3)), "real"),
    (lambda: metrics.relative_mahalanobis(gaussian(10, 3), torch.zeros(9, dtype=torch.long)), "labels"),
    (lambda: metrics.relative_mahalanobis(gaussian(10, 3), torch.zeros(10, dtype=torch.long), 0.0), "top_fraction"),
    (lambda: metrics.memorization_ratio(gaussian(10, 3), gaussian(10, 3), threshold=0), "threshold"),
    (lambda: metrics.vq_sample_entropy(torch.zeros(2, 3, 4), torch.zeros(5, 3)), "latents"),
    (lambda: metrics.vq_sample_entropy(torch.zeros(2, 3, 4, 4), torch.zeros(5, 2)), "codebook"),
    (lambda: metrics.vq_sample_entropy(torch.zeros(2, 3, 4, 4), torch.zeros(5, 3), 0.0), "temperature"),
    (lambda: metrics.clip_score(gaussian(4, 3), gaussian(5, 3)), "text_embeddings"),
    (lambda: metrics.label_agreement(gaussian(4, 3), torch.zeros(5, dtype=torch.long)), "labels"),
    (lambda: metrics.top_pr(gaussian(10, 3), gaussian(10, 3)), "real"),
    (lambda: metrics.top_pr(gaussian(20, 8), gaussian(20, 8)), "real"),
    (lambda: metrics.top_pr(gaussian(60, 8), gaussian(60, 8), alpha=1.5), "alpha"),
])
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
