"""First-stage autoencoders for latent diffusion (LDM / taming-transformers layout): VQ (VQModel) and KL
(AutoencoderKL). Trained here with a pixel L1 loss plus the codebook / KL term; the adversarial and perceptual losses
of LDM need pretrained networks and are left out.

The diffusion model sees `encode(x)` = latent * scale_factor and hands samples to `decode(z)`. As in LDM, a VQ model's
diffusion latent is the pre-quantisation output; `decode` quantises it first.
"""
import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.unet import normalization


#################################################################################
#                               Encoder / Decoder                               #
#################################################################################

class ResnetBlock(nn.Module):
    """Two GroupNorm-SiLU-conv layers with a residual (1x1 conv when the width changes)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.block = nn.Sequential(
            normalization(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, 1, 1),
            normalization(out_channels), nn.SiLU(), nn.Conv2d(out_channels, out_channels, 3, 1, 1))
        self.nin_shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        return self.nin_shortcut(x) + self.block(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels."""

    def __init__(self, channels):
        super().__init__()
        self.norm = normalization(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        height = x.shape[2]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b 1 (h w) c", three=3)
        out = F.scaled_dot_product_attention(q, k, v)                     # (N, 1, HW, C)
        return x + self.proj_out(rearrange(out, "b 1 (h w) c -> b c h w", h=height))


def middle(channels):
    return nn.Sequential(ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels))


class Encoder(nn.Module):
    """Image -> latent map downsampled by 2^(len(ch_mult)-1)."""

    def __init__(self, in_channels, ch, ch_mult, num_res_blocks, out_channels):
        super().__init__()
        layers, block_in = [nn.Conv2d(in_channels, ch, 3, 1, 1)], ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
            if level != len(ch_mult) - 1:
                layers.append(nn.Conv2d(block_in, block_in, 3, stride=2, padding=1))
        layers += [middle(block_in), normalization(block_in), nn.SiLU(), nn.Conv2d(block_in, out_channels, 3, 1, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class Decoder(nn.Module):
    """Latent map -> image, mirroring the Encoder with num_res_blocks + 1 blocks per level."""

    def __init__(self, out_channels, ch, ch_mult, num_res_blocks, z_channels):
        super().__init__()
        block_in = ch * ch_mult[-1]
        layers = [nn.Conv2d(z_channels, block_in, 3, 1, 1), middle(block_in)]
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
            if level:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(block_in, block_in, 3, 1, 1)]
        layers += [normalization(block_in), nn.SiLU(), nn.Conv2d(block_in, out_channels, 3, 1, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, z):
        return self.layers(z)


#################################################################################
#                                  Bottlenecks                                  #
#################################################################################

class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation with the straight-through estimator (van den Oord et al. 2017, Eq. 3):
    loss = ||sg(z) - e||^2 + beta ||z - sg(e)||^2. Counts code usage while training."""

    def __init__(self, n_embed, embed_dim, beta=0.25):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1 / n_embed, 1 / n_embed)
        self.beta = beta
        self.register_buffer("usage_counts", torch.zeros(n_embed, dtype=torch.long))

    def codes(self, z):
        """Index of the nearest code for every latent pixel: (N, D, H, W) -> (N, H, W)."""
        flat = rearrange(z, "b d h w -> (b h w) d")
        distances = torch.cdist(flat.float(), self.embedding.weight.float())
        return distances.argmin(dim=1).view(z.shape[0], *z.shape[2:])

    def forward(self, z):
        indices = self.codes(z)                                           # (N, H, W)
        z_q = rearrange(self.embedding(indices), "b h w d -> b d h w")
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z, z_q.detach())
        if self.training:
            flat = indices.flatten()   # index_add_, not bincount: it has a meta kernel (shape checks on meta)
            counts = torch.zeros_like(self.usage_counts).index_add_(0, flat, torch.ones_like(flat))
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(counts)   # every replica counts every rank's codes: DDP replicas stay identical
            self.usage_counts += counts
        return z + (z_q - z).detach(), loss, indices                      # straight-through gradient

    def usage(self) -> float:
        """Fraction of codebook entries selected since the last reset_usage()."""
        return float((self.usage_counts > 0).float().mean())

    def reset_usage(self):
        self.usage_counts.zero_()


#################################################################################
#                                  Autoencoders                                 #
#################################################################################

class Autoencoder(nn.Module):
    """Encoder + bottleneck + decoder with LDM's latent scale factor (a buffer, so a fitted value is saved)."""

    def __init__(self, in_channels, ch, ch_mult, num_res_blocks, z_channels, embed_dim, encoder_out):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("ch", ch), ("num_res_blocks", num_res_blocks),
                            ("z_channels", z_channels), ("embed_dim", embed_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if ch % 4 or not ch_mult or any(not isinstance(m, int) or m < 1 for m in ch_mult):
            raise ValueError(f"ch must be a multiple of 4 and ch_mult a sequence of ints >= 1, got {ch}, {ch_mult!r}")
        self.encoder = Encoder(in_channels, ch, ch_mult, num_res_blocks, encoder_out)
        self.decoder = Decoder(in_channels, ch, ch_mult, num_res_blocks, z_channels)
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.in_channels, self.embed_dim = in_channels, embed_dim
        self.register_buffer("scale_factor", torch.tensor(1.0))

    def check_images(self, x):
        f = self.downsample_factor
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels \
                or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"x must be (N, {self.in_channels}, H, W) with H, W divisible by {f}, "
                             f"got {tuple(getattr(x, 'shape', ()))}")

    @torch.no_grad()
    def fit_scale_factor(self, x: torch.Tensor) -> float:
        """Set scale_factor = 1 / std of the raw latents of x, so diffusion sees roughly unit-variance latents."""
        self.scale_factor.fill_(1.0)
        self.scale_factor.fill_(1.0 / float(self.encode(x).float().std()))
        return float(self.scale_factor)

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Training loss: pixel L1 reconstruction + the bottleneck's regulariser. Returns (loss, detached stats)."""
        reconstruction, regularizer = self(x)
        reconstruction_loss = (reconstruction - x).abs().mean()
        loss = reconstruction_loss + regularizer
        return loss, {"loss": loss.detach(), "reconstruction": reconstruction_loss.detach(),
                      "regularizer": torch.as_tensor(regularizer).detach()}


class VQModel(Autoencoder):
    """VQ autoencoder (LDM VQ-f4: 64x64x3 latents from 256x256 images, 8192 codes)."""

    def __init__(self, in_channels=3, ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=3, embed_dim=3,
                 n_embed=8192, beta=0.25):
        super().__init__(in_channels, ch, ch_mult, num_res_blocks, z_channels, embed_dim, z_channels)
        if not isinstance(n_embed, int) or n_embed < 2:
            raise ValueError(f"n_embed must be an int >= 2, got {n_embed!r}")
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    @property
    def codebook(self) -> torch.Tensor:
        """(n_embed, embed_dim) code vectors in the unscaled latent space."""
        return self.quantize.embedding.weight

    def encode(self, x):
        """Images in [-1, 1] -> scaled pre-quantisation latents (N, embed_dim, H/f, W/f)."""
        self.check_images(x)
        return self.quant_conv(self.encoder(x)) * self.scale_factor

    def decode(self, z):
        """Scaled latents -> quantise -> images."""
        quantized, _, _ = self.quantize(z / self.scale_factor)
        return self.decoder(self.post_quant_conv(quantized))

    def forward(self, x):
        self.check_images(x)
        quantized, codebook_loss, _ = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(quantized)), codebook_loss


class AutoencoderKL(Autoencoder):
    """KL-regularised autoencoder (LDM / Stable Diffusion KL-f8: 4 latent channels)."""

    def __init__(self, in_channels=3, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, embed_dim=4,
                 kl_weight=1e-6):
        super().__init__(in_channels, ch, ch_mult, num_res_blocks, z_channels, embed_dim, 2 * z_channels)
        if not kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight!r}")
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.kl_weight = kl_weight

    def moments(self, x):
        """Posterior mean and log-variance (clamped as in LDM's DiagonalGaussianDistribution)."""
        self.check_images(x)
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x, generator: torch.Generator | None = None):
        """Scaled latents: the posterior mean, or a posterior sample when a generator is given."""
        mean, logvar = self.moments(x)
        if generator is not None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + (0.5 * logvar).exp() * noise
        return mean * self.scale_factor

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z / self.scale_factor))

    def forward(self, x):
        mean, logvar = self.moments(x)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)          # reparameterisation
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()
        return self.decoder(self.post_quant_conv(z)), self.kl_weight * kl


