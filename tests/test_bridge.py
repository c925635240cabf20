"""The theory-to-network bridge (gmm_theory.bridge): the trained linear denoiser is the exact optimum, the sampler
reproduces the theory's generated law, runs are deterministic, metrics are sane, bad kwargs are named."""
import math

import numpy as np
import pytest
import torch

from gmm_theory import bridge
from gmm_theory.bridge_metrics import class_stats
from gmm_theory.closed_forms import learned_target, linear_denoiser
from gmm_theory.gaussians import empirical_stats, entropy
from gmm_theory.label_flip import effective_gamma
from models.diffusion import GaussianDiffusion, make_betas

TINY = dict(d=2, num_classes=2, n_k=64, diffusion_steps=10, sample_steps=10, samples_per_class=200, ot_samples=100)


def test_linear_denoiser_trained_by_adam_lands_on_the_exact_optimum():
    # CEP-G on the 2-wide one-hot: theory gamma = gamma_cep / sqrt(2) = 0.7, where Lemma 2's isotropic form is far off.
    metrics = bridge.run(0, model="linear", cep="gaussian", gamma=0.7 * math.sqrt(2), steps=600, batch_size=2000,
                         **TINY)
    assert metrics["gamma_theory"] == pytest.approx(0.7)
    assert metrics["w_error_exact"] < 0.05
    assert metrics["w_error_paper"] > 4 * metrics["w_error_exact"]
    assert metrics["closer_to_exact"] > 0


def test_sampler_with_the_closed_form_weights_generates_the_theory_law():
    """The discrete schedule maps to the theory's OU time -log(alpha_bar)/2; DPM-Solver++ then integrates the
    probability-flow ODE to the T -> inf law N(m, S) of Lemmas 3/4 (exact optimum, gamma 0.5)."""
    config = bridge.check_kwargs(dict(model="linear", d=4, n_k=100, samples_per_class=4000))
    data = bridge.make_data(config, 0)
    diffusion = GaussianDiffusion(make_betas("linear", config["diffusion_steps"]))
    model = bridge.build_model(config)
    target = learned_target(*class_stats(data["train"], data["labels"], 4), 0.5, "exact")
    times = (-0.5 * torch.log(diffusion.alphas_cumprod)).numpy()
    with torch.no_grad():
        for step, t in enumerate(times):
            weight, bias = linear_denoiser(target, t)
            model.weight[:, step, :, :4] = torch.from_numpy(weight)
            model.weight[:, step, :, 4:] = torch.from_numpy(bias).transpose(0, 1)[None].expand(4, -1, -1)
    samples = bridge.generate(model, diffusion, config, 0, progress=False)
    means, covs = empirical_stats(samples)
    np.testing.assert_allclose(means, target.mean, atol=0.08)
    np.testing.assert_allclose(entropy(covs), entropy(target.cov), atol=0.06)


def test_run_is_deterministic_given_the_seed():
    kwargs = dict(model="mlp", cep="uniform", gamma=1.0, eta=0.1, steps=30, **TINY)
    first, second = bridge.run(3, **kwargs), bridge.run(3, **kwargs)
    assert first == second
    assert bridge.run(4, **kwargs) != first


def test_metrics_are_sane_on_a_tiny_case():
    metrics = bridge.run(1, model="linear", cep="uniform", gamma=1.0, steps=600, **TINY)
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["gamma_cep_matched"] == pytest.approx(1 / math.sqrt(3 * 2))  # U(-1,1) std 1/sqrt3, one-hot d_c=2
    assert metrics["noise_ratio_start"] == pytest.approx(metrics["noise_ratio_end"])  # a fixed one-hot table
    assert 0.5 < metrics["nn_ratio"] < 1.5 and metrics["nn_train"] > 0
    assert metrics["w2_class"] >= 0 and metrics["var_parallel"] > 0 and metrics["var_perpendicular"] > 0
    assert metrics["theory_entropy_paper"] > metrics["theory_entropy_exact"]  # isotropic > rank-one inflation
    assert metrics["closer_to_bridge"] == pytest.approx(0, abs=1e-9)  # no flips: the labelled set is the clean one
    clean = bridge.run(1, model="linear", steps=600, **TINY)
    assert clean["gamma_theory"] == 0
    assert clean["closer_to_exact"] == pytest.approx(0, abs=1e-9)  # the two versions coincide at gamma 0
    assert metrics["var_parallel"] - clean["var_parallel"] > 0.1  # CEP inflates along mu (theory: +0.57)


def test_label_flips_use_the_eta_to_gamma_bridge():
    metrics = bridge.run(2, model="linear", eta=0.2, steps=50, **{**TINY, "num_classes": 4})
    assert metrics["gamma_theory"] == pytest.approx(effective_gamma(0.2, 4))
    assert effective_gamma(0.0, 4) == 0 and effective_gamma(0.75, 4) == math.inf


@pytest.mark.parametrize("kwargs, name", [
    (dict(colour="red"), "colour"), (dict(model="cnn"), "model"), (dict(cep="laplace", gamma=1.0), "cep"),
    (dict(gamma=-1.0, cep="uniform"), "gamma"), (dict(gamma=0.5), "gamma"), (dict(eta=1.0), "eta"),
    (dict(n_k=8, d=8), "n_k"), (dict(num_classes=5, d=2), "num_classes"), (dict(d=0), "d"),
    (dict(sample_steps=200), "sample_steps"), (dict(steps=1.5), "steps"), (dict(lr=0.0), "lr"),
    (dict(sampler="euler"), "sampler"), (dict(mu_norm=0.0), "mu_norm"), (dict(ot_samples=10**6), "ot_samples"),
])
def test_bad_kwargs_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        bridge.check_kwargs(kwargs)  # up front, before any training
    with pytest.raises(ValueError, match=name):
        bridge.run(0, **kwargs)


def test_bad_seed_is_named():
    with pytest.raises(ValueError, match="seed"):
        bridge.run(-1)
