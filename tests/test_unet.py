"""LDM U-Net: shapes, zero init, CEP on the cross-attention context, text context with masks, bad arguments."""
import math

import pytest
import torch

from models import build_model
from models.cep import perturb
from test_dit import inputs, randomize  # shared helpers (pytest puts tests/ on sys.path)


def tiny(preset="UNet-micro", **overrides):
    torch.manual_seed(0)
    return build_model({"arch": "unet", "preset": preset, **overrides})


@pytest.mark.parametrize("preset", ["UNet-micro", "UNet-tiny"])
def test_tiny_presets_shapes_dtypes_and_zero_init(preset):
    model = tiny(preset)
    x, t, y = inputs()
    out = model(x, t, y=y)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.abs().max() == 0                                  # zero-initialised output conv
    out64 = model.double()(x.double(), t, y=y)
    assert out64.dtype == torch.float64


def test_cep_perturbs_the_class_token_only_in_training():
    model = randomize(tiny(cep_mode="uniform", cep_gamma=1.0, class_dropout_prob=0.0))
    x, t, y = inputs()
    model.eval()
    eval_out = model(x, t, y=y)
    model.train()
    torch.manual_seed(3)
    train_out = model(x, t, y=y)
    assert not torch.allclose(train_out, eval_out)
    # The same forward by hand: perturb the class token once (d = context_dim), then attend without CEP.
    torch.manual_seed(3)
    seed = model.cep.draw_seed()
    token = model.label_embedder(y)[:, None]
    perturbed = perturb(token, 1.0, "uniform", seed, 0)
    assert (perturbed - token).abs().max() <= 1 / math.sqrt(32) + 1e-6
    model.cep.gamma = 0.0
    torch.testing.assert_close(model(x, t, context=perturbed), train_out)


def test_text_context_mask_hides_padding_tokens():
    model = randomize(tiny(num_classes=0, context_dim=16)).eval()
    x, t, _ = inputs()
    context = torch.randn(3, 5, 16)
    mask = torch.tensor([[True, True, False, False, False]] * 3)
    out = model(x, t, context=context, context_mask=mask)
    changed = context.clone()
    changed[:, 2:] = torch.randn(3, 3, 16)                        # masked tokens do not matter
    torch.testing.assert_close(model(x, t, context=changed, context_mask=mask), out)
    changed[:, 0] += 1.0                                          # attended tokens do
    assert not torch.allclose(model(x, t, context=changed, context_mask=mask), out)


def test_control_path_is_noise_weighted():
    model = randomize(tiny(control_dim=5, class_dropout_prob=0.0)).eval()
    x, t, y = inputs()
    control = torch.tensor([[0.0, 0.0, 8.0, 8.0, 0.0]] * 3)
    flipped = control.clone()
    flipped[:, 4] = 1.0
    changed = (model(x, t, y=y, control=control) - model(x, t, y=y, control=flipped)).flatten(1).abs().max(1).values
    assert changed[0] > 1e-5 and changed[2] == 0


def test_gradients_reach_every_parameter():
    model = randomize(tiny("UNet-tiny", cep_mode="gaussian", cep_gamma=1.0, control_dim=5))
    x, t, y = inputs()
    model(x, t, y=y, control=torch.rand(3, 5)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert missing == []


@pytest.mark.parametrize("call,name", [
    (lambda: tiny()(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])), "y"),
    (lambda: tiny()(torch.randn(2, 2, 8, 8), torch.tensor([1, 2]), y=torch.tensor([1, 2])), "x"),
    (lambda: tiny()(torch.randn(2, 1, 8, 8), torch.tensor([1, 2, 3]), y=torch.tensor([1, 2])), "t"),
    (lambda: tiny()(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), y=torch.tensor([1, 2]),
                    context=torch.randn(2, 1, 32)), "context"),
    (lambda: tiny()(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), context=torch.randn(2, 1, 31)), "w_k"),
    (lambda: tiny(model_channels=48), "model_channels"),
    (lambda: tiny(channel_mult=(1, 2, 2, 2, 2)), "image_size"),
    (lambda: tiny(num_heads=3), "num_heads"),
    (lambda: tiny(cep_mode="cauchy"), "mode"),
    (lambda: tiny(attention_res=(1,)), "attention_res"),
])
def test_bad_arguments_name_themselves(call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call()
