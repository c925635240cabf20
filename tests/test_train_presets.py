"""Every run preset in configs/ parses and builds its model: paper sizes on the meta device (no memory) with the
papers' parameter counts, CPU-tiny ones for real with a training-loss evaluation."""
import pytest
import torch

from models import build_model
from models.text_encoder import TextEncoder
from training.data import ImageDataset
from training.prepare import complete_config, model_input_shape
from training.presets import DEFAULTS, build_diffusion, load_preset, merge, preset_names, resume_differences

# (preset, latent shape its autoencoder produces, parameter count of the denoiser in millions (paper), tolerance)
PAPER = [("dit-xl2-in1k", (4, 32, 32), 675, 0.01), ("ldm4-in1k", (3, 64, 64), 400, 0.05),
         ("ldm4-cc3m", (3, 64, 64), 400, 0.05)]


def stub_dataset(num_classes: int) -> ImageDataset:
    return ImageDataset(torch.zeros(1, 1, 1, 1, dtype=torch.uint8), torch.ones(1, 2, dtype=torch.int64),
                        [str(i) for i in range(num_classes)], torch.zeros(1, dtype=torch.int64))


def test_all_presets_listed():
    assert {"dit-tiny-digits", "dit-xl2-in1k", "ldm4-in1k", "ldm4-cc3m", "unet-tiny-digits"} <= set(preset_names())


@pytest.mark.parametrize("name, latent_shape, params_m, tolerance", PAPER)
def test_paper_presets_on_meta(name, latent_shape, params_m, tolerance):
    config = complete_config(load_preset(name), stub_dataset(1000), latent_shape)
    with torch.device("meta"):
        model = build_model(config["model"])
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - params_m) <= tolerance * params_m, f"{name}: {count:.1f}M parameters"
    assert model_input_shape(config) == latent_shape
    assert build_diffusion(config["diffusion"]).num_steps == 1000
    if config["data"]["condition"] == "text":
        with torch.device("meta"):
            encoder = TextEncoder(**config["text_encoder"])
        assert 100 < sum(p.numel() for p in encoder.parameters()) / 1e6 < 130  # bert-base size (110M)


@pytest.mark.parametrize("name", [n for n in preset_names() if "digits" in n])
def test_tiny_presets_build_and_compute_a_loss(name):
    config = complete_config(load_preset(name), stub_dataset(10), None)
    model = build_model(config["model"])
    shape = model_input_shape(config)
    kwargs = {}
    if config["data"]["condition"] == "class":
        kwargs["y"] = torch.tensor([1, 2])
    else:
        kwargs["context"], kwargs["context_mask"] = TextEncoder(**config["text_encoder"]).encode(["a", "b"])
    if config["model"].get("control_dim"):
        kwargs["control"] = torch.zeros(2, 5)
    loss = build_diffusion(config["diffusion"]).training_losses(model, torch.zeros(2, *shape), kwargs)
    assert loss.shape == (2,) and torch.isfinite(loss).all()


def test_merge_rejects_unknown_sections_and_resume_differences():
    with pytest.raises(ValueError, match="unknown config section 'modle'"):
        merge(DEFAULTS, {"modle": {}})
    a = load_preset("dit-tiny-digits")
    b = merge(a, {"training": {"total_images": 5, "lr": 1.0}, "logging": {"log_every_images": 7}})
    assert resume_differences(a, b) == ["training.lr"]


def test_design_command_corrupts_symmetrically():
    """DESIGN.md's command gives only --corruption-ratio: the paper's symmetric flips are the default kind."""
    from training.train import parse_args
    config, _, _ = parse_args(["--preset", "dit-tiny-digits", "--corruption-ratio", "0.05", "--cep", "uniform",
                               "--cep-gamma", "1.0", "--run-dir", "unused"])
    assert config["corruption"] == {"kind": "symmetric", "ratio": 0.05, "classes": None}
    assert config["model"]["cep_mode"] == "uniform" and config["model"]["cep_gamma"] == 1.0
