"""Condition corruption of paper 1 (arXiv 2405.20494, §3.1 and App. B.1): a fixed, seeded corruption applied once
before training, plus the on-the-fly random-flip baseline (Table 7).

- symmetric: round(eta * N) samples chosen without replacement; each gets a new class drawn from the class prior
  (the data set's empirical class frequencies) with the true class excluded.
- asymmetric: the same, restricted to samples whose class is in a given subset, flipped to another class of that
  subset; eta is the fraction of the subset's samples (the paper leaves the denominator open).
- caption swap: round(eta * N / 2) disjoint random pairs swap captions (so ~eta * N samples are corrupted).
- random (baseline): every step, each sample flips with probability eta, drawn from the same prior.
"""
from pathlib import Path

import numpy as np
import torch

CORRUPTION_KINDS = ("none", "symmetric", "asymmetric", "random", "caption-swap")


def check_ratio(eta: float) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta < 1.0:
        raise ValueError(f"corruption ratio eta must be a number in [0, 1), got {eta!r}")
    return float(eta)


def class_prior(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Empirical class frequencies, float64 [num_classes]."""
    _check_labels(labels, num_classes)
    counts = torch.bincount(labels, minlength=num_classes).double()
    return counts / counts.sum()


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.ndim != 1:
        raise TypeError(f"labels must be an int64 tensor [N], got {getattr(labels, 'dtype', type(labels))}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 to flip labels, got {num_classes}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")


def draw_other_class(labels: torch.Tensor, prior: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each label y a class y' != y drawn with probability prior[y'] / (1 - prior[y])."""
    weights = prior.expand(len(labels), -1).clone()
    weights[torch.arange(len(labels)), labels] = 0.0
    if (weights.sum(1) <= 0).any():
        raise ValueError("the class prior gives no other class to flip to (only one class has any weight)")
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def symmetric_flip(labels: torch.Tensor, num_classes: int, eta: float, seed: int,
                   prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (corrupted labels, sorted corrupted indices); exactly round(eta * N) labels change."""
    return asymmetric_flip(labels, num_classes, eta, seed, range(num_classes), prior)


def asymmetric_flip(labels: torch.Tensor, num_classes: int, eta: float, seed: int, classes,
                    prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flips round(eta * N_subset) samples of the classes in `classes` to another class of that subset."""
    eta = check_ratio(eta)
    _check_labels(labels, num_classes)
    classes = sorted(set(int(c) for c in classes))
    if len(classes) < 2 or classes[0] < 0 or classes[-1] >= num_classes:
        raise ValueError(f"classes must name at least two distinct classes in 0..{num_classes - 1}, got {classes}")
    prior = class_prior(labels, num_classes) if prior is None else prior.double()
    subset_prior = torch.zeros(num_classes, dtype=torch.float64)
    subset_prior[classes] = prior[classes]
    candidates = torch.nonzero(torch.isin(labels, torch.tensor(classes))).squeeze(1)
    generator = torch.Generator().manual_seed(seed)
    count = round(eta * len(candidates))
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]].sort().values
    corrupted = labels.clone()
    corrupted[chosen] = draw_other_class(labels[chosen], subset_prior, generator)
    return corrupted, chosen


def random_flip(labels: torch.Tensor, eta: float, prior: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """On-the-fly baseline: each label flips with probability eta to another class drawn from the prior."""
    flip = torch.rand(len(labels), generator=generator) < check_ratio(eta)
    if not flip.any():
        return labels
    out = labels.clone()
    out[flip] = draw_other_class(labels[flip], prior.double(), generator)
    return out


def swap_captions(captions, eta: float, seed: int) -> tuple[list[str], torch.Tensor]:
    """Swaps the captions of round(eta * N / 2) disjoint random pairs; returns (captions, sorted swapped indices).
    A list comes back as a list; a lazily read caption store (streamed shards) as a PermutedCaptions view."""
    eta = check_ratio(eta)
    if isinstance(captions, (list, tuple)):
        if not all(isinstance(c, str) for c in captions):
            raise TypeError("captions must be a list of str")
    elif not (hasattr(captions, "__getitem__") and hasattr(captions, "__len__")):
        raise TypeError(f"captions must be a list of str or a caption store, got {type(captions).__name__}")
    pairs = round(eta * len(captions) / 2)
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed))[:2 * pairs]
    sources = torch.arange(len(captions))
    sources[order[:pairs]], sources[order[pairs:]] = order[pairs:], order[:pairs]
    if isinstance(captions, (list, tuple)):
        return [captions[j] for j in sources.tolist()], order.sort().values
    return PermutedCaptions(captions, sources), order.sort().values


class PermutedCaptions:
    """captions[sources[i]] for item i, read lazily (a caption swap on data too large to hold in memory)."""

    def __init__(self, captions, sources: torch.Tensor):
        self.captions, self.sources = captions, sources

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> str:
        return self.captions[int(self.sources[i])]


def save_corruption(path: Path, kind: str, eta: float, clean_labels, corrupted_labels, corrupted_indices,
                    clean_captions=None, corrupted_captions=None) -> None:
    """run_dir/corruption.npz: what evaluation needs to tell clean from corrupted samples. Captions held lazily
    (PermutedCaptions, streamed shards) are recorded by their permutation (caption_sources[k]: the item whose
    caption corrupted_indices[k] gets), not as text."""
    arrays = dict(kind=np.array(kind), ratio=np.array(eta), corrupted_indices=np.asarray(corrupted_indices),
                  clean_labels=_labels_array(clean_labels), corrupted_labels=_labels_array(corrupted_labels))
    if isinstance(corrupted_captions, PermutedCaptions):
        arrays["caption_sources"] = corrupted_captions.sources[torch.as_tensor(corrupted_indices)].numpy()
    elif isinstance(clean_captions, (list, tuple)):
        arrays.update(clean_captions=np.array(clean_captions, dtype=str),
                      corrupted_captions=np.array(corrupted_captions, dtype=str))
    path = Path(path)
    temporary = path.with_suffix(".tmp.npz")
    np.savez(temporary, **arrays)
    temporary.replace(path)


def _labels_array(labels) -> np.ndarray:
    return np.zeros(0, dtype=np.int64) if labels is None else np.asarray(labels)
