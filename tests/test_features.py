"""evaluation/features.py: the per-data-set classifier, extractors loaded by path, the text tower."""
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from evaluation import features

STATED_DIGITS_ACCURACY = 0.95  # README states the classifier's held-out accuracy on sklearn digits


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    images = np.round(data.images / 16 * 255).astype(np.uint8)          # (1797, 8, 8)
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:1437], order[1437:]
    return images[train], data.target[train], images[test], data.target[test]


@pytest.fixture(scope="module")
def classifier(digits, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    model, info = features.load_or_train_classifier(*digits, num_classes=10, cache_dir=cache)
    return model, info, cache


def test_classifier_reaches_stated_accuracy_on_digits(classifier, digits):
    model, info, _ = classifier
    assert info["test_accuracy"] >= STATED_DIGITS_ACCURACY
    assert info["test_accuracy"] == features.classifier_accuracy(model, digits[2], digits[3])
    assert info["num_test"] == 360


def test_classifier_is_cached_by_dataset_hash_and_deterministic(classifier, digits):
    model, info, cache = classifier
    cached, cached_info = features.load_or_train_classifier(*digits, num_classes=10, cache_dir=cache)
    assert cached_info == info and features.extractor_fingerprint(cached) == info["fingerprint"]
    assert len(list(cache.glob("classifier-*.pt"))) == 1
    # A different data set gets a different key; retraining with the same seed reproduces the weights exactly.
    small = features.train_classifier(digits[0][:200], digits[1][:200], 10, steps=20, seed=3)
    again = features.train_classifier(digits[0][:200], digits[1][:200], 10, steps=20, seed=3)
    assert features.extractor_fingerprint(small) == features.extractor_fingerprint(again)
    assert features.dataset_hash(digits[0][:200], digits[1][:200]) != features.dataset_hash(*digits[:2])
    blob = torch.load(next(cache.glob("classifier-*.pt")), weights_only=True)
    assert blob["info"]["test_accuracy"] == info["test_accuracy"]


def test_extract_features_shapes_and_batching(classifier, digits):
    model, _, _ = classifier
    out = features.extract_features(model, digits[2][:50], batch_size=7)
    assert out["pool"].shape == (50, 64) and out["logits"].shape == (50, 10) and out["spatial"].shape[0] == 50
    whole = features.extract_features(model, digits[2][:50], batch_size=50)
    assert all(torch.allclose(out[k], whole[k], atol=1e-6) for k in out)
    assert out["pool"].dtype == torch.float64
    assert set(features.extract_features(model, digits[2][:5], keys=("pool",))) == {"pool"}


def test_scripted_extractor_roundtrip(classifier, digits, tmp_path):
    model, _, _ = classifier
    path = tmp_path / "classifier.ts"
    torch.jit.save(torch.jit.script(model), str(path))
    loaded = features.ScriptedExtractor(path)
    ours, theirs = (features.extract_features(m, digits[2][:20]) for m in (model, loaded))
    assert set(theirs) == {"pool", "logits", "spatial"}
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)
    assert features.extractor_fingerprint(loaded) == loaded.fingerprint != features.extractor_fingerprint(model)


def test_scripted_extractor_adapts_inputs(tmp_path):
    class RGBStats(torch.nn.Module):  # stands in for an exported Inception: wants 3 x 12 x 12 in [-1, 1]
        def forward(self, x):
            assert x.shape[1:] == (3, 12, 12)
            return x.mean((2, 3)), x.amax((1, 2, 3))[:, None], x[:, :1]
    path = tmp_path / "rgb.pt"
    torch.jit.save(torch.jit.script(RGBStats()), str(path))
    extractor = features.ScriptedExtractor(path, input_size=12, in_channels=3, value_range="-1,1")
    out = features.extract_features(extractor, np.full((4, 8, 8), 255, np.uint8))
    assert torch.allclose(out["pool"], torch.ones(4, 3, dtype=torch.float64))
    assert out["spatial"].shape == (4, 144)


def test_text_tower(tmp_path):
    class CharCount(torch.nn.Module):
        def forward(self, prompts: list[str]) -> torch.Tensor:
            return torch.tensor([[float(len(p)), float(p.count("a"))] for p in prompts])
    path = tmp_path / "text.ts"
    torch.jit.save(torch.jit.script(CharCount()), str(path))
    tower = features.TextTower(path)
    emb = tower(["a cat", "dog", "banana"], batch_size=2)
    assert emb.tolist() == [[5.0, 2.0], [3.0, 0.0], [6.0, 3.0]]
    with pytest.raises(TypeError, match="prompts"):
        tower("a cat")


def test_bad_paths_and_inputs(tmp_path, digits):
    with pytest.raises(FileNotFoundError, match="path"):
        features.ScriptedExtractor(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="path"):
        features.TextTower(tmp_path / "missing.ts")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a module")
    with pytest.raises(ValueError, match="path"):
        features.ScriptedExtractor(junk)
    with pytest.raises(ValueError, match="value_range"):
        features.ScriptedExtractor(junk, value_range="0,2")
    with pytest.raises(TypeError, match="images"):
        features.images_to_tensor(np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="images"):
        features.images_to_tensor(torch.full((2, 1, 8, 8), 3.0))
    with pytest.raises(ValueError, match="train_labels"):
        features.load_or_train_classifier(digits[0], digits[1] + 10, *digits[2:], num_classes=10, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="test_images"):
        features.load_or_train_classifier(*digits[:2], digits[2][:5], digits[3], num_classes=10, cache_dir=tmp_path)
