"""Condition encoders: class embedder, control metadata (paper 2), and the one place CEP touches a condition.

Text encoding (tokenizer + from-scratch transformer) lives in models/text_encoder.py.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.cep import CEP, cross_attention, perturb


#################################################################################
#                        CEP on a condition-encoder output                      #
#################################################################################

class Condition(NamedTuple):
    """A condition-encoder output c_theta(y) plus the CEP draw (paper 1 Eq. 8) every consumer must apply identically.

    The adaLN path reads `perturbed()`; cross-attention layers call `attend()`, which hands the same
    (gamma, mode, seed, offset 0) to the fused cep::cross_attention op, so every layer sees the same c + delta
    without materialising it.
    """
    embedding: torch.Tensor          # clean encoder output, [B, D] or [B, M, C]
    mask: torch.Tensor | None        # bool [B, M] (True = attend) for token conditions
    gamma: float                     # 0 when CEP is inactive (eval mode, mode "none" or gamma 0)
    mode: str
    seed: int
    dim: int | None                  # d in gamma / sqrt(d); None = last dimension

    def perturbed(self) -> torch.Tensor:
        if self.gamma == 0:
            return self.embedding
        return perturb(self.embedding, self.gamma, self.mode, self.seed, 0, self.dim)

    def attend(self, q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor) -> torch.Tensor:
        """softmax(q K^T / sqrt(Dh)) V with K, V from the perturbed tokens: q [B, H, N, Dh] -> [B, H, N, Dh]."""
        mode = self.mode if self.gamma > 0 else "uniform"
        return cross_attention(q, self.embedding, w_k, w_v, self.mask, self.gamma, mode, self.seed, 0, self.dim)


def apply_cep(cep: CEP, embedding: torch.Tensor, mask: torch.Tensor | None = None) -> Condition:
    """Attach a fresh CEP draw to an encoder output (one seed per forward pass, shared by all layers)."""
    seed = cep.draw_seed()
    if seed is None:
        return Condition(embedding, mask, 0.0, cep.mode, 0, cep.dim)
    cep.note(embedding, seed)
    return Condition(embedding, mask, cep.gamma, cep.mode, seed, cep.dim)


def semantic_condition(cep: CEP, class_embedder: "ClassEmbedder | None", y: torch.Tensor | None,
                       context: torch.Tensor | None, context_mask: torch.Tensor | None,
                       class_as_token: bool) -> Condition | None:
    """A denoiser's class label y or text context [B, M, C] as a Condition with this step's CEP draw.

    class_as_token gives the class embedding a token axis, [B, 1, D], for cross-attention (LDM's ClassEmbedder;
    paper 2's semantic path); else it stays [B, D] for adaLN (DiT). Models with num_classes = 0 and no context get None.
    """
    if context is not None:
        if y is not None:
            raise ValueError("pass either y or context, not both")
        return apply_cep(cep, context, context_mask)
    if class_embedder is None:
        if y is not None:
            raise ValueError("y given but the model has num_classes=0")
        return None
    if y is None:
        raise ValueError(f"y is required (class labels in [0, {class_embedder.num_classes}], "
                         f"{class_embedder.num_classes} = null)")
    embedding = class_embedder(y)                                         # [B, D]
    return apply_cep(cep, embedding[:, None] if class_as_token else embedding)


#################################################################################
#                                 Class labels                                  #
#################################################################################

class ClassEmbedder(nn.Module):
    """Class labels -> vectors; row `num_classes` is the null class used for classifier-free guidance.

    In training mode labels are replaced by the null class with probability dropout_prob (DiT's label dropout).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float = 0.1):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if not 0 <= dropout_prob < 1:
            raise ValueError(f"class_dropout_prob must lie in [0, 1), got {dropout_prob!r}")
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"y must be an integer tensor [B], got {getattr(labels, 'shape', labels)!r}")
        # Value check skipped where it cannot run (meta tensors) or would break a torch.compile graph.
        checkable = labels.device.type != "meta" and not torch.compiler.is_compiling()
        if checkable and bool(((labels < 0) | (labels > self.num_classes)).any()):
            raise ValueError(f"y must lie in [0, {self.num_classes}] ({self.num_classes} = null class)")
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)                           # [B, D]


#################################################################################
#                    Control metadata (paper 2, §2.1 and §3.3)                  #
#################################################################################

def fourier_features(values: torch.Tensor, num_frequencies: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of each scalar (as DiT's timestep embedding / SDXL micro-conditioning): [..., K] ->
    [..., K * num_frequencies]."""
    half = num_frequencies // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.float()[..., None] * freqs                          # [..., K, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).flatten(-2)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """ADM/DiT/LDM sinusoidal timestep embedding (cos half first), [B] -> [B, dim]."""
    return F.pad(fourier_features(t[:, None], dim), (0, dim % 2))


def control_weight(t: torch.Tensor, num_timesteps: int, alpha: float) -> torch.Tensor:
    """Noise-level weight of the control embedding: w(t) = cos(pi/2 * t/(T-1))^alpha, 1 at the clean end, 0 at pure
    noise, so control metadata cannot steer the semantics decided early in sampling (paper 2, Fig. 3).

    Paper 2's exact formula is not available (digest §2.3); this cosine ramp with shape alpha is the documented
    stand-in.
    """
    phase = (t.float() / (num_timesteps - 1)).clamp(0, 1)
    return torch.cos(0.5 * math.pi * phase).clamp(min=0) ** alpha


class ControlEmbedder(nn.Module):
    """Control metadata Float[B, K] (crop top, crop left, original h, original w, flip) -> noise-weighted vector.

    noise_weighted=False is paper 2's baseline for ablation (b): the embedding added plainly (w(t) = 1), as SDXL's
    micro-conditioning adds it to the class/time embedding.
    """

    def __init__(self, num_controls: int, hidden_size: int, frequency_size: int = 64, alpha: float = 1.0,
                 num_timesteps: int = 1000, noise_weighted: bool = True):
        super().__init__()
        if not isinstance(num_controls, int) or num_controls < 1:
            raise ValueError(f"control_dim must be an int >= 1, got {num_controls!r}")
        if not alpha > 0:
            raise ValueError(f"control_alpha must be > 0, got {alpha!r}")
        self.mlp = nn.Sequential(nn.Linear(num_controls * frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.num_controls, self.frequency_size = num_controls, frequency_size
        self.alpha, self.num_timesteps, self.noise_weighted = alpha, num_timesteps, noise_weighted

    def forward(self, control: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(control, torch.Tensor) or control.shape != (t.shape[0], self.num_controls):
            raise ValueError(f"control must be a float tensor [B, {self.num_controls}], "
                             f"got {getattr(control, 'shape', control)!r}")
        features = fourier_features(control, self.frequency_size).to(self.mlp[0].weight.dtype)
        embedding = self.mlp(features)                                                 # [B, D]
        if not self.noise_weighted:
            return embedding
        return control_weight(t, self.num_timesteps, self.alpha).to(embedding.dtype)[:, None] * embedding
