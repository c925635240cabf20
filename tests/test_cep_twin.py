"""The pure-PyTorch twins of models/cep.py (the test oracles for the C++/CUDA kernels) and the CEP module."""
import math

import pytest
import torch

from models import cep


def test_philox_matches_random123_known_answer():
    # Random123 kat_vectors: philox4x32_10, counter 0, key 0.
    words = cep.philox_uniform_bits(seed=0, first_block=0, num_blocks=1)[0].tolist()
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("mode", cep.MODES)
def test_offset_selects_a_window_of_one_stream(mode):
    full = cep.philox_noise(64, mode, seed=11, offset=0)
    for offset in (1, 2, 3, 5, 17):
        torch.testing.assert_close(cep.philox_noise(20, mode, seed=11, offset=offset), full[offset:offset + 20],
                                   rtol=0, atol=0)


def test_uniform_values_are_odd_multiples_of_2_pow_minus_24():
    noise = cep.philox_noise(4096, "uniform", seed=3, offset=0).double() * 2**24
    assert torch.equal(noise, noise.round()) and bool((noise.remainder(2) == 1).all())
    assert noise.abs().max() < 2**24


def test_perturb_reference_scale_and_gradient():
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    out = cep.perturb_reference(x, gamma=2.0, mode="uniform", seed=5)
    delta = (out - x).detach()
    assert delta.abs().max() <= 2.0 / math.sqrt(16) and delta.abs().max() > 0.3
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_cross_attention_reference_matches_fp64_math():
    torch.manual_seed(0)
    b, h, n, m, dh, c = 2, 3, 5, 7, 4, 6
    q = torch.randn(b, h, n, dh, dtype=torch.float64)
    context = torch.randn(b, m, c, dtype=torch.float64)
    w_k, w_v = torch.randn(h * dh, c, dtype=torch.float64), torch.randn(h * dh, c, dtype=torch.float64)
    key_mask = torch.rand(b, m) > 0.3
    key_mask[1] = False  # a fully masked batch element -> defined output 0
    out = cep.cross_attention_reference(q, context, w_k, w_v, key_mask, gamma=1.0, seed=9)
    noisy = cep.perturb_reference(context, 1.0, "uniform", 9)
    k = (noisy @ w_k.T).view(b, m, h, dh).transpose(1, 2)
    v = (noisy @ w_v.T).view(b, m, h, dh).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(dh)).masked_fill(~key_mask[:, None, None, :], -math.inf)
    expected = torch.softmax(scores[0], dim=-1) @ v[0]
    torch.testing.assert_close(out[0], expected)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_cep_module_is_training_only_and_seeded_by_torch():
    module = cep.CEP("gaussian", gamma=1.0)
    x = torch.randn(8, 32)
    torch.manual_seed(1)
    first = module(x)
    torch.manual_seed(1)
    assert torch.equal(module(x), first) and not torch.equal(first, x)
    assert not torch.equal(module(x), first)  # a fresh seed each call
    module.eval()
    assert module(x) is x and module.draw_seed() is None and not module.active
    assert cep.CEP("none", gamma=1.0)(x) is x and cep.CEP("uniform", gamma=0.0)(x) is x


@pytest.mark.parametrize("kwargs, error, word", [
    (dict(mode="laplace"), ValueError, "mode"),
    (dict(mode=3), TypeError, "mode"),
    (dict(gamma=-1.0), ValueError, "gamma"),
    (dict(gamma=float("nan")), ValueError, "gamma"),
    (dict(gamma="1"), TypeError, "gamma"),
    (dict(dim=0), ValueError, "dim"),
])
def test_cep_module_rejects_bad_arguments(kwargs, error, word):
    with pytest.raises(error, match=word):
        cep.CEP(**kwargs)
