"""Data loading, fitting to size, augmentation with control metadata, captions and the resumable data order."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import (CONTROL_FIELDS, DataOrder, DatasetError, augment, fit_to_size, load_dataset,
                           template_captions)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"


def test_digits_default():
    data = load_dataset("digits", image_size=8)
    assert data.images.shape == (1797, 1, 8, 8) and data.images.dtype == torch.uint8
    assert data.images.max() == 255 and data.num_classes == 10
    assert torch.equal(data.original_sizes[0], torch.tensor([8, 8]))
    assert data.labels.shape == (1797,)


def test_digits_resized_three_channels():
    data = load_dataset("digits", image_size=16, channels=3)
    assert data.images.shape == (1797, 3, 16, 16)
    assert torch.equal(data.images[:, 0], data.images[:, 2])


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/datasets is absent")
def test_mnist_npz_pad_to_32():
    data = load_dataset("mnist", data_path=str(SHARED), split="test", image_size=32, resize="pad")
    assert data.images.shape == (10000, 1, 32, 32)
    assert data.images[:, :, :2].max() == 0  # the padding border is background
    assert data.class_names == [str(i) for i in range(10)]


def test_npz_errors_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("mnist", data_path=str(tmp_path))
    with pytest.raises(DatasetError, match="--data-path"):
        load_dataset("mnist")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="bad.npz.*not a readable"):
        load_dataset(str(bad))
    partial = tmp_path / "partial.npz"
    np.savez(partial, x_train=np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(DatasetError, match="missing arrays"):
        load_dataset(str(partial))
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x_train=np.zeros((3, 4, 4), np.uint8), y_train=np.array([0, 1, 5]),
             class_names=np.array(["a", "b"]))
    with pytest.raises(DatasetError, match="labels outside"):
        load_dataset(str(wrong))
    with pytest.raises(DatasetError, match="not a known data set"):
        load_dataset(str(tmp_path / "nowhere"))


def test_bad_arguments_named():
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", split="val")
    with pytest.raises(ValueError, match="channels"):
        load_dataset("digits", channels=2)
    with pytest.raises(ValueError, match="resize"):
        load_dataset("digits", resize="stretch")


def make_folder(root: Path, captions: bool):
    rng = np.random.default_rng(0)
    names = {}
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
            names[f"{label}/{i}.png"] = f"a {label} number {i}"
    if captions:
        (root / "captions.json").write_text(json.dumps(names))


def test_image_folder_with_captions(tmp_path):
    make_folder(tmp_path, captions=True)
    data = load_dataset(str(tmp_path), image_size=8, channels=3, crop_margin=2)
    assert data.images.shape == (6, 3, 10, 10)
    assert data.class_names == ["cat", "dog"] and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.captions[4] == "a dog number 1"
    assert data.original_sizes[0].tolist() == [12, 20]


def test_image_folder_errors(tmp_path):
    make_folder(tmp_path, captions=False)
    (tmp_path / "captions.json").write_text("{ nope")
    with pytest.raises(DatasetError, match="captions.json.*JSON"):
        load_dataset(str(tmp_path), image_size=8)
    (tmp_path / "captions.json").write_text(json.dumps({"cat/0.png": "x"}))
    with pytest.raises(DatasetError, match="missing"):
        load_dataset(str(tmp_path), image_size=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(str(empty), image_size=8)


def test_fit_to_size_modes():
    images = torch.full((2, 1, 4, 6), 200, dtype=torch.uint8)
    assert fit_to_size(images, 8, "pad").shape == (2, 1, 8, 8)
    resized = fit_to_size(images, 3, "resize")
    assert resized.shape == (2, 1, 3, 3) and (resized == 200).all()
    with pytest.raises(ValueError, match="pad"):
        fit_to_size(images, 3, "pad")


def test_augment_control_metadata_matches_the_crop():
    images = torch.arange(2 * 10 * 10, dtype=torch.float32).reshape(2, 1, 10, 10).remainder(256).to(torch.uint8)
    sizes = torch.tensor([[28, 28], [40, 30]])
    x, control = augment(images, sizes, 8, hflip=True, random_crop=True, generator=torch.Generator().manual_seed(1))
    assert x.shape == (2, 1, 8, 8) and control.shape == (2, len(CONTROL_FIELDS))
    assert x.min() >= -1 and x.max() <= 1
    for i in range(2):
        top, left, h, w, flip = control[i].long().tolist()
        crop = images[i, :, top:top + 8, left:left + 8].float() / 127.5 - 1
        assert torch.equal(x[i], crop.flip(-1) if flip else crop)
        assert [h, w] == sizes[i].tolist()
    x_center, control_center = augment(images, sizes, 8, False, False, torch.Generator())
    assert control_center[:, :2].eq(1).all() and control_center[:, 4].eq(0).all()


def test_template_captions():
    captions = template_captions(torch.tensor([0, 2]), ["cat", "dog", "bird"], torch.Generator().manual_seed(0))
    assert "cat" in captions[0] and "bird" in captions[1]


def test_data_order_is_a_permutation_per_epoch_and_position_indexed():
    order = DataOrder(10, seed=3)
    stream = order.indices(0, 30)
    for epoch in range(3):
        assert sorted(stream[epoch * 10:(epoch + 1) * 10].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:20])
    fresh = DataOrder(10, seed=3)  # a resumed run: same positions, same indices
    assert torch.equal(fresh.indices(7, 16), stream[7:23])
    assert not torch.equal(DataOrder(10, seed=4).indices(0, 10), stream[:10])
