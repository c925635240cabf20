"""Loading a run for sampling: the one place that turns a run dir (config + EMA denoiser + text encoder +
autoencoder) into the parts a sampler needs. Training's sample grids build the same LoadedRun from the EMA in memory,
so training and evaluation never disagree about what a run is."""
from dataclasses import dataclass

import torch

from models.autoencoder import load_autoencoder
from models.diffusion import GaussianDiffusion
from training.checkpoint import load_ema_model, load_ema_text_encoder
from training.latents import autoencoder_file
from training.prepare import model_input_shape
from training.presets import build_diffusion


@dataclass
class LoadedRun:
    config: dict                          # the completed run config
    model: torch.nn.Module                # EMA denoiser, model(x, t, y | context, context_mask, control)
    text_encoder: torch.nn.Module | None  # EMA text encoder (text runs)
    decoder: torch.nn.Module | None       # autoencoder whose latents the model diffuses (LDM runs)
    diffusion: GaussianDiffusion

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) the denoiser sees: pixels, or latents on the LDM path."""
        return model_input_shape(self.config)

    @classmethod
    def from_parts(cls, config: dict, model, text_encoder=None, device="cpu") -> "LoadedRun":
        """A run still in memory (training's EMA): the decoder and schedule come from the config, as on disk."""
        return cls(config, model, text_encoder, load_decoder(config, device), build_diffusion(config["diffusion"]))


def load_decoder(config: dict, device="cpu"):
    """The run's autoencoder for latent (LDM) runs (config["latent"]["autoencoder"]), else None."""
    if not config.get("latent"):
        return None
    return load_autoencoder(autoencoder_file(config["latent"]["autoencoder"]), map_location=device)[0]


def load_run(run_dir, device="cpu") -> LoadedRun:
    """A finished (or checkpointed) run's EMA weights and everything needed to sample from them."""
    model, config = load_ema_model(run_dir, map_location=device)
    text_encoder = load_ema_text_encoder(run_dir, device) if config["data"].get("condition") == "text" else None
    return LoadedRun.from_parts(config, model, text_encoder, device)
