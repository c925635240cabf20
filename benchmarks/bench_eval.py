"""Evaluation benchmarks: seconds per 1,000 samples for sampling (DiT-tiny/2, 8x8, DPM-Solver++ 50 steps with CFG),
feature extraction and every metric; and the hand-written k-NN precision/recall against a scikit-learn peer
(NearestNeighbors radii + pairwise_distances_chunked) on the same features in the same run.

    python -m benchmarks.bench_eval [--num 1000 5000] [--dim 64]
"""
import argparse

import numpy as np
import torch
from sklearn.metrics import pairwise_distances_chunked
from sklearn.neighbors import NearestNeighbors

from benchmarks.bench_models import timed
from evaluation import metrics
from evaluation.features import DigitClassifier, extract_features
from models import build_model
from models.diffusion import GaussianDiffusion, make_betas, sample


def sklearn_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3):
    """Peer implementation of Kynkaanniemi et al. 2019 with scikit-learn's neighbour search."""
    def radii(x):
        return NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)[0][:, -1]

    def coverage(queries, centres, r):
        hits = [(block <= r[None, :]).any(1) for block in pairwise_distances_chunked(queries, centres)]
        return float(np.concatenate(hits).mean())

    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


def sampling_seconds_per_1000(count: int = 64, steps: int = 50) -> float:
    torch.manual_seed(0)
    model = build_model({"arch": "dit", "preset": "DiT-tiny/2"}).eval()
    diffusion = GaussianDiffusion(make_betas("linear"))
    labels = torch.arange(count) % 10
    generators = [torch.Generator().manual_seed(i) for i in range(count)]
    seconds = timed(lambda: sample(model, diffusion, (count, 1, 8, 8), {"y": labels},
                                   {"y": torch.full_like(labels, 10)}, "dpm++2m", steps, 2.0, generators), 1)
    return 1000 * seconds / count


def metric_table(num: int, dim: int) -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.randn(num, dim, generator=g, dtype=torch.float64)
    fake = torch.randn(num, dim, generator=g, dtype=torch.float64) * 1.1 + 0.1
    logits = torch.randn(num, 10, generator=g, dtype=torch.float64)
    labels = torch.arange(num) % 10
    per_1000 = 1000 / num
    rows = {
        "FID (torchmetrics)": lambda: metrics.frechet_distance(real, fake),
        "KID (torchmetrics, 100 subsets)": lambda: metrics.kernel_inception_distance(real, fake),
        "IS (torchmetrics)": lambda: metrics.inception_score(logits),
        "precision/recall k=3": lambda: metrics.precision_recall(real, fake),
        "TopP&R": lambda: metrics.top_pr(real, fake),
        "RMD top-1%": lambda: metrics.relative_mahalanobis(fake, labels),
        "memorisation + top-5 L2": lambda: (metrics.memorization_ratio(fake, real),
                                            metrics.mean_topk_distance(fake, real)),
    }
    print(f"\n| metric (N = {num}, dim {dim}) | seconds | seconds per 1,000 samples |")
    print("|---|---|---|")
    for name, step in rows.items():
        seconds = timed(step, 3)
        print(f"| {name} | {seconds:.3f} | {seconds * per_1000:.3f} |")
    ours = timed(lambda: metrics.precision_recall(real, fake), 3)
    peer = timed(lambda: sklearn_precision_recall(real.numpy(), fake.numpy()), 3)
    assert np.allclose(metrics.precision_recall(real, fake), sklearn_precision_recall(real.numpy(), fake.numpy()))
    print(f"\nprecision/recall N={num}: ours {ours:.3f} s, scikit-learn peer {peer:.3f} s, "
          f"speed-up {peer / ours:.2f}x (same values)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, nargs="+", default=[1000], help="feature-set sizes to time")
    parser.add_argument("--dim", type=int, default=64, help="feature width (the digits classifier: 64)")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"sampling DiT-tiny/2 8x8, dpm++2m 50 steps, CFG 2.0: {sampling_seconds_per_1000():.1f} s per 1,000 images")
    images = torch.rand(1000, 1, 8, 8)
    extractor = DigitClassifier().eval()
    print(f"feature extraction (digits classifier): "
          f"{timed(lambda: extract_features(extractor, images), 3):.3f} s per 1,000 images")
    for num in args.num:
        metric_table(num, args.dim)


if __name__ == "__main__":
    main()
