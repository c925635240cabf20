"""Paper 1's metric suite (arXiv 2405.20494, Appendix B.7) on pre-extracted features (evaluation/features.py).

Features are extracted once per image set and shared by every metric. FID, sFID, KID and IS are torchmetrics'
implementations, fed through a pass-through `feature` module; the rest have no maintained library implementation
and are written here, each citing its paper (tests check them against independent computations).
"""
import math
import warnings

import torch
import torch.nn as nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance


def _check_features(name: str, features, min_rows: int = 2, dim: int | None = None) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(features).__name__}")
    if features.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D [N, D] feature matrix, got shape {tuple(features.shape)}")
    if len(features) < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} rows, got {len(features)}")
    if dim is not None and features.shape[1] != dim:
        raise ValueError(f"{name}: feature width {features.shape[1]} does not match the other set's {dim}")
    features = features.double()
    if not torch.isfinite(features).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return features


class PrecomputedFeatures(nn.Module):
    """Identity `feature` module for torchmetrics: the extractor already ran, so its outputs pass straight through."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


#################################################################################
#                        torchmetrics-backed metrics                            #
#################################################################################

# Every metric gets the full feature sets of one process (rank 0 scores, other ranks only sample), so torchmetrics must
# not gather across ranks on compute(): under torchrun its sync would meet the other ranks' sampling barriers.
LOCAL = {"sync_on_compute": False}

def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID (Heusel et al. 2017) on pooled features; sFID (Nash et al. 2021) when given spatial features."""
    real = _check_features("real", real)
    fake = _check_features("fake", fake, dim=real.shape[1])
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), **LOCAL)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): (mean, std) of the unbiased polynomial-kernel MMD^2 over random subsets."""
    real = _check_features("real", real)
    fake = _check_features("fake", fake, dim=real.shape[1])
    subset_size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # its "saves all features" warning: intended, features are already in memory
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        metric = KernelInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), subsets=subsets,
                                         subset_size=subset_size, **LOCAL)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng():  # torchmetrics draws subsets from the global RNG; seed it locally
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """IS (Salimans et al. 2016) from classifier logits: (mean, std) of exp E[KL(p(y|x) || p(y))] over splits."""
    logits = _check_features("logits", logits, min_rows=splits)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        metric = InceptionScore(feature=PrecomputedFeatures(logits.shape[1]), splits=splits, **LOCAL)
    metric.update(logits)
    with torch.random.fork_rng():  # the split assignment is a global-RNG permutation
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


#################################################################################
#                 Nearest-neighbour helpers (chunked, float64)                   #
#################################################################################

def _pairwise_distances(queries: torch.Tensor, points: torch.Tensor, chunk: int = 4096):
    """Yields (row slice, L2 distance block [chunk, len(points)]) so memory stays O(chunk * N)."""
    for start in range(0, len(queries), chunk):
        yield slice(start, start + chunk), torch.cdist(queries[start:start + chunk], points)


def knn_distances(queries: torch.Tensor, points: torch.Tensor, k: int, exclude_self: bool = False) -> torch.Tensor:
    """[len(queries), k] ascending distances to the k nearest `points` (skipping the query itself when the sets
    coincide, i.e. the first, zero, neighbour)."""
    skip = int(exclude_self)
    if k + skip > len(points):
        raise ValueError(f"k: needs at least {k + skip} points, got {len(points)}")
    out = torch.empty(len(queries), k, dtype=points.dtype)
    for rows, block in _pairwise_distances(queries, points):
        out[rows] = block.topk(k + skip, dim=1, largest=False).values[:, skip:]
    return out


def _inside_balls(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Bool [len(queries)]: query lies in at least one ball (centre, radius)."""
    inside = torch.empty(len(queries), dtype=torch.bool)
    for rows, block in _pairwise_distances(queries, centres):
        inside[rows] = (block <= radii[None, :]).any(dim=1)
    return inside


#################################################################################
#                      Hand-written metrics (cited)                             #
#################################################################################

