"""Attention layers shared by DiT and the LDM U-Net, and their block runner (gradient checkpointing)."""
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch import nn

from models.conditioning import Condition


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens with a fused qkv projection (DiT: with bias; LDM: without)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} must be divisible by num_heads {num_heads}")
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.num_heads = num_heads

    def forward(self, x):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)                    # (N, H, T, Dh)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class CrossAttention(nn.Module):
    """Attention from tokens to (CEP-perturbed) condition tokens. The K/V projections and the perturbation run inside
    the fused cep::cross_attention op, which takes the to_k / to_v weights [H*Dh, C] directly (hence no K/V bias)."""

    def __init__(self, query_dim: int, context_dim: int, num_heads: int, head_dim: int, q_bias: bool = False):
        super().__init__()
        inner = num_heads * head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=q_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim)
        self.num_heads = num_heads

    def forward(self, x, condition: Condition):
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.num_heads)
        out = condition.attend(q, self.to_k.weight, self.to_v.weight)    # (N, H, T, Dh)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


def run_block(block: nn.Module, *args, checkpointed: bool = False):
    """block(*args), or with gradient checkpointing: activations recomputed in backward instead of stored
    (RNG state preserved, so dropout and CEP noise are redrawn identically)."""
    if checkpointed and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)
