"""The theory-to-network bridge (issue 10 §2): diffusion models trained on paper 1's Gaussian mixture.

    from gmm_theory.bridge import run
    run(seed=0, model="mlp", d=8, n_k=256, cep="uniform", gamma=0.5)   # -> {metric: value}

One call = one (setting, seed) of a study plan (`python -m evaluation.study configs/studies/gmm.json`): draw K classes
N(mu_k, I), |mu_k| = mu_norm (closed_forms.class_means), n_k points each; corrupt the labels with the project's
symmetric flips (training/corruption.py); train a denoiser through the project's eps-prediction loss
(models.diffusion) with the real CEP op on its class embedding (models.cep); sample with the project's sampler; measure
and predict (bridge_metrics.py).

gamma mapping. The theory's gamma is the per-coordinate noise std on the one-hot condition e_k; CEP adds
gamma/sqrt(d_c) * noise to a d_c-wide embedding c(y), noise U(-1, 1) (variance 1/3) or N(0, 1). A linear readout sees
the noise along c relative to |c|, so the matched theory gamma is
    gamma_theory = gamma_cep / sqrt(d_c) / |c(y)|   (CEP-G),   gamma_cep / sqrt(3 d_c) / |c(y)|   (CEP-U)
(= |delta| / (|c| sqrt(d_c)) in expectation). The linear model's table is the fixed one-hot (d_c = K, |c| = 1); the
MLP's is learned, so its matched gamma is measured at the end of training. Runs report it as `gamma_theory`, with
|delta| / |c(y)| at the start and end of training (`noise_ratio_start`, `noise_ratio_end`).
"""
import math

import numpy as np
import torch
from tqdm import tqdm

from models.cep import CEP
from models.diffusion import SAMPLERS, GaussianDiffusion, make_betas, sample
from training.corruption import symmetric_flip

from .bridge_metrics import class_stats, sample_metrics, theory_metrics, theory_targets
from .bridge_models import LinearDenoiser, MLPDenoiser, noise_to_signal
from .closed_forms import class_means, learned_target, linear_denoiser
from .label_flip import effective_gamma

MODELS = ("linear", "mlp")
CEP_MODES = ("none", "uniform", "gaussian")
# Training defaults per model: Adam, cosine decay to 0 (so the linear model settles on its optimum).
TRAINING = {"linear": dict(steps=600, batch_size=2048, lr=0.02), "mlp": dict(steps=800, batch_size=256, lr=2e-3)}
DEFAULTS = dict(model="mlp", d=8, n_k=256, num_classes=4, mu_norm=2.0, cep="none", gamma=0.0, eta=0.0,
                diffusion_steps=100, sampler="dpm++2m", sample_steps=50, samples_per_class=1000, ot_samples=1000,
                steps=None, batch_size=None, lr=None, width=128, embed_dim=32, log_points=5)