def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall, Kynkaanniemi et al. 2019 (NeurIPS), Eq. 1-3.

    Each set's manifold is the union of balls around its points with radius = distance to the k-th nearest
    neighbour in the same set. Precision = share of fake samples inside the real manifold; recall = share of real
    samples inside the fake manifold. k = 3 as in the paper and the ADM evaluator.
    """
    real = _check_features("real", real, min_rows=k + 1)
    fake = _check_features("fake", fake, min_rows=k + 1, dim=real.shape[1])
    real_radii = knn_distances(real, real, k, exclude_self=True)[:, -1]
    fake_radii = knn_distances(fake, fake, k, exclude_self=True)[:, -1]
    precision = _inside_balls(fake, real, real_radii).double().mean()
    recall = _inside_balls(real, fake, fake_radii).double().mean()
    return float(precision), float(recall)


def _cosine_kde(queries: torch.Tensor, data: torch.Tensor, bandwidth: float,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine-kernel KDE at `queries`: mean over data of cos(pi/2 * r/h) for r <= h, else 0 ([Q] or [Q, B] with
    per-point bootstrap `weights` [N, B]). The kernel constant (pi/(4h))^d is dropped: TopP&R only compares
    densities with confidence bands of the same bandwidth, which scale by the same constant."""
    out = []
    for _, block in _pairwise_distances(queries, data):
        kernel = torch.where(block <= bandwidth, torch.cos(0.5 * math.pi * block / bandwidth), 0.0)
        out.append(kernel.mean(1) if weights is None else kernel @ weights / len(data))
    return torch.cat(out)


def _top_pr_support(data: torch.Tensor, alpha: float, bootstrap: int, generator: torch.Generator):
    """Bandwidth (median balloon estimate, k = 5 * dim), KDE at the data points and the bootstrap confidence band
    c = q_{1-alpha}(sqrt(n) sup|p_hat - p_boot|) / sqrt(n) (TopP&R Sec. 3, the d > 3 path of the reference code)."""
    n = len(data)
    k = 5 * data.shape[1]
    bandwidth = float(knn_distances(data, data, k, exclude_self=True)[:, -1].median())
    counts = torch.stack([torch.bincount(torch.randint(n, (n,), generator=generator), minlength=n)
                          for _ in range(bootstrap)], dim=1).double()      # (N, B) resampling multiplicities
    density = _cosine_kde(data, data, bandwidth)
    boot = _cosine_kde(data, data, bandwidth, weights=counts)             # (N, B)
    theta = math.sqrt(n) * (boot - density[:, None]).abs().amax(0)
    band = float(torch.quantile(theta, 1 - alpha)) / math.sqrt(n)
    return bandwidth, density, band


def top_pr(real: torch.Tensor, fake: torch.Tensor, alpha: float = 0.1, bootstrap: int = 10,
           projection_dim: int = 32, seed: int = 0) -> dict[str, float]:
    """TopP&R, Kim et al. 2023 (NeurIPS), "Topological precision and recall": precision, recall and their F1.

    Supports are the points whose KDE exceeds a bootstrap confidence band; precision = share of significant fake
    points also inside the real support, recall the converse. Features wider than `projection_dim` are randomly
    projected first, as in the paper. Only the paper's high-dimensional path (dim > 3: balloon bandwidth) is
    implemented; the dim <= 3 bandwidth search by persistent homology needs gudhi, which is not a dependency here.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha: expected a value in (0, 1), got {alpha}")
    real = _check_features("real", real)
    fake = _check_features("fake", fake, dim=real.shape[1])
    generator = torch.Generator().manual_seed(seed)
    if real.shape[1] > projection_dim:
        std = math.sqrt(2.0 / (real.shape[1] + projection_dim))  # Xavier-normal, as in the reference projection
        projection = torch.randn(real.shape[1], projection_dim, generator=generator, dtype=torch.float64) * std
        real, fake = real @ projection, fake @ projection
    if real.shape[1] <= 3:
        raise ValueError("real: TopP&R needs feature dim > 3 here (the low-dim path needs gudhi)")
    min_rows = 5 * real.shape[1] + 2
    for name, value in (("real", real), ("fake", fake)):
        if len(value) < min_rows:
            raise ValueError(f"{name}: TopP&R needs more than 5 * dim + 1 = {min_rows - 1} samples, got {len(value)}")
    h_real, density_real, band_real = _top_pr_support(real, alpha, bootstrap, generator)
    h_fake, density_fake, band_fake = _top_pr_support(fake, alpha, bootstrap, generator)
    real_significant = density_real > band_real
    fake_significant = density_fake > band_fake
    real_in_fake = _cosine_kde(real, fake, h_fake) > band_fake
    fake_in_real = _cosine_kde(fake, real, h_real) > band_real
    precision = float((fake_significant & fake_in_real).sum() / fake_significant.sum().clamp(min=1))
    recall = float((real_significant & real_in_fake).sum() / real_significant.sum().clamp(min=1))
    f1 = 2 * precision * recall / (precision + recall) if precision > 1e-4 and recall > 1e-4 else 0.0
    return {"top_precision": precision, "top_recall": recall, "top_f1": f1}


def rmd_scores(features: torch.Tensor, labels: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Relative Mahalanobis Distance per sample (Cui et al. 2023; paper 1 Appendix B.7), fitted on generated features.

    M(x, y) = -(x - mu_y)^T S^-1 (x - mu_y) with class means and the shared within-class covariance S;
    M_agn(x) = -(x - mu)^T S_agn^-1 (x - mu) with the class-agnostic Gaussian; RMD = M(x, y) - M_agn(x), signs as
    printed in the paper: samples near their class mean but far from the global mean score high. Both covariances
    use 1/N and get `ridge` * mean eigenvalue on the diagonal so that fewer samples than dims stay solvable.
    (Fitted on the scored set itself, the mean RMD is ~0 by construction: each Mahalanobis term averages to dim.)
    """
    features = _check_features("features", features)
    labels = torch.as_tensor(labels)
    if labels.shape != (len(features),) or labels.dtype.is_floating_point:
        raise ValueError(f"labels: expected an integer tensor of shape ({len(features)},), got {tuple(labels.shape)}")
    classes, labels = labels.unique(return_inverse=True)
    class_means = torch.zeros(len(classes), features.shape[1], dtype=torch.float64).index_add_(0, labels, features)
    class_means /= torch.bincount(labels, minlength=len(classes))[:, None]

    def mahalanobis(centred: torch.Tensor) -> torch.Tensor:
        cov = centred.T @ centred / len(centred)
        cov += ridge * cov.diagonal().mean().clamp(min=1e-12) * torch.eye(len(cov), dtype=cov.dtype)
        return (centred * torch.linalg.solve(cov, centred.T).T).sum(1)

    return -mahalanobis(features - class_means[labels]) + mahalanobis(features - features.mean(0))