#################################################################################
#                                     Configs                                   #
#################################################################################

AUTOENCODER_PRESETS = {
    # LDM vq-f4 (paper 1 Table 3: 64x64x3 latents, 8192 codes).
    "vq-f4": dict(kind="vq", in_channels=3, ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=3, embed_dim=3,
                  n_embed=8192),
    # Stable Diffusion / DiT VAE layout (32x32x4 latents from 256x256 images).
    "kl-f8": dict(kind="kl", in_channels=3, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4,
                  embed_dim=4),
    # Trainable on 2 CPU cores (e.g. 32x32 MNIST -> 8x8 latents).
    "vq-f4-tiny": dict(kind="vq", in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=3,
                       embed_dim=3, n_embed=256),
    "kl-f4-tiny": dict(kind="kl", in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=3,
                       embed_dim=3),
}


def build_autoencoder(config: dict) -> Autoencoder:
    """{"preset": name, **overrides} -> VQModel or AutoencoderKL (the dict is what checkpoints store)."""
    if not isinstance(config, dict) or config.get("preset") not in AUTOENCODER_PRESETS:
        raise ValueError(f"config['preset'] must be one of {sorted(AUTOENCODER_PRESETS)}, "
                         f"got {config.get('preset') if isinstance(config, dict) else config!r}")
    kwargs = {**AUTOENCODER_PRESETS[config["preset"]], **copy.deepcopy({k: v for k, v in config.items()
                                                                         if k != "preset"})}
    kind = kwargs.pop("kind")
    if kind not in ("vq", "kl"):
        raise ValueError(f"config['kind'] must be 'vq' or 'kl', got {kind!r}")
    return (VQModel if kind == "vq" else AutoencoderKL)(**kwargs)


def save_autoencoder(model: Autoencoder, config: dict, path) -> None:
    """{"config", "state_dict"} checkpoint loadable with torch.load(weights_only=True)."""
    torch.save({"config": copy.deepcopy(config), "state_dict": model.state_dict()}, path)


def load_autoencoder(path, map_location="cpu") -> tuple[Autoencoder, dict]:
    """Inverse of save_autoencoder; returns the model in eval mode and its config."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        config, state = checkpoint["config"], checkpoint["state_dict"]
    except (OSError, RuntimeError, KeyError, TypeError) as error:
        raise ValueError(f"path {str(path)!r} is not a readable autoencoder checkpoint: {error}") from error
    model = build_autoencoder(config)
    model.load_state_dict(state)
    return model.eval(), config
