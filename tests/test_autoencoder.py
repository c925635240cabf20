"""VQ and KL autoencoders: shapes, training improves the round trip, straight-through VQ, usage, scale, checkpoints."""
import pytest
import torch
from sklearn.datasets import load_digits

from models.autoencoder import build_autoencoder, load_autoencoder, save_autoencoder


def digits(n=64):
    """sklearn 8x8 digits, upsampled to 16x16, scaled to [-1, 1]."""
    images = torch.tensor(load_digits().images[:n], dtype=torch.float32)[:, None] / 8 - 1
    return torch.nn.functional.interpolate(images, scale_factor=2, mode="bilinear")


def reconstruction_error(model, x):
    with torch.no_grad():
        return float((model.decode(model.encode(x)) - x).pow(2).mean())


@pytest.mark.parametrize("preset", ["vq-f4-tiny", "kl-f4-tiny"])
def test_round_trip_improves_with_training(preset):
    torch.manual_seed(0)
    model = build_autoencoder({"preset": preset, "ch": 8})
    x = digits(32)
    before = reconstruction_error(model.eval(), x)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        loss, stats = model.loss(x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = reconstruction_error(model.eval(), x)
    assert set(stats) == {"loss", "reconstruction", "regularizer"}
    assert after < 0.5 * before, (before, after)


def test_vq_straight_through_commitment_and_usage():
    torch.manual_seed(0)
    model = build_autoencoder({"preset": "vq-f4-tiny", "ch": 16, "n_embed": 16})
    x = digits(8)
    z = model.encode(x)
    assert z.shape == (8, 3, 4, 4)
    quantized, codebook_loss, indices = model.quantize(z)
    # Forward values are the codes; the gradient passes straight through to z.
    torch.testing.assert_close(quantized, model.codebook[indices].permute(0, 3, 1, 2))
    z_leaf = z.detach().requires_grad_()
    model.quantize(z_leaf)[0].sum().backward()
    torch.testing.assert_close(z_leaf.grad, torch.ones_like(z_leaf))
    expected = 1.25 * (quantized - z).pow(2).mean()          # codebook + 0.25 * commitment (same value forward)
    torch.testing.assert_close(codebook_loss, expected)
    # Usage counts only in training mode.
    model.quantize.reset_usage()
    model.eval()(x)
    assert model.quantize.usage() == 0
    model.train()(x)
    used = indices.unique().numel() / 16
    assert model.quantize.usage() == pytest.approx(used)


def test_scale_factor_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    config = {"preset": "kl-f4-tiny", "ch": 16}
    model = build_autoencoder(config).eval()
    x = digits(16)
    scale = model.fit_scale_factor(x)
    assert float(model.encode(x).std()) == pytest.approx(1.0, rel=1e-4)
    torch.testing.assert_close(model.decode(model.encode(x)), model.decode(model.encode(x)))
    path = tmp_path / "ae.pt"
    save_autoencoder(model, config, path)
    loaded, loaded_config = load_autoencoder(path)
    assert loaded_config == config and float(loaded.scale_factor) == pytest.approx(scale)
    torch.testing.assert_close(loaded.encode(x), model.encode(x))
    # A posterior sample differs from the mean and is reproducible from its generator.
    a = model.encode(x, generator=torch.Generator().manual_seed(1))
    b = model.encode(x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, model.encode(x))


@pytest.mark.parametrize("call,name", [
    (lambda: build_autoencoder({"preset": "vq-f16"}), "preset"),
    (lambda: build_autoencoder({"preset": "vq-f4-tiny", "n_embed": 1}), "n_embed"),
    (lambda: build_autoencoder({"preset": "vq-f4-tiny", "ch": 30}), "ch"),
    (lambda: build_autoencoder({"preset": "kl-f4-tiny", "kl_weight": -1.0}), "kl_weight"),
    (lambda: build_autoencoder({"preset": "kl-f4-tiny", "ch": 16}).encode(torch.zeros(1, 1, 10, 10)), "x"),
    (lambda: build_autoencoder({"preset": "kl-f4-tiny", "ch": 16}).encode(torch.zeros(1, 3, 16, 16)), "x"),
    (lambda: load_autoencoder("/nonexistent/ae.pt"), "path"),
])
def test_bad_arguments_name_themselves(call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call()
