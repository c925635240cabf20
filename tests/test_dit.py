"""DiT: shapes, adaLN-Zero, CEP on the class embedding, paper 2 conditioning paths, positional embeddings."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models import build_model
from models.dit import DiT, get_2d_sincos_pos_embed

TINY = {"arch": "dit", "preset": "DiT-micro/2"}


def tiny(**overrides):
    torch.manual_seed(0)
    return build_model({**TINY, **overrides})


def randomize(model):
    """Move every parameter off its (partly zero) init so all paths influence the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(batch=3):
    torch.manual_seed(2)
    return torch.randn(batch, 1, 8, 8), torch.tensor([0, 400, 999][:batch]), torch.tensor([0, 3, 10][:batch])


@pytest.mark.parametrize("preset", ["DiT-micro/2", "DiT-tiny/2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_presets_shapes_and_dtypes(preset, dtype):
    model = build_model({"arch": "dit", "preset": preset}).to(dtype)
    x, t, y = inputs()
    out = model(x.to(dtype), t, y=y)
    assert out.shape == x.shape and out.dtype == dtype
    learn_sigma = build_model({"arch": "dit", "preset": preset, "learn_sigma": True})
    assert learn_sigma(x, t, y=y).shape == (3, 2, 8, 8)


def test_zero_init_output_is_zero_for_every_conditioning_path():
    x, t, y = inputs()
    for overrides in ({}, {"cond_mode": "cross-attention", "control_dim": 5},
                      {"cond_mode": "cross-attention", "context_dim": 12, "num_classes": 0}):
        model = tiny(**overrides)
        kwargs = {"y": y}
        if overrides.get("control_dim"):
            kwargs["control"] = torch.rand(3, 5)
        if overrides.get("context_dim"):
            kwargs = {"context": torch.randn(3, 7, 12)}
        assert model(x, t, **kwargs).abs().max() == 0


def test_cep_changes_the_class_embedding_only_in_training_and_by_the_documented_scale():
    gamma, hidden = 2.0, 64
    model = randomize(tiny(cep_mode="uniform", cep_gamma=gamma, class_dropout_prob=0.0))
    seen = []
    model.blocks[0].adaLN_modulation.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    x, t, y = inputs()
    clean_c = model.t_embedder(t) + model.y_embedder(y)
    model.eval()
    eval_out = model(x, t, y=y)
    torch.testing.assert_close(seen[-1], clean_c)                 # eval: condition untouched
    torch.testing.assert_close(model(x, t, y=y), eval_out)
    model.train()
    torch.manual_seed(5)
    train_out = model(x, t, y=y)
    delta = seen[-1] - clean_c                                     # CEP-U: |delta| <= gamma / sqrt(d)
    assert delta.abs().max() <= gamma / math.sqrt(hidden) + 1e-6
    assert delta.abs().max() > 0.8 * gamma / math.sqrt(hidden)
    assert abs(float(delta.pow(2).sum(1).mean()) - gamma**2 / 3) < 0.35   # E||delta||^2 = gamma^2/3 for uniform
    assert not torch.allclose(train_out, eval_out)
    torch.manual_seed(5)
    torch.testing.assert_close(model(x, t, y=y), train_out)        # reproducible from torch's global seed


def test_cep_in_cross_attention_mode_perturbs_the_class_token_identically_in_every_layer():
    model = randomize(tiny(cond_mode="cross-attention", cep_mode="gaussian", cep_gamma=1.0, class_dropout_prob=0.0))
    x, t, y = inputs()
    model.train()
    torch.manual_seed(7)
    out = model(x, t, y=y)
    # Same forward by hand: perturb the token once with the drawn seed, then plain attention in every block.
    torch.manual_seed(7)
    seed = model.cep.draw_seed()
    from models.cep import perturb
    token = perturb(model.y_embedder(y)[:, None], 1.0, "gaussian", seed, 0)
    model.cep.gamma = 0.0
    torch.testing.assert_close(model(x, t, context=token), out)


def test_semantic_and_control_paths_influence_the_output():
    model = randomize(tiny(cond_mode="cross-attention", control_dim=5, class_dropout_prob=0.0)).eval()
    x, t, y = inputs()
    control = torch.tensor([[0.0, 0.0, 8.0, 8.0, 0.0]] * 3)
    base = model(x, t, y=y, control=control)
    assert not torch.allclose(base, model(x, t, y=(y + 1) % 10, control=control))
    flipped = control.clone()
    flipped[:, 4] = 1.0
    changed = (model(x, t, y=y, control=flipped) - base).flatten(1).abs().max(1).values
    # The control weight w(t) is 1 at t = 0 and exactly 0 at t = T-1: no control influence at pure noise.
    assert changed[0] > 1e-4 and changed[2] == 0


def test_pos_embed_interpolation_and_extrapolation():
    base = get_2d_sincos_pos_embed(64, 4)
    torch.testing.assert_close(get_2d_sincos_pos_embed(64, 4, base_grid_size=4), base)
    interpolated = get_2d_sincos_pos_embed(64, 8, base_grid_size=4)
    extrapolated = get_2d_sincos_pos_embed(64, 8)
    # Interpolation: every other position of the 8x8 grid is a training-grid position.
    torch.testing.assert_close(interpolated.view(8, 8, 64)[::2, ::2].reshape(16, 64), base)
    # Extrapolation: the top-left 4x4 corner is the training grid, the rest lies outside its range.
    torch.testing.assert_close(extrapolated.view(8, 8, 64)[:4, :4].reshape(16, 64), base)
    # A model pre-trained on 8x8 inputs, resumed at 16x16 with positions rescaled to the 8x8 range.
    small = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10,
                learn_sigma=False)
    large = DiT(input_size=16, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10,
                learn_sigma=False, pos_embed_base_size=8)
    torch.testing.assert_close(large.pos_embed[0].view(8, 8, 32)[::2, ::2].reshape(16, 32), small.pos_embed[0])
    large.load_state_dict(small.state_dict())                       # positions are not stored in checkpoints


@pytest.mark.parametrize("call,name", [
    (lambda: tiny()(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])), "y"),
    (lambda: tiny()(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), y=torch.tensor([1, 11])), "y"),
    (lambda: tiny()(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), y=torch.tensor([1, 2])), "x"),
    (lambda: tiny()(torch.randn(2, 1, 8, 8), torch.tensor([1]), y=torch.tensor([1, 2])), "t"),
    (lambda: tiny()(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), context=torch.randn(2, 3, 64)), "context"),
    (lambda: tiny()(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), y=torch.tensor([1, 2]),
                    control=torch.rand(2, 5)), "control"),
    (lambda: tiny(control_dim=5)(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), y=torch.tensor([1, 2]),
                                 control=torch.rand(2, 4)), "control"),
    (lambda: tiny(cond_mode="film"), "cond_mode"),
    (lambda: tiny(cep_mode="laplace"), "mode"),
    (lambda: tiny(cep_gamma=-1.0), "gamma"),
    (lambda: tiny(patch_size=3), "patch_size"),
    (lambda: tiny(num_heads=3), "num_heads"),
    (lambda: tiny(class_dropout_prob=1.0), "class_dropout_prob"),
    (lambda: tiny(hidden_sz=3), "hidden_sz"),
    (lambda: build_model({"arch": "dit", "preset": "DiT-XXL/2"}), "preset"),
    (lambda: build_model({"arch": "vit", "preset": "DiT-S/2"}), "arch"),
])
def test_bad_arguments_name_themselves(call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call()


def test_gradients_reach_every_parameter():
    model = randomize(tiny(cond_mode="cross-attention", control_dim=5, cep_mode="uniform", cep_gamma=1.0))
    x, t, y = inputs()
    model(x, t, y=y, control=torch.rand(3, 5)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert missing == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_attention_path_trains_under_autocast(dtype):
    """Under autocast q is half precision while the condition tokens and K/V weights stay fp32."""
    model = randomize(tiny(cond_mode="cross-attention", control_dim=5, cep_mode="uniform", cep_gamma=1.0))
    x, t, y = inputs()
    with torch.autocast("cpu", dtype=dtype):
        out = model(x, t, y=y, control=torch.rand(3, 5))
    out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@settings(max_examples=15, deadline=None)
@given(patch=st.sampled_from([1, 2, 4]), grid=st.integers(1, 4), heads=st.integers(1, 3),
       head_dim=st.sampled_from([4, 8]), depth=st.integers(1, 2), cross=st.booleans(), learn_sigma=st.booleans(),
       batch=st.integers(1, 3))
def test_random_configs_give_the_documented_shapes(patch, grid, heads, head_dim, depth, cross, learn_sigma, batch):
    model = DiT(input_size=patch * grid, patch_size=patch, in_channels=2, hidden_size=heads * head_dim, depth=depth,
                num_heads=heads, num_classes=3, learn_sigma=learn_sigma,
                cond_mode="cross-attention" if cross else "adaln", control_dim=2)
    x = torch.randn(batch, 2, patch * grid, patch * grid)
    out = model(x, torch.randint(0, 1000, (batch,)), y=torch.randint(0, 4, (batch,)), control=torch.rand(batch, 2))
    assert out.shape == (batch, 4 if learn_sigma else 2, patch * grid, patch * grid)
