"""The two denoisers of the theory-to-network bridge, both eps-predictors eps_theta(x_t, t, y) conditioned through a
class embedding c(y) that the real CEP op perturbs while training (models.cep.CEP, paper 1 Eq. 8).

- LinearDenoiser: paper 1 §4's per-class linear model eps = W_{y,t} x_t + V_{y,t} c'(y), one (W, V) per class and
  timestep, with the fixed one-hot condition c(y) = e_y (the theory's condition). The table is fixed on purpose: with
  a learnable c the loss has no minimiser (scaling c up and V down removes the noise), see `bridge.py`.
- MLPDenoiser: a small conditional MLP with a learned class table initialised like DiT's (std 0.02), so CEP's
  gamma/sqrt(d) noise starts larger than the signal and the table may outgrow it.
"""
import math

import torch
from torch import nn

from models.cep import CEP, perturb


class LinearDenoiser(nn.Module):
    def __init__(self, num_classes: int, dim: int, num_steps: int, cep: CEP):
        super().__init__()
        self.num_steps = num_steps
        self.register_buffer("table", torch.eye(num_classes))  # c(y) = e_y
        # [W | V] per (class, timestep): eps = W x_t + V c'
        self.weight = nn.Parameter(torch.zeros(num_classes, num_steps, dim, dim + num_classes))
        self.cep = cep

    def condition(self, y: torch.Tensor) -> torch.Tensor:
        return self.table[y]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        features = torch.cat([x, self.cep(self.condition(y))], dim=-1)  # [B, d + K]
        weight = self.weight.flatten(0, 1)  # [K T, d, d + K]
        cell = y * self.num_steps + t
        cells, counts = torch.unique(cell, return_counts=True)
        if not bool((counts == counts[0]).all()):
            return torch.einsum("bij,bj->bi", weight[cell], features)
        # Equal-size cells (stratified training batches, sampling at one t): one small matmul per cell instead of a
        # per-sample gather of d x d matrices, whose backward scatter dominated the cost at d = 32.
        order = torch.argsort(cell, stable=True)
        grouped = features[order].view(len(cells), int(counts[0]), -1)
        out = torch.bmm(grouped, weight[cells].transpose(1, 2)).flatten(0, 1)
        return out[torch.argsort(order)]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal timestep features (DDPM/DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPDenoiser(nn.Module):
    def __init__(self, num_classes: int, dim: int, cep: CEP, width: int = 128, embed_dim: int = 32,
                 depth: int = 3):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, embed_dim)
        nn.init.normal_(self.embedding.weight, std=0.02)  # DiT's LabelEmbedder initialisation
        self.time_dim = embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        layers, width_in = [], dim + 2 * embed_dim
        for _ in range(depth):
            layers += [nn.Linear(width_in, width), nn.SiLU()]
            width_in = width
        self.net = nn.Sequential(*layers, nn.Linear(width, dim))
        self.cep = cep

    def condition(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding(y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.cep(self.condition(y))
        time = self.time_mlp(timestep_embedding(t, self.time_dim))
        return self.net(torch.cat([x, time, c], dim=-1))


@torch.no_grad()
def noise_to_signal(model: nn.Module, num_classes: int) -> float:
    """Mean over classes of |delta| / |c(y)| for one draw of the model's CEP noise, delta = perturb(c) - c (0 when
    CEP is off). A fixed Philox key keeps the training stream untouched and makes the trace comparable over steps.

    CEP's strength is relative to the embedding it perturbs (issue 10): this is the number to log beside a verdict.
    """
    cep = model.cep
    if cep.mode == "none" or cep.gamma == 0:
        return 0.0
    c = model.condition(torch.arange(num_classes, device=next(model.parameters()).device))
    delta = perturb(c, cep.gamma, cep.mode, seed=12345, dim=cep.dim) - c
    return float((delta.norm(dim=-1) / c.norm(dim=-1)).mean())
