"""Paper 2 ablation (b): the centre-of-mass offset metric, the reference view of random-crop runs, and the switch
that adds control metadata plainly instead of noise-weighted."""
import numpy as np
import pytest
import torch

from evaluation import metrics
from evaluation.evaluate import load_reference
from models.conditioning import ControlEmbedder, control_weight


def square(top: int, left: int, size: int = 12, side: int = 4) -> np.ndarray:
    image = np.zeros((size, size, 1), dtype=np.uint8)
    image[top:top + side, left:left + side] = 255
    return image


def test_centre_of_mass_of_constructed_images():
    com = metrics.centre_of_mass(np.stack([square(0, 0), square(8, 2), np.zeros((12, 12, 1), np.uint8)]))
    torch.testing.assert_close(com, torch.tensor([[1.5, 1.5], [9.5, 3.5], [5.5, 5.5]], dtype=torch.float64))


def test_com_offset_in_pixels():
    reference = np.stack([square(4, 4), square(3, 5), square(5, 3)])          # mean centre (5.5, 5.5)
    shifted = np.stack([square(7, 8), square(7, 8)])                           # 3 rows down, 4 columns right
    out = metrics.com_offset(shifted, reference)
    assert out == pytest.approx({"com_offset": 5.0, "com_offset_row": 3.0, "com_offset_col": 4.0})
    assert metrics.com_offset(reference, reference)["com_offset"] == 0
    with pytest.raises(ValueError, match="images"):
        metrics.com_offset(np.zeros((12, 12)), reference)


def test_plain_control_embedding_ignores_the_noise_level():
    torch.manual_seed(0)
    weighted = ControlEmbedder(5, 16)
    plain = ControlEmbedder(5, 16, noise_weighted=False)
    plain.load_state_dict(weighted.state_dict())
    control, t = torch.rand(3, 5) * 4, torch.tensor([0, 500, 999])
    torch.testing.assert_close(plain(control, t), plain(control, torch.zeros(3, dtype=torch.long)))
    torch.testing.assert_close(weighted(control, t), control_weight(t, 1000, 1.0)[:, None] * plain(control, t))
    assert weighted(control, t)[2].abs().max() < 1e-6 < plain(control, t)[2].abs().max()


def test_dit_config_key_reaches_the_embedder():
    from models import build_model

    model = build_model({"arch": "dit", "preset": "DiT-micro/2", "control_dim": 5, "control_noise_weighted": False})
    assert model.control_embedder.noise_weighted is False
    unet = build_model({"arch": "unet", "preset": "UNet-tiny", "image_size": 8, "in_channels": 1, "num_classes": 10,
                        "control_dim": 5, "control_noise_weighted": False})
    assert unet.control_embedder.noise_weighted is False


def test_reference_of_a_random_crop_run_is_the_centre_crop():
    data = {"dataset": "digits", "image_size": 6, "channels": 1, "resize": "pad", "random_crop": True,
            "crop_margin": 2}
    reference = load_reference({"data": data})
    full = load_reference({"data": {**data, "image_size": 8, "random_crop": False}})
    assert reference["reference_images"].shape[1:] == (6, 6, 1)
    np.testing.assert_array_equal(reference["reference_images"], full["reference_images"][:, 1:7, 1:7])


def test_classifier_of_a_random_crop_run_sees_random_crops():
    data = {"dataset": "digits", "image_size": 6, "channels": 1, "resize": "pad", "random_crop": True,
            "crop_margin": 2}
    views = load_reference({"data": data})["classifier_images"]
    clean = load_reference({"data": {**data, "image_size": 8, "random_crop": False}})
    stored = clean["train_images"]
    offsets = set()
    for view, image in zip(views, stored):
        matches = [(top, left) for top in range(3) for left in range(3)
                   if np.array_equal(view, image[top:top + 6, left:left + 6])]
        assert matches, "every classifier image is a crop of its stored image"
        offsets.update(matches)
    assert len(offsets) == 9
    np.testing.assert_array_equal(clean["classifier_images"], clean["train_images"])
