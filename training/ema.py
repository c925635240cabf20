"""Exponential moving average of model weights (DiT `update_ema`, with LDM's LitEma warm-up as an option)."""
import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Shadow copy of a model; `update` moves it toward the model's current weights."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay!r}")
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))

    def current_decay(self) -> float:
        # LitEma warm-up: early on the average would be dominated by the random init, so ramp the decay up.
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        ema_params = list(self.model.parameters())
        params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
        self.num_updates += 1
