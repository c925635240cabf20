"""Every preset: paper sizes on the meta device (parameter counts vs the papers, output shapes), tiny ones for real."""
import pytest
import torch

from models import build_model
from models.autoencoder import AUTOENCODER_PRESETS, build_autoencoder
from models.dit import DIT_PRESETS, PAPER_PARAMS_M
from models.unet import UNET_PRESETS

# Reference parameter counts in millions, and where they come from.
UNET_PAPER_PARAMS_M = {
    "LDM-4": 400,        # paper 1 Table 3 ("400M"), class-conditional IN-1K
    "LDM-4-text": 406,   # paper 1 Table 3 says 400M; the released CC3M unet is 1.63 GB of fp32 = 407M (digest §7)
}
AUTOENCODER_PARAMS_M = {
    "vq-f4": 55.3,       # released vqvae/ of the LDM-4 models: 221 MB of fp32 (digest §7)
    "kl-f8": 83.65,      # Stable Diffusion / DiT VAE (sd-vae-ft-ema)
}


def count(module):
    return sum(p.numel() for p in module.parameters())


def paper_dit_presets():
    return [name for name in DIT_PRESETS if name.split("-")[1].split("/")[0] in PAPER_PARAMS_M]


@pytest.mark.parametrize("name", paper_dit_presets())
def test_dit_paper_presets_match_table_4_on_meta(name):
    with torch.device("meta"):
        model = build_model({"arch": "dit", "preset": name})
        x = torch.empty(2, 4, 32, 32)
        out = model(x, torch.zeros(2, dtype=torch.long), y=torch.zeros(2, dtype=torch.long))
    size = name.split("-")[1].split("/")[0]
    assert count(model) == pytest.approx(PAPER_PARAMS_M[size] * 1e6, rel=0.01)
    assert out.shape == (2, 8, 32, 32)                               # learn_sigma: eps and variance channels


def test_dit_xl2_is_the_official_count():
    # facebookresearch/DiT reports 675,129,632 parameters including its frozen 256x1152 pos_embed parameter,
    # which is a non-persistent buffer here.
    with torch.device("meta"):
        model = build_model({"arch": "dit", "preset": "DiT-XL/2"})
    assert count(model) + 256 * 1152 == 675_129_632


@pytest.mark.parametrize("name", sorted(UNET_PAPER_PARAMS_M))
def test_unet_paper_presets_on_meta(name):
    with torch.device("meta"):
        model = build_model({"arch": "unet", "preset": name})
        x, t = torch.empty(2, 3, 64, 64), torch.zeros(2, dtype=torch.long)
        kwargs = ({"y": torch.zeros(2, dtype=torch.long)} if model.num_classes
                  else {"context": torch.empty(2, 77, 768), "context_mask": torch.ones(2, 77, dtype=torch.bool)})
        out = model(x, t, **kwargs)
    assert count(model) == pytest.approx(UNET_PAPER_PARAMS_M[name] * 1e6, rel=0.01)
    assert out.shape == (2, 3, 64, 64)


@pytest.mark.parametrize("name", sorted(AUTOENCODER_PARAMS_M))
def test_autoencoder_paper_presets_on_meta(name):
    with torch.device("meta"):
        model = build_autoencoder({"preset": name})
        latent = model.encode(torch.empty(1, 3, 256, 256))
        image = model.decode(latent)
    assert count(model) == pytest.approx(AUTOENCODER_PARAMS_M[name] * 1e6, rel=0.01)
    f = model.downsample_factor
    assert latent.shape == (1, model.embed_dim, 256 // f, 256 // f) and image.shape == (1, 3, 256, 256)


@pytest.mark.parametrize("arch,name", [("dit", n) for n in DIT_PRESETS if n not in paper_dit_presets()]
                         + [("unet", n) for n in UNET_PRESETS if n not in UNET_PAPER_PARAMS_M])
def test_tiny_denoisers_run_for_real(arch, name):
    torch.manual_seed(0)
    model = build_model({"arch": arch, "preset": name, "learn_sigma": True} if arch == "dit"
                        else {"arch": arch, "preset": name})
    assert count(model) < 5e6
    x = torch.randn(2, 1, 8, 8)
    out = model(x, torch.tensor([0, 999]), y=torch.tensor([1, 10]))
    assert out.shape[0] == 2 and out.shape[2:] == (8, 8) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", [n for n in AUTOENCODER_PRESETS if n not in AUTOENCODER_PARAMS_M])
def test_tiny_autoencoders_run_for_real(name):
    torch.manual_seed(0)
    model = build_autoencoder({"preset": name}).eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    latent = model.encode(x)
    assert latent.shape == (2, 3, 8, 8) and model.decode(latent).shape == x.shape
    assert count(model) < 2e6


def test_configs_are_plain_and_overrides_apply():
    config = {"arch": "dit", "preset": "DiT-micro/2", "num_classes": 4, "cep_mode": "uniform", "cep_gamma": 1.0}
    model = build_model(config)
    assert model.num_classes == 4 and model.cep.gamma == 1.0 and model.cep.mode == "uniform"
    assert config == {"arch": "dit", "preset": "DiT-micro/2", "num_classes": 4, "cep_mode": "uniform",
                      "cep_gamma": 1.0}                               # build_model does not mutate the config
    # Two models from one config and seed are identical (the config is the single source of truth).
    torch.manual_seed(3)
    a = build_model(config).state_dict()
    torch.manual_seed(3)
    b = build_model(config).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch,name", [("dit", "DiT-micro/2"), ("unet", "UNet-micro")])
def test_tiny_denoisers_learn_with_the_diffusion_loss(arch, name):
    """Model + eps loss together: a few Adam steps on a fixed batch of digits cut the loss at fixed (t, noise)."""
    from sklearn.datasets import load_digits

    from models.diffusion import GaussianDiffusion, make_betas
    torch.manual_seed(0)
    digits = load_digits()
    x0 = torch.tensor(digits.images[:16], dtype=torch.float32)[:, None] / 8 - 1
    y = torch.tensor(digits.target[:16])
    diffusion = GaussianDiffusion(make_betas("linear", 1000))
    model = build_model({"arch": arch, "preset": name, "class_dropout_prob": 0.0})
    t, noise = torch.randint(0, 1000, (16,)), torch.randn_like(x0)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        loss = diffusion.training_losses(model, x0, {"y": y}, t=t, noise=noise).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