def relative_mahalanobis(features: torch.Tensor, labels: torch.Tensor, top_fraction: float = 0.01,
                         ridge: float = 1e-6) -> dict[str, float]:
    """Top-1% RMD as paper 1 reports it: the mean RMD of the top `top_fraction` samples and that fraction's threshold."""
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction: expected a value in (0, 1], got {top_fraction}")
    scores = rmd_scores(features, labels, ridge)
    top = scores.topk(max(1, math.ceil(top_fraction * len(scores)))).values
    return {"rmd_top": float(top.mean()), "rmd_threshold": float(top[-1])}


def label_agreement(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of generated samples the feature classifier assigns to their conditioning class: a diagnostic (not a
    paper 1 metric) that tells whether a class-conditional model uses its labels at all."""
    logits = _check_features("logits", logits, min_rows=1)
    labels = torch.as_tensor(labels)
    if labels.shape != (len(logits),):
        raise ValueError(f"labels: expected shape ({len(logits)},), got {tuple(labels.shape)}")
    return float((logits.argmax(1) == labels).double().mean())


def _normalised(features: torch.Tensor, normalize: bool) -> torch.Tensor:
    return torch.nn.functional.normalize(features, dim=1) if normalize else features


def memorization_ratio(fake: torch.Tensor, train: torch.Tensor, threshold: float = 0.12,
                       normalize: bool = True) -> float:
    """Share of generated samples whose nearest training sample (L2 in L2-normalised feature space) lies closer
    than `threshold` (paper 1 Appendix B.7 after Carlini et al. 2023; 0.12 on CLIP ViT-B/16 in the paper)."""
    if threshold <= 0:
        raise ValueError(f"threshold: expected a positive distance, got {threshold}")
    train = _normalised(_check_features("train", train, min_rows=1), normalize)
    fake = _normalised(_check_features("fake", fake, min_rows=1, dim=train.shape[1]), normalize)
    nearest = knn_distances(fake, train, 1)[:, 0]
    return float((nearest < threshold).double().mean())


def mean_topk_distance(fake: torch.Tensor, train: torch.Tensor, k: int = 5, normalize: bool = True) -> float:
    """Average top-k nearest-training-neighbour L2 distance of generated samples (paper 1 Appendix B.7; k = 5)."""
    train = _normalised(_check_features("train", train, min_rows=k), normalize)
    fake = _normalised(_check_features("fake", fake, min_rows=1, dim=train.shape[1]), normalize)
    return float(knn_distances(fake, train, k).mean())


def centre_of_mass(images) -> torch.Tensor:
    """Intensity-weighted centre of mass (row, column) in pixels of images [N, H, W, C] (uint8 or float >= 0);
    an all-zero image counts as centred."""
    images = torch.as_tensor(images)
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"images: expected [N, H, W, C] with N >= 1, got {tuple(images.shape)}")
    mass = images.double().sum(-1)                                              # [N, H, W]
    height, width = mass.shape[1:]
    total = mass.sum((1, 2))
    rows = (mass.sum(2) * torch.arange(height, dtype=torch.float64)).sum(1)
    cols = (mass.sum(1) * torch.arange(width, dtype=torch.float64)).sum(1)
    centre = torch.tensor([(height - 1) / 2, (width - 1) / 2], dtype=torch.float64)
    com = torch.stack([rows, cols], 1) / total.clamp_min(1e-12)[:, None]
    return torch.where(total[:, None] > 0, com, centre)


def com_offset(fake_images, reference_images) -> dict:
    """How far generated samples sit from where the data sits: mean centre of mass of `fake_images` minus that of
    `reference_images`, in pixels (row, column and Euclidean norm). Paper 2's ablation (b) asks how much a requested
    crop leaks into what is generated; samples asked for the training centre crop should show no offset."""
    offset = centre_of_mass(fake_images).mean(0) - centre_of_mass(reference_images).mean(0)
    return {"com_offset": float(offset.norm()), "com_offset_row": float(offset[0]), "com_offset_col": float(offset[1])}


def _latent_vectors(latents: torch.Tensor) -> torch.Tensor:
    """[N, D, H, W] latents -> their (N*H*W, D) vectors in float64."""
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        raise ValueError(f"latents: expected a [N, D, H, W] tensor, got {getattr(latents, 'shape', latents)}")
    return latents.double().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])


def _code_distances(vectors: torch.Tensor, codebook: torch.Tensor, chunk: int):
    """Squared distances of (M, D) vectors to the (K, D) code words, chunk * 1024 rows at a time (bounded memory)."""
    for start in range(0, len(vectors), chunk * 1024):
        yield torch.cdist(vectors[start:start + chunk * 1024], codebook).square()


def quantization_temperature(latents: torch.Tensor, codebook: torch.Tensor, chunk: int = 64) -> float:
    """A tau for vq_sample_entropy in the codebook's own units: the median squared distance from a training latent
    vector to its nearest code word (the VQ's typical quantisation error). Paper 1 does not state tau; its Fig. 4
    entropies (0.39-0.44 nats, of log 8192 = 9.0) need a tau of about the codes' scale: tau = 1 saturates at log K
    on our MNIST VQ-f4 (log 256 - 0.004 for every model). The code spacing is no robust scale: dead code words sit
    ~1e-6 from live ones, so the median spacing over all codes fell to 2e-6 on our Fashion-MNIST VQ (entropy 0.001,
    its floor), and over the codes in use it moved 3x with the number of training images counted. This median over
    latent vectors moved < 3 % from 2k to 60k training images on both VQs and ignores codes no latent is near.

    latents: [N, D, H, W] pre-quantisation latents of training images (e.g. 2000); codebook: [K, D].
    """
    vectors = _latent_vectors(latents)                                           # (N*H*W, D)
    codebook = _check_features("codebook", codebook, min_rows=2, dim=vectors.shape[1])
    errors = torch.cat([distances.amin(dim=1) for distances in _code_distances(vectors, codebook, chunk)])
    tau = float(errors.quantile(0.5))       # the mean of the middle two, as np.median
    if not tau > 0:
        raise ValueError("latents: most of them sit exactly on a code word; no quantisation error to set tau from")
    return tau


def vq_sample_entropy(latents: torch.Tensor, codebook: torch.Tensor, temperature: float = 1.0,
                      chunk: int = 64) -> float:
    """Sample entropy over a VQ codebook, paper 1 Eq. 41 (read as intended): for every latent vector x_ij,
    p_ijk = softmax_k(-||x_ij - C_k||^2 / tau); returns the mean over images and positions of -sum_k p log p (nats).

    latents: [N, D, H, W] encoder outputs before quantisation; codebook: [K, D].
    """
    if temperature <= 0:
        raise ValueError(f"temperature: expected tau > 0, got {temperature}")
    vectors = _latent_vectors(latents)                                           # (N*H*W, D)
    codebook = _check_features("codebook", codebook, dim=vectors.shape[1])
    total = 0.0
    for distances in _code_distances(vectors, codebook, chunk):
        log_p = (-distances / temperature).log_softmax(dim=1)
        total += float(-(log_p.exp() * log_p).sum())
    return total / len(vectors)


def clip_score(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, scale: float = 100.0) -> float:
    """CLIP-style score, Hessel et al. 2021 (CLIPScore): mean of scale * max(cos(image, text), 0) over pairs
    (scale 100 as torchmetrics' CLIPScore; Hessel et al. use 2.5)."""
    image_embeddings = _check_features("image_embeddings", image_embeddings, min_rows=1)
    text_embeddings = _check_features("text_embeddings", text_embeddings, min_rows=1,
                                      dim=image_embeddings.shape[1])
    if len(text_embeddings) != len(image_embeddings):
        raise ValueError(f"text_embeddings: {len(text_embeddings)} rows for {len(image_embeddings)} images")
    cosine = torch.nn.functional.cosine_similarity(image_embeddings, text_embeddings, dim=1)
    return float((scale * cosine.clamp(min=0)).mean())
