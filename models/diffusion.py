"""Discrete-time Gaussian diffusion: beta schedules, forward process, eps-prediction loss.

Notation follows DDPM/ADM: alpha_bar_t = prod_{s<=t} (1 - beta_s),
x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.
Timesteps are integer indices 0..num_steps-1 (0 = least noise). Samplers (DDPM, DDIM, DPM-Solver++(2M)) share one
loop with classifier-free guidance and one torch.Generator per image, so a sample set does not depend on batch size.
"""
import math

import torch
from tqdm import tqdm

SCHEDULES = ("linear", "ldm-linear", "cosine")
SAMPLERS = ("ddpm", "ddim", "dpm++2m")


def make_betas(schedule: str, num_steps: int = 1000) -> torch.Tensor:
    """Beta schedule as a float64 tensor of length num_steps."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2, got {num_steps!r}")
    if schedule == "linear":
        # DiT/ADM: 1e-4..0.02 for 1000 steps, rescaled so other step counts keep the same alpha_bar curve
        # (clamped like the cosine schedule for very short chains, where the rescaled beta would pass 1).
        scale = 1000 / num_steps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64).clamp(max=0.999)
    if schedule == "ldm-linear":
        # LDM: linear in sqrt(beta) from 0.0015 to 0.0195 (latent-diffusion "linear" schedule).
        return torch.linspace(0.0015**0.5, 0.0195**0.5, num_steps, dtype=torch.float64) ** 2
    if schedule == "cosine":
        # Nichol & Dhariwal (2021) Eq. 17: alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), s = 0.008, beta <= 0.999.
        t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        alpha_bar = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def split_output(output: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(eps, v) from a model output: eps is the whole output, or its first half for learn-sigma models whose second
    half v in [-1, 1] interpolates the reverse-process log-variance (None without it)."""
    if output.shape == x.shape:
        return output, None
    if output.dim() == x.dim() and output.shape[1] == 2 * x.shape[1] and output.shape[2:] == x.shape[2:]:
        return output[:, : x.shape[1]], output[:, x.shape[1]:]
    raise ValueError(f"model output has shape {tuple(output.shape)}; expected {tuple(x.shape)} "
                     f"or twice the channels (learn_sigma)")


