"""What the bridge measures on generated samples, and what the theory predicts for the same training set.

Measured (per class k, then averaged over classes): the Gaussian fitted to the class's samples -> entropy (Theorem 1)
and closed-form W2^2 to the true class law N(mu_k, I) (Theorem 2); the variance along mu_k and across it (the exact
optimum inflates only along mu_hat, the paper's Lemma 2 in every direction); W2^2 to each theory target. Over the
whole mixture: W2^2 to a true sample by exact OT (POT) minus the same estimate between two true samples (its
sample-size bias), and the nearest-training-point distance relative to that of fresh true points (memorisation < 1).

Predicted: the T -> inf generated law N(m, S) of the optimal per-class linear denoiser (closed_forms.learned_target):
  exact     rank-one optimum at the theory gamma, on the clean training set
  paper     Lemma 2's isotropic form at the same gamma
  labelled  the exact optimum of what the linear model actually sees: the labelled set's Gaussian (label flips)
            at the CEP's matched gamma
For label flips the theory gamma is gmm_theory's eta-to-gamma bridge (label_flip.effective_gamma), so exact / paper
are "flips behave like CEP at gamma_eff" and labelled is "flips give the labelled set's Gaussian".
"""
import numpy as np
import torch

from .closed_forms import learned_target
from .gaussians import empirical_stats, entropy, w2_squared, w2_squared_to_isotropic
from .label_flip import sample_w2_squared

TARGETS = ("exact", "paper", "labelled")


def class_stats(points: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(mu_hat [K, d], Sigma [K, d, d]) of each class's points (1/n covariance, the theory's)."""
    stats = [empirical_stats(points[labels == k]) for k in range(num_classes)]
    return np.stack([m for m, _ in stats]), np.stack([s for _, s in stats])


def theory_targets(clean_stats, labelled_stats, gamma: float, cep_gamma: float) -> dict:
    """name -> Gaussian target per class (see the module docstring)."""
    return dict(exact=learned_target(*clean_stats, gamma, "exact"),
                paper=learned_target(*clean_stats, gamma, "paper"),
                labelled=learned_target(*labelled_stats, cep_gamma, "exact"))


def theory_metrics(targets: dict, true_means: np.ndarray) -> dict:
    """Entropy and W2^2 to the truth of each target (the theory's T -> inf generated law), averaged over classes."""
    metrics = {}
    for name, target in targets.items():
        metrics[f"theory_entropy_{name}"] = float(entropy(target.cov).mean())
        metrics[f"theory_w2_{name}"] = float(w2_squared_to_isotropic(target.mean, target.cov, true_means).mean())
    return metrics


def variance_split(covs: np.ndarray, true_means: np.ndarray) -> tuple[float, float]:
    """Mean over classes of the variance along mu_k / |mu_k| and the mean variance across it."""
    directions = true_means / np.linalg.norm(true_means, axis=-1, keepdims=True)
    parallel = np.einsum("ki,kij,kj->k", directions, covs, directions)
    perpendicular = (np.trace(covs, axis1=-2, axis2=-1) - parallel) / (covs.shape[-1] - 1)
    return float(parallel.mean()), float(perpendicular.mean())


def nearest_distance(points: np.ndarray, train: np.ndarray) -> float:
    """Mean Euclidean distance from each point to its nearest training point."""
    distances = torch.cdist(torch.from_numpy(points), torch.from_numpy(train))
    return float(distances.min(dim=1).values.mean())


def sample_metrics(samples: np.ndarray, true_means: np.ndarray, train: np.ndarray, targets: dict,
                   references: dict) -> dict:
    """samples [K, N, d] (N per class); references: fresh true draws shared by every setting of a seed, so their
    noise cancels in paired differences: "ot" and "ot_bias" [M, d] (class-balanced), "nn" [K * N, d]."""
    num_classes, _, d = samples.shape
    means, covs = empirical_stats(samples)
    var_parallel, var_perpendicular = variance_split(covs, true_means)
    metrics = dict(entropy=float(entropy(covs).mean()),
                   w2_class=float(w2_squared_to_isotropic(means, covs, true_means).mean()),
                   var_parallel=var_parallel, var_perpendicular=var_perpendicular)
    for name, target in targets.items():
        metrics[f"w2_to_{name}"] = float(w2_squared(means, covs, target.mean, target.cov).mean())
    # Positive = the samples sit closer to the exact (rank-one) optimum than to the paper's isotropic form.
    metrics["closer_to_exact"] = metrics["w2_to_paper"] - metrics["w2_to_exact"]
    # Positive = closer to the eta-to-gamma bridge than to the labelled set's Gaussian (label flips).
    metrics["closer_to_bridge"] = metrics["w2_to_labelled"] - metrics["w2_to_exact"]
    generated = samples[:, :len(references["ot"]) // num_classes].reshape(-1, d)  # class-balanced, as the reference
    bias = sample_w2_squared(references["ot_bias"], references["ot"])
    metrics["w2_mixture"] = sample_w2_squared(generated, references["ot"]) - bias
    flat = samples.reshape(-1, d)
    metrics["nn_train"] = nearest_distance(flat, train)
    metrics["nn_ratio"] = metrics["nn_train"] / nearest_distance(references["nn"], train)
    return metrics
