"""Table 6 baselines of paper 1 that perturb the class embedding instead of CEP: dropout and label smoothing.

The paper does not say where they are applied (digest §3, "NOT FOUND"); here both act on the class-embedder output
c_theta(y), the same place CEP acts, through a forward hook so the models stay free of baseline-only options.
"""
import torch
import torch.nn.functional as F
from torch import nn

from models.conditioning import ClassEmbedder


def attach_embedding_regularizers(model: nn.Module, dropout: float = 0.0, label_smoothing: float = 0.0) -> int:
    """Hooks every ClassEmbedder of `model`; returns how many were hooked (0 when both options are off)."""
    for name, value in (("cond_dropout", dropout), ("label_smoothing", label_smoothing)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if dropout == 0 and label_smoothing == 0:
        return 0
    embedders = [m for m in model.modules() if isinstance(m, ClassEmbedder)]
    if not embedders:
        raise ValueError("cond_dropout/label_smoothing need a class-conditional model (no ClassEmbedder found)")

    def regularize(module: ClassEmbedder, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        if label_smoothing > 0:
            # (1 - eps) e_y + eps * mean_k e_k over the real classes: the embedding of a smoothed one-hot label.
            # Rows dropped to the null (CFG) class are left alone; they are recognised by their exact table row.
            table = module.embedding_table.weight
            is_null = (output == table[module.num_classes]).all(-1, keepdim=True)
            smoothed = (1 - label_smoothing) * output + label_smoothing * table[:module.num_classes].mean(0)
            output = torch.where(is_null, output, smoothed)
        return F.dropout(output, dropout, training=True) if dropout > 0 else output

    for embedder in embedders:
        embedder.register_forward_hook(regularize)
    return len(embedders)
