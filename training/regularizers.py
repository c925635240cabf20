"""Table 6 and 7 baselines of paper 1 that perturb the class embedding instead of CEP: dropout, label smoothing and
fixed CEP.

The paper does not say where they are applied (digest §3, "NOT FOUND"); here all act on the class-embedder output
c_theta(y), the same place CEP acts, through forward hooks so the models stay free of baseline-only options.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from models.cep import perturb
from models.conditioning import ClassEmbedder
from training.data import hash_seed



def class_embedders(model: nn.Module, option: str) -> list[ClassEmbedder]:
    """The model's class embedders, which the embedding regularizers hook; an error naming the option if none."""
    embedders = [m for m in model.modules() if isinstance(m, ClassEmbedder)]
    if not embedders:
        raise ValueError(f"{option}: needs a class-conditional model (no ClassEmbedder found)")
    return embedders

def attach_embedding_regularizers(model: nn.Module, dropout: float = 0.0, label_smoothing: float = 0.0) -> int:
    """Hooks every ClassEmbedder of `model`; returns how many were hooked (0 when both options are off)."""
    for name, value in (("cond_dropout", dropout), ("label_smoothing", label_smoothing)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if dropout == 0 and label_smoothing == 0:
        return 0
    embedders = class_embedders(model, "cond_dropout/label_smoothing")

    def regularize(module: ClassEmbedder, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        if label_smoothing > 0:
            # (1 - eps) e_y + eps * mean_k e_k over the real classes: the embedding of a smoothed one-hot label.
            # Rows dropped to the null (CFG) class are left alone.
            table = module.embedding_table.weight
            smoothed = (1 - label_smoothing) * output + label_smoothing * table[:module.num_classes].mean(0)
            output = torch.where(null_rows(module, output)[:, None], output, smoothed)
        return F.dropout(output, dropout, training=True) if dropout > 0 else output

    for embedder in embedders:
        embedder.register_forward_hook(regularize)
    return len(embedders)


def null_rows(module: ClassEmbedder, output: torch.Tensor) -> torch.Tensor:
    """Bool[B]: rows the embedder's label dropout replaced by the null (CFG) class, recognised by their exact table
    row (a forward hook sees the labels from before the dropout)."""
    return (output == module.embedding_table.weight[module.num_classes]).all(-1)


class FixedCEP:
    """Table 7's fixed CEP-U of paper 1: "a subset of samples is chosen once and their perturbation is fixed for the
    whole of training". The paper does not give the subset size: `fraction` of the training items (a seeded subset,
    drawn once) each get one draw delta_i of Eq. 8's noise, regenerated every step from Philox key `seed` at counter
    offset i * D (so it never changes and costs no memory); the other items and rows dropped to the null (CFG) class
    get no noise. The model's own per-step CEP must be off (training.train builds it with cep_mode "none")."""

    def __init__(self, num_items: int, fraction: float, gamma: float, mode: str, seed: int, dim: int | None = None):
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"cep_fixed_fraction must be in (0, 1], got {fraction!r}")
        if mode not in ("uniform", "gaussian") or not gamma > 0:
            raise ValueError(f"cep_fixed_fraction needs --cep uniform|gaussian and --cep-gamma > 0, got {mode!r}, "
                             f"{gamma!r}")
        generator = torch.Generator().manual_seed(hash_seed(seed, 0xF1CE))
        chosen = torch.randperm(num_items, generator=generator)[:round(fraction * num_items)]
        self.fixed = torch.zeros(num_items, dtype=torch.bool)
        self.fixed[chosen] = True
        self.gamma, self.mode, self.key, self.dim = float(gamma), mode, hash_seed(seed, 0xCE9), dim
        self.indices = None                   # data-set indices of the current micro-batch, set by batch()

    @contextlib.contextmanager
    def batch(self, indices: torch.Tensor):
        """Within this block the hooked embedder's rows belong to these data-set indices (Long[B])."""
        self.indices = indices.cpu()
        try:
            yield
        finally:
            self.indices = None

    def noise(self, index: int, width: int) -> torch.Tensor:
        """delta_i, Float[width]: the same numbers at every step."""
        return perturb(torch.zeros(width), self.gamma, self.mode, self.key, index * width, self.dim or width)

    def attach(self, model: nn.Module) -> None:
        embedders = class_embedders(model, "cep_fixed_fraction")

        def add_fixed_noise(module: ClassEmbedder, inputs, output: torch.Tensor) -> torch.Tensor:
            if not module.training:
                return output
            if self.indices is None or len(self.indices) != output.shape[0]:
                raise RuntimeError("FixedCEP: run the training forward inside `with fixed_cep.batch(indices)`")
            rows = torch.nonzero(self.fixed[self.indices] & ~null_rows(module, output).cpu()).flatten().tolist()
            if not rows:
                return output
            delta = torch.zeros(output.shape, dtype=torch.float32)
            for row in rows:
                delta[row] = self.noise(int(self.indices[row]), output.shape[-1])
            return output + delta.to(output.device, output.dtype)

        for embedder in embedders:
            embedder.register_forward_hook(add_fixed_noise)
