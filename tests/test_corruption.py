"""Condition corruption (paper 1, App. B.1): exact counts, never the true class, prior-weighted, seeded."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from training.corruption import (asymmetric_flip, class_prior, random_flip, save_corruption, swap_captions,
                                 symmetric_flip)


def make_labels(n=2000, num_classes=5, seed=0):
    # deliberately imbalanced so the prior matters
    weights = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])[:num_classes]
    return torch.multinomial(weights, n, replacement=True, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 300), eta=st.floats(0.0, 0.99), seed=st.integers(0, 2**31))
def test_symmetric_flip_exact_count_never_true_class(n, eta, seed):
    labels = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(seed))
    labels[:2] = torch.tensor([0, 1])[: min(n, 2)]  # at least two classes present
    corrupted, indices = symmetric_flip(labels, 4, eta, seed)
    changed = torch.nonzero(corrupted != labels).squeeze(1)
    assert len(indices) == round(eta * n)
    assert torch.equal(changed, indices)  # every chosen label changed, nothing else did


def test_symmetric_flip_is_prior_weighted():
    labels = make_labels(20000)
    prior = class_prior(labels, 5)
    corrupted, indices = symmetric_flip(labels, 5, 0.5, seed=1)
    # new class distribution of samples whose true class is 4: prior over 0..3, renormalised
    from_four = corrupted[indices][labels[indices] == 4]
    observed = torch.bincount(from_four, minlength=5).double() / len(from_four)
    expected = prior.clone()
    expected[4] = 0
    expected /= expected.sum()
    assert observed[4] == 0
    assert torch.allclose(observed, expected, atol=0.05)


def test_flips_are_deterministic_and_seed_dependent():
    labels = make_labels()
    a = symmetric_flip(labels, 5, 0.1, seed=3)
    b = symmetric_flip(labels, 5, 0.1, seed=3)
    c = symmetric_flip(labels, 5, 0.1, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_asymmetric_flip_stays_inside_subset():
    labels = make_labels()
    subset = [1, 3, 4]
    corrupted, indices = asymmetric_flip(labels, 5, 0.2, seed=0, classes=subset)
    in_subset = torch.isin(labels, torch.tensor(subset))
    assert len(indices) == round(0.2 * int(in_subset.sum()))
    assert torch.isin(labels[indices], torch.tensor(subset)).all()
    assert torch.isin(corrupted[indices], torch.tensor(subset)).all()
    assert (corrupted[indices] != labels[indices]).all()
    assert torch.equal(corrupted[~in_subset], labels[~in_subset])


def test_random_flip_rate_and_never_true_class():
    labels = make_labels(20000)
    prior = class_prior(labels, 5)
    flipped = random_flip(labels, 0.1, prior, torch.Generator().manual_seed(0))
    rate = (flipped != labels).double().mean().item()
    assert abs(rate - 0.1) < 0.01
    again = random_flip(labels, 0.1, prior, torch.Generator().manual_seed(0))
    assert torch.equal(flipped, again)


def test_caption_swap_keeps_multiset_and_count():
    captions = [f"caption {i}" for i in range(101)]
    swapped, indices = swap_captions(captions, 0.2, seed=0)
    assert sorted(swapped) == sorted(captions)
    changed = [i for i, (a, b) in enumerate(zip(captions, swapped)) if a != b]
    assert changed == indices.tolist()
    assert len(changed) == 2 * round(0.2 * 101 / 2)
    again, again_indices = swap_captions(captions, 0.2, seed=0)
    assert again == swapped and torch.equal(again_indices, indices)
    assert swap_captions(captions, 0.2, seed=1)[0] != swapped


@pytest.mark.parametrize("eta", [-0.1, 1.0, 1.5, float("nan"), "0.1", True])
def test_bad_ratio_rejected(eta):
    with pytest.raises(ValueError, match="eta"):
        symmetric_flip(make_labels(10), 5, eta, 0)
    with pytest.raises(ValueError, match="eta"):
        swap_captions(["a", "b"], eta, 0)


def test_bad_labels_and_classes_rejected():
    with pytest.raises(TypeError, match="labels"):
        symmetric_flip(torch.zeros(4), 5, 0.1, 0)
    with pytest.raises(ValueError, match="labels"):
        symmetric_flip(torch.tensor([0, 7]), 5, 0.1, 0)
    with pytest.raises(ValueError, match="classes"):
        asymmetric_flip(make_labels(10), 5, 0.1, 0, classes=[2])


def test_save_corruption_roundtrip(tmp_path):
    labels = make_labels(50)
    corrupted, indices = symmetric_flip(labels, 5, 0.1, 0)
    save_corruption(tmp_path / "corruption.npz", "symmetric", 0.1, labels, corrupted, indices)
    saved = np.load(tmp_path / "corruption.npz")
    assert (saved["clean_labels"] == labels.numpy()).all()
    assert (saved["corrupted_labels"] == corrupted.numpy()).all()
    assert (saved["corrupted_indices"] == indices.numpy()).all()
    assert str(saved["kind"]) == "symmetric"
