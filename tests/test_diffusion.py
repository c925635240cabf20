"""Schedules, forward process, eps loss, input perturbation and the resolution shift."""
import math

import pytest
import torch

from models.diffusion import GaussianDiffusion, make_betas


def test_schedules_match_their_definitions():
    linear = make_betas("linear", 1000)
    assert linear.dtype == torch.float64 and linear.shape == (1000,)
    assert math.isclose(linear[0], 1e-4) and math.isclose(linear[-1], 0.02)
    ldm = make_betas("ldm-linear", 1000)
    assert math.isclose(ldm[0], 0.0015) and math.isclose(ldm[-1], 0.0195)
    assert math.isclose(ldm[500].sqrt(), (0.0015**0.5 + 500 / 999 * (0.0195**0.5 - 0.0015**0.5)), rel_tol=1e-12)
    cosine = make_betas("cosine", 1000)
    alpha_bar = torch.cumprod(1 - cosine, 0)
    expected = math.cos((500 / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    assert math.isclose(alpha_bar[499], expected, rel_tol=1e-9)
    # The DiT linear schedule keeps its alpha_bar curve when respaced to fewer steps.
    short = torch.cumprod(1 - make_betas("linear", 250), 0)
    assert abs(float(short[-1]) - float(torch.cumprod(1 - linear, 0)[-1])) < 1e-4


def test_q_sample_and_loss_are_the_eps_mse():
    diffusion = GaussianDiffusion(make_betas("ldm-linear", 100))
    x0, noise = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    t = torch.tensor([0, 10, 50, 99])
    a = diffusion.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise)

    seen = {}

    def model(x_t, t_in, scale):
        seen["x_t"], seen["t"] = x_t, t_in
        return scale * x_t

    loss = diffusion.training_losses(model, x0, {"scale": 0.5}, t=t, noise=noise)
    x_t = diffusion.q_sample(x0, t, noise)
    torch.testing.assert_close(seen["x_t"], x_t)
    torch.testing.assert_close(loss, (0.5 * x_t - noise).pow(2).flatten(1).mean(1))
    assert loss.shape == (4,)


def test_input_perturbation_changes_input_not_target():
    diffusion = GaussianDiffusion(make_betas("linear", 50))
    x0, noise, t = torch.randn(8, 4), torch.randn(8, 4), torch.randint(0, 50, (8,))
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    inputs = []
    capture = lambda x, t: inputs.append(x) or torch.zeros_like(x)  # noqa: E731
    clean = diffusion.training_losses(zero, x0, {}, t=t, noise=noise, input_perturbation=0.1)
    torch.testing.assert_close(clean, noise.pow(2).mean(1))          # target is still eps
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    diffusion.training_losses(capture, x0, {}, t=t, noise=noise, input_perturbation=0.1, generator=g1)
    diffusion.training_losses(capture, x0, {}, t=t, noise=noise, generator=g2)
    xi = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    a = diffusion.alphas_cumprod[t].float()[:, None]
    torch.testing.assert_close(inputs[0] - inputs[1], (1 - a).sqrt() * 0.1 * xi)


def test_training_losses_is_seeded_by_generator():
    diffusion = GaussianDiffusion(make_betas("cosine", 100))
    model = lambda x, t: x * t.float().view(-1, 1) / 100  # noqa: E731
    x0 = torch.randn(16, 3)
    a = diffusion.training_losses(model, x0, {}, generator=torch.Generator().manual_seed(3))
    b = diffusion.training_losses(model, x0, {}, generator=torch.Generator().manual_seed(3))
    c = diffusion.training_losses(model, x0, {}, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_learn_sigma_adds_the_variational_bound_for_the_variance_only():
    diffusion = GaussianDiffusion(make_betas("linear", 100))
    x0, noise = torch.rand(4, 2, 3, 3) * 2 - 1, torch.randn(4, 2, 3, 3)
    t = torch.tensor([1, 10, 50, 99])
    eps_error = 0.1 * torch.randn(4, 2, 3, 3)

    def model_with(v_value, eps_param):
        return lambda x_t, t_in: torch.cat([noise + eps_param, torch.full_like(x_t, v_value)], dim=1)

    # Exact eps and v = -1 (the true posterior variance beta_tilde): the KL term vanishes for t > 0.
    exact = diffusion.training_losses(model_with(-1.0, 0.0), x0, {}, t=t, noise=noise)
    torch.testing.assert_close(exact, torch.zeros(4), atol=1e-5, rtol=0)
    # v = +1 (variance beta_t): positive KL where beta_t and beta_tilde_t differ (small t; they agree at large t).
    wrong_variance = diffusion.training_losses(model_with(1.0, 0.0), x0, {}, t=t, noise=noise)
    assert bool((wrong_variance[:2] > 1e-3).all() and (wrong_variance >= 0).all())
    # An eps error adds its MSE plus a mean-mismatch KL.
    eps_param = eps_error.clone().requires_grad_()
    loss = diffusion.training_losses(model_with(-1.0, eps_param), x0, {}, t=t, noise=noise)
    assert bool((loss > eps_error.pow(2).flatten(1).mean(1)).all())
    loss.sum().backward()
    # The bound does not train the eps half (stop-gradient): its gradient is that of the MSE alone.
    torch.testing.assert_close(eps_param.grad, 2 * eps_error / 18)
    # t = 0 uses the discretised decoder likelihood: positive, finite.
    first = diffusion.training_losses(model_with(-1.0, 0.0), x0, {}, t=torch.zeros(4, dtype=torch.long), noise=noise)
    assert bool(torch.isfinite(first).all() and (first > 0).all())


def test_shift_schedule_divides_snr_by_ratio_squared():
    base = GaussianDiffusion(make_betas("linear", 1000))
    shifted = base.shift_schedule(2.0)
    snr = lambda d: d.alphas_cumprod / (1 - d.alphas_cumprod)  # noqa: E731
    torch.testing.assert_close(snr(shifted), snr(base) / 4, rtol=1e-9, atol=0)
    assert bool((shifted.alphas_cumprod < base.alphas_cumprod).all())  # more time at high noise
    torch.testing.assert_close(base.shift_schedule(1.0).betas, base.betas, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("call,name", [
    (lambda: make_betas("quadratic"), "schedule"),
    (lambda: make_betas("linear", 1), "num_steps"),
    (lambda: GaussianDiffusion(torch.tensor([0.5, 1.5])), "betas"),
    (lambda: GaussianDiffusion(make_betas("linear", 10)).shift_schedule(0.0), "resolution_ratio"),
    (lambda: GaussianDiffusion(make_betas("linear", 10)).q_sample(torch.zeros(2, 3), torch.tensor([0, 10]),
                                                                  torch.zeros(2, 3)), "t"),
    (lambda: GaussianDiffusion(make_betas("linear", 10)).q_sample(torch.zeros(2, 3), torch.tensor([0, 1]),
                                                                  torch.zeros(2, 4)), "noise"),
    (lambda: GaussianDiffusion(make_betas("linear", 10)).training_losses(
        lambda x, t: x, torch.zeros(2, 3), {}, input_perturbation=-1.0), "input_perturbation"),
    (lambda: GaussianDiffusion(make_betas("linear", 10)).training_losses(
        lambda x, t: x[:, :2], torch.zeros(2, 3), {}), "model output"),
])
def test_bad_arguments_name_themselves(call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call()
