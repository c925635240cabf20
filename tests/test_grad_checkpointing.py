"""Gradient checkpointing of DiT and U-Net blocks (--grad-checkpointing): the same loss and gradients, with CEP noise
and label dropout drawn inside the recomputed blocks."""
import pytest
import torch

from models import build_model


@pytest.mark.parametrize("config", [
    {"arch": "dit", "preset": "DiT-micro/2", "cep_mode": "uniform", "cep_gamma": 1.0},
    {"arch": "unet", "preset": "UNet-micro", "cep_mode": "uniform", "cep_gamma": 1.0, "dropout": 0.1},
])
def test_checkpointed_blocks_give_the_same_gradients(config):
    torch.manual_seed(0)
    model = build_model(config).train()
    with torch.no_grad():  # leave the zero initialisation (adaLN-Zero, zero output convs), which hides every block
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 200, 500, 999]), torch.tensor([0, 3, 5, 9])
    results = []
    for checkpointed in (False, True):
        model.gradient_checkpointing = checkpointed
        model.zero_grad()
        torch.manual_seed(1)  # CEP noise, label dropout and dropout draw from the global RNG
        loss = model(x, t, y=y).square().mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert loss > 0 and torch.equal(loss, loss_ckpt) and grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():  # inference ignores the flag
        assert model(x, t, y=y).shape == x.shape