def check_kwargs(kwargs: dict) -> dict:
    """DEFAULTS updated by kwargs, each checked; errors name the argument."""
    unknown = sorted(set(kwargs) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown argument {unknown[0]!r}; expected one of {sorted(DEFAULTS)}")
    config = {**DEFAULTS, **kwargs}
    config.update({k: v for k, v in TRAINING.get(config["model"], {}).items() if config[k] is None})

    def positive_int(name, low=1):
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

    def number(name, low=0.0, high=math.inf, high_open=False):
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
                or (high_open and value == high) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number in [{low}, {high}{')' if high_open else ']'}, "
                             f"got {value!r}")

    if config["model"] not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {config['model']!r}")
    if config["cep"] not in CEP_MODES:
        raise ValueError(f"cep must be one of {CEP_MODES}, got {config['cep']!r}")
    if config["sampler"] not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {config['sampler']!r}")
    for name in ("d", "steps", "batch_size", "width", "embed_dim", "log_points"):
        positive_int(name)
    positive_int("num_classes", 2)
    positive_int("diffusion_steps", 2)
    positive_int("n_k", config["d"] + 1)  # a full-rank empirical covariance
    positive_int("samples_per_class", config["d"] + 1)
    positive_int("ot_samples", config["num_classes"])
    positive_int("sample_steps")
    if config["sample_steps"] > config["diffusion_steps"]:
        raise ValueError(f"sample_steps must be <= diffusion_steps={config['diffusion_steps']}, "
                         f"got {config['sample_steps']}")
    if config["num_classes"] > 2 * config["d"]:
        raise ValueError(f"num_classes must be <= 2 d (centred +-mu_norm e_i means), got {config['num_classes']}")
    number("mu_norm", low=0.0)
    if config["mu_norm"] == 0:
        raise ValueError("mu_norm must be > 0 (the classes must differ)")
    number("gamma")
    number("eta", high=1.0, high_open=True)
    number("lr")
    if config["lr"] == 0:
        raise ValueError("lr must be > 0")
    if (config["cep"] == "none") != (config["gamma"] == 0):
        raise ValueError(f"gamma must be > 0 exactly when cep is 'uniform' or 'gaussian', got cep={config['cep']!r}"
                         f" with gamma={config['gamma']}")
    if config["ot_samples"] > config["num_classes"] * config["samples_per_class"]:
        raise ValueError(f"ot_samples must be <= num_classes * samples_per_class, got {config['ot_samples']}")
    return config


def matched_gamma(mode: str, gamma: float, embed_dim: int, embed_norm: float) -> float:
    """The theory's per-coordinate gamma on a unit condition with the same relative noise (module docstring)."""
    if mode == "none":
        return 0.0
    spread = 1 / math.sqrt(3) if mode == "uniform" else 1.0  # std of U(-1, 1) noise, or N(0, 1)
    return gamma * spread / math.sqrt(embed_dim) / embed_norm


def make_data(config: dict, seed: int) -> dict:
    """Training points and labels (clean and flipped) plus fresh true draws for the metrics' references; all from
    `seed` alone, so every setting of one seed sees the same data (paired differences)."""
    num_classes, d, n_k = config["num_classes"], config["d"], config["n_k"]
    true_means = class_means(num_classes, d, config["mu_norm"])
    generator = torch.Generator().manual_seed(seed)

    def draw(per_class: int) -> np.ndarray:
        noise = torch.randn(num_classes, per_class, d, generator=generator, dtype=torch.float64).numpy()
        return true_means[:, None] + noise

    labels = torch.arange(num_classes).repeat_interleave(n_k)
    flipped = labels
    if config["eta"] > 0:
        flipped, _ = symmetric_flip(labels, num_classes, config["eta"], seed)
    train = draw(n_k).reshape(-1, d)
    ot_per_class = config["ot_samples"] // num_classes
    references = dict(ot=draw(ot_per_class).reshape(-1, d), ot_bias=draw(ot_per_class).reshape(-1, d),
                      nn=draw(config["samples_per_class"]).reshape(-1, d))
    return dict(true_means=true_means, train=train, labels=labels.numpy(), flipped=flipped, references=references)


def build_model(config: dict) -> torch.nn.Module:
    cep = CEP(config["cep"], config["gamma"])
    if config["model"] == "linear":
        return LinearDenoiser(config["num_classes"], config["d"], config["diffusion_steps"], cep)
    return MLPDenoiser(config["num_classes"], config["d"], cep, config["width"], config["embed_dim"])


def random_batches(num_points: int, batch_size: int, generator: torch.Generator):
    """Uniform points; timesteps left to the loss (uniform)."""
    return lambda: (torch.randint(0, num_points, (batch_size,), generator=generator), None)


def stratified_batches(y: torch.Tensor, num_steps: int, batch_size: int, generator: torch.Generator):
    """Every (class, timestep) cell of the linear model's table gets the same number of samples per step (points
    uniform within the labelled class): lower-variance steps for a table whose cells never share data."""
    num_classes = int(y.max()) + 1
    members = [torch.nonzero(y == k).squeeze(1) for k in range(num_classes)]
    if any(len(m) == 0 for m in members):
        raise ValueError("every class needs at least one labelled training point")
    per_cell = max(1, batch_size // (num_classes * num_steps))
    t = torch.arange(num_steps).repeat(num_classes * per_cell)

    def draw():
        index = torch.cat([m[torch.randint(0, len(m), (num_steps * per_cell,), generator=generator)]
                           for m in members])
        return index, t

    return draw


def train(model, diffusion: GaussianDiffusion, x: torch.Tensor, y: torch.Tensor, config: dict,
          generator: torch.Generator, progress: bool) -> list[float]:
    """Adam on the project's eps-prediction loss; returns |delta| / |c(y)| at `log_points` evenly spaced steps."""
    steps = config["steps"]
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    log_at = set(np.linspace(0, steps, config["log_points"]).round().astype(int).tolist())
    trace = []
    draw = stratified_batches(y, diffusion.num_steps, config["batch_size"], generator) \
        if config["model"] == "linear" else random_batches(len(x), config["batch_size"], generator)
    for step in tqdm(range(steps + 1), disable=not progress, desc=f"train {config['model']}", leave=False):
        if step in log_at:
            trace.append(noise_to_signal(model, config["num_classes"]))
        if step == steps:
            break
        index, t = draw()
        loss = diffusion.training_losses(model, x[index], {"y": y[index]}, t=t, generator=generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return trace


def generate(model, diffusion: GaussianDiffusion, config: dict, seed: int, progress: bool) -> np.ndarray:
    """samples_per_class samples of every class, [K, N, d]; image i's noise comes from its own generator keyed by
    (seed, i), so every setting of a seed starts from the same x_T."""
    num_classes, per_class, d = config["num_classes"], config["samples_per_class"], config["d"]
    y = torch.arange(num_classes).repeat_interleave(per_class)
    generators = [torch.Generator().manual_seed((seed + 1) * 2**32 + i) for i in range(len(y))]
    x = sample(model, diffusion, (len(y), d), {"y": y}, {"y": y}, sampler=config["sampler"],
               steps=config["sample_steps"], generators=generators, progress=progress)
    return x.double().numpy().reshape(num_classes, per_class, d)


def linear_weight_errors(model: LinearDenoiser, diffusion: GaussianDiffusion, targets: dict) -> dict:
    """Relative Frobenius error of the trained W_{k,t} table against each closed-form optimum (Lemma 1/2 with the
    discrete schedule's r_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), i.e. OU time -log(alpha_bar_t)/2)."""
    trained = model.weight.detach().double().numpy()[..., :model.weight.shape[2]]  # W of [W | V]: [K, T, d, d]
    times = (-0.5 * torch.log(diffusion.alphas_cumprod)).numpy()
    errors = {}
    for name in ("exact", "paper"):
        closed = np.stack([linear_denoiser(targets[name], t)[0] for t in times], axis=1)
        errors[f"w_error_{name}"] = float(np.linalg.norm(trained - closed) / np.linalg.norm(closed))
    return errors


def run(seed: int, progress: bool = False, **kwargs) -> dict[str, float]:
    """Train, sample and measure one (setting, seed); see the module docstring. Deterministic given seed."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    config = check_kwargs(kwargs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small runs: one thread each (the machine is shared)
    try:
        torch.manual_seed(seed)  # model initialisation and CEP's per-call Philox keys
        data = make_data(config, seed)
        diffusion = GaussianDiffusion(make_betas("linear", config["diffusion_steps"]))
        model = build_model(config)
        x = torch.from_numpy(data["train"]).float()
        trace = train(model, diffusion, x, data["flipped"], config, torch.Generator().manual_seed(seed), progress)
        samples = generate(model, diffusion, config, seed, progress)
    finally:
        torch.set_num_threads(threads)

    num_classes = config["num_classes"]
    embed_dim, embed_norm = num_classes, 1.0  # the linear model's one-hot
    if config["model"] == "mlp":
        with torch.no_grad():
            embed_dim, embed_norm = config["embed_dim"], float(model.embedding.weight.norm(dim=-1).mean())
    cep_gamma = matched_gamma(config["cep"], config["gamma"], embed_dim, embed_norm)
    # Flips and CEP both shrink the class mean; the theory gamma composes them: 1 + g^2 = (1 + g_cep^2)(1 + g_eta^2).
    gamma = math.sqrt((1 + cep_gamma**2) * (1 + effective_gamma(config["eta"], num_classes) ** 2) - 1)
    clean_stats = class_stats(data["train"], data["labels"], num_classes)
    labelled_stats = class_stats(data["train"], data["flipped"].numpy(), num_classes)
    targets = theory_targets(clean_stats, labelled_stats, gamma, cep_gamma)

    metrics = sample_metrics(samples, data["true_means"], data["train"], targets, data["references"])
    metrics.update(theory_metrics(targets, data["true_means"]))
    if config["model"] == "linear":
        linear_targets = dict(exact=learned_target(*labelled_stats, cep_gamma, "exact"),
                              paper=learned_target(*labelled_stats, cep_gamma, "paper"))
        metrics.update(linear_weight_errors(model, diffusion, linear_targets))
    metrics.update(gamma_theory=gamma, gamma_cep_matched=cep_gamma, embed_norm=embed_norm,
                   noise_ratio_start=trace[0], noise_ratio_mid=trace[len(trace) // 2], noise_ratio_end=trace[-1])
    return metrics