def learned_log_variance(v: torch.Tensor, log_beta, log_beta_tilde) -> torch.Tensor:
    """Nichol & Dhariwal 2021 Eq. 15: log Sigma = f log beta + (1 - f) log beta_tilde with f = (v + 1) / 2."""
    fraction = (v + 1) / 2
    return fraction * log_beta + (1 - fraction) * log_beta_tilde


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) of data in [-1, 1] quantised to 256 bins under N(mean, exp(log_scale)^2) (DDPM §3.3 decoder L_0)."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (x - mean + 1 / 255))
    cdf_min = torch.special.ndtr(inv_std * (x - mean - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def extract(values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """values[t] as x's dtype, shaped [B, 1, ..., 1] to broadcast over x."""
    return values.to(x.device)[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


class GaussianDiffusion:
    """The forward process of one beta schedule and its eps-prediction training loss."""

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D tensor with >= 2 entries, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1)")
        self.betas = betas
        self.num_steps = betas.numel()
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        previous = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # Posterior q(x_{t-1} | x_t, x_0) (DDPM Eq. 7); beta_tilde_0 = 0, so its log is clipped to beta_tilde_1.
        self.posterior_mean_coef_x0 = betas * previous.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef_xt = (1 - previous) * (1 - betas).sqrt() / (1 - self.alphas_cumprod)
        posterior_variance = betas * (1 - previous) / (1 - self.alphas_cumprod)
        self.posterior_log_variance = torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log()

    def check_timesteps(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64) or t.shape != (batch,):
            raise ValueError(f"t must be an integer tensor of shape ({batch},), got {t!r}")
        if bool(((t < 0) | (t >= self.num_steps)).any()):
            raise ValueError(f"t must lie in [0, {self.num_steps}), got min {int(t.min())} max {int(t.max())}")
        return t.long()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise  (DDPM Eq. 4)."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal x0 shape {tuple(x0.shape)}")
        t = self.check_timesteps(t, x0.shape[0])
        alpha_bar = extract(self.alphas_cumprod, t, x0)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise

    def training_losses(self, model, x0: torch.Tensor, model_kwargs: dict, t: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None, input_perturbation: float = 0.0,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample eps-prediction MSE ||eps - eps_theta(x_t, t, c)||^2 averaged over non-batch dims, shape [B].

        Learn-sigma models (twice the channels) add the variational bound for their variance output with the eps
        prediction frozen, as DiT/IDDPM's L_hybrid (Nichol & Dhariwal 2021 §3.1).
        input_perturbation = gamma_IP > 0 is the IP baseline (Ning et al. 2023): the network sees
        x_t built from eps + gamma_IP * xi but is still asked to predict eps.
        """
        if not isinstance(x0, torch.Tensor) or x0.dim() < 2 or not x0.is_floating_point():
            raise ValueError(f"x0 must be a floating tensor [B, ...], got {getattr(x0, 'shape', x0)!r}")
        if not isinstance(model_kwargs, dict):
            raise TypeError(f"model_kwargs must be a dict, got {type(model_kwargs).__name__}")
        if not isinstance(input_perturbation, (int, float)) or not 0 <= input_perturbation < math.inf:
            raise ValueError(f"input_perturbation must be a finite float >= 0, got {input_perturbation!r}")
        batch = x0.shape[0]
        # Draw on the generator's device (e.g. a CPU generator for CUDA data), then move.
        draw_device = generator.device if generator is not None else x0.device
        if t is None:
            t = torch.randint(0, self.num_steps, (batch,), generator=generator, device=draw_device).to(x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=draw_device).to(x0.device)
        x_input_noise = noise
        if input_perturbation > 0:
            xi = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=draw_device).to(x0.device)
            x_input_noise = noise + input_perturbation * xi
        x_t = self.q_sample(x0, t, x_input_noise)
        eps, v = split_output(model(x_t, t, **model_kwargs), x_t)
        loss = (eps - noise).pow(2).flatten(1).mean(1)
        if v is not None:
            loss = loss + self.variance_bound(x0, x_t, t, eps.detach(), v)
        return loss

    def variance_bound(self, x0, x_t, t, eps, v) -> torch.Tensor:
        """L_vlb term in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, decoder NLL at t = 0."""
        alpha_bar = extract(self.alphas_cumprod, t, x_t)
        x0_pred = (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        coef_x0, coef_xt = extract(self.posterior_mean_coef_x0, t, x_t), extract(self.posterior_mean_coef_xt, t, x_t)
        true_mean, true_log_var = coef_x0 * x0 + coef_xt * x_t, extract(self.posterior_log_variance, t, x_t)
        model_mean = coef_x0 * x0_pred + coef_xt * x_t
        model_log_var = learned_log_variance(v, extract(self.betas.log(), t, x_t), true_log_var)
        kl = 0.5 * (-1 + model_log_var - true_log_var + (true_log_var - model_log_var).exp()
                    + (true_mean - model_mean).pow(2) * (-model_log_var).exp())
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
        first = (t == 0).reshape(-1, *([1] * (x_t.dim() - 1)))
        return torch.where(first, nll, kl).flatten(1).mean(1) / math.log(2)

    def shift_schedule(self, resolution_ratio: float) -> "GaussianDiffusion":
        """Schedule for a resolution `resolution_ratio` times larger (per side): SNR_new(t) = SNR(t) / ratio^2.

        Paper 2 (App. C) shifts the schedule so higher resolutions spend more time at high noise; its exact
        law is not available, so this is the SD3 stand-in logSNR_new = logSNR - 2 log(ratio) (see the digest §3.3).
        """
        if not isinstance(resolution_ratio, (int, float)) or not 0 < resolution_ratio < math.inf:
            raise ValueError(f"resolution_ratio must be a finite float > 0, got {resolution_ratio!r}")
        snr = self.alphas_cumprod / (1 - self.alphas_cumprod) / resolution_ratio**2
        alpha_bar = snr / (1 + snr)
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        return GaussianDiffusion((1 - alpha_bar / previous).clamp(min=1e-12, max=0.999))


#################################################################################
#                                   Samplers                                    #
#################################################################################

def per_image_noise(shape, generators: list[torch.Generator], device) -> torch.Tensor:
    """Stack one N(0, I) draw per image, image i from generators[i] (so results ignore batch composition)."""
    return torch.stack([torch.randn(shape[1:], generator=g, device=g.device).to(device) for g in generators])


def guided_eps(model, x, t, model_kwargs, null_kwargs, guidance):
    """Classifier-free guidance on all channels: eps = eps_u + s (eps_c - eps_u); s = 1 is the conditional model.
    Returns (eps, v): a learn-sigma model's variance output v is the conditional one (as DiT), else None."""
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    eps_c, v = split_output(model(x, t_batch, **model_kwargs), x)
    if guidance == 1.0:
        return eps_c, v
    eps_u, _ = split_output(model(x, t_batch, **null_kwargs), x)
    return eps_u + guidance * (eps_c - eps_u), v


def sampling_timesteps(num_steps: int, steps: int) -> list[int]:
    """`steps` evenly spaced training timesteps from num_steps-1 (pure noise end) down to 0."""
    return torch.linspace(num_steps - 1, 0, steps, dtype=torch.float64).round().long().tolist()


@torch.no_grad()
def sample(model, diffusion: GaussianDiffusion, shape, model_kwargs: dict, null_kwargs: dict, sampler: str = "ddim",
           steps: int = 50, guidance: float = 1.0, generators: list[torch.Generator] | None = None, eta: float = 0.0,
           progress: bool = False, device=None) -> torch.Tensor:
    """Draw len(generators) samples x_0 of `shape` = [B, ...] by integrating from x_T ~ N(0, I) to t = 0.

    ddim: Song et al. 2021 Eq. 12 with eta (0 = deterministic ODE). ddpm: the ancestral sampler, i.e. the same update
    with eta = 1 (posterior variance beta_tilde) on the respaced schedule, or the model's learned variance
    (Nichol & Dhariwal Eq. 15 on the respaced betas) for learn-sigma models. dpm++2m: Lu et al. 2022 (DPM-Solver++)
    multistep second-order data-prediction solver, first order on the first and the last update.
    The last step of every sampler goes to alpha_bar = 1 (x_0 = predicted x_0).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if not isinstance(diffusion, GaussianDiffusion):
        raise TypeError(f"diffusion must be a GaussianDiffusion, got {type(diffusion).__name__}")
    shape = tuple(shape)
    if len(shape) < 2 or any(not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"shape must be [B, ...] of positive ints, got {shape!r}")
    if not isinstance(generators, (list, tuple)) or len(generators) != shape[0] \
            or not all(isinstance(g, torch.Generator) for g in generators):
        raise ValueError(f"generators must be a list of {shape[0]} torch.Generator (one per image)")
    if not isinstance(steps, int) or not 1 <= steps <= diffusion.num_steps:
        raise ValueError(f"steps must be an int in [1, {diffusion.num_steps}], got {steps!r}")
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite float, got {guidance!r}")
    if not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1], got {eta!r}")
    if not isinstance(model_kwargs, dict) or not isinstance(null_kwargs, dict):
        raise TypeError("model_kwargs and null_kwargs must be dicts")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu")) \
            if isinstance(model, torch.nn.Module) else torch.device("cpu")
    eta = 1.0 if sampler == "ddpm" else float(eta)
    # Sampling never uses training-mode behaviour (label dropout, CEP): run the model in eval mode, then restore.
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        return integrate(model, diffusion, shape, model_kwargs, null_kwargs, sampler, steps, float(guidance),
                         generators, eta, progress, device)
    finally:
        if was_training:
            model.train()


def integrate(model, diffusion, shape, model_kwargs, null_kwargs, sampler, steps, guidance, generators, eta, progress,
              device) -> torch.Tensor:
    """The sampling loop of `sample` (arguments already checked)."""
    timesteps = sampling_timesteps(diffusion.num_steps, steps)
    alpha_bars = [float(diffusion.alphas_cumprod[t]) for t in timesteps] + [1.0]
    x = per_image_noise(shape, generators, device)
    previous_x0, previous_h = None, None
    for i in tqdm(range(steps), disable=not progress, desc=f"{sampler} sampling"):
        a, a_next = alpha_bars[i], alpha_bars[i + 1]
        eps, v = guided_eps(model, x, timesteps[i], model_kwargs, null_kwargs, guidance)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        if a_next == 1.0:                       # final step: return the data prediction
            x = x0
        elif sampler == "dpm++2m":
            # DPM-Solver++(2M), lambda = log(alpha/sigma); Lu et al. 2022 Alg. 2.
            lam, lam_next = 0.5 * math.log(a / (1 - a)), 0.5 * math.log(a_next / (1 - a_next))
            h = lam_next - lam
            data = x0
            # Second order except on the first step and on the last update, which lands on t = 0: there h is several
            # times the previous step, and the extrapolation weight 1/(2r) would overshoot (DPM-Solver++'s
            # lower_order_final; k-diffusion's sample_dpmpp_2m likewise ends first order).
            if previous_x0 is not None and i < steps - 2:
                r = previous_h / h
                data = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous_x0
            x = math.sqrt((1 - a_next) / (1 - a)) * x - math.sqrt(a_next) * math.expm1(-h) * data
            previous_x0, previous_h = x0, h
        else:
            # DDIM Eq. 12; sigma from Eq. 16 (eta = 1 gives the DDPM posterior variance).
            sigma = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
            x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next - sigma**2) * eps
            if sampler == "ddpm" and v is not None:
                sigma = (0.5 * learned_log_variance(v, math.log(1 - a / a_next), 2 * math.log(sigma))).exp()
            if eta > 0:
                x = x + sigma * per_image_noise(shape, generators, device)
    return x
