"""DiT (Peebles & Xie 2023) with adaLN-Zero, CEP on the class embedding (paper 1) and paper 2's conditioning option:
semantic condition through cross-attention, control metadata on the adaLN path weighted by noise level.
"""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.attention import CrossAttention, SelfAttention, run_block
from models.cep import CEP
from models.conditioning import (ClassEmbedder, Condition, ControlEmbedder, semantic_condition,
                                 timestep_embedding)

COND_MODES = ("adaln", "cross-attention")


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding Layers for Timesteps and Patches                      #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vector representations."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class Mlp(nn.Module):
    """Transformer feed-forward: Linear -> GELU(tanh) -> Linear."""

    def __init__(self, hidden_size: int, mlp_hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden_size)
        self.fc2 = nn.Linear(mlp_hidden_size, hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning and, for paper 2's semantic path, a cross-attention layer."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, context_dim=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads)
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = CrossAttention(hidden_size, context_dim, num_heads, hidden_size // num_heads,
                                             q_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, condition: Condition | None = None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if condition is not None:
            x = x + self.cross_attn(self.norm_cross(x), condition)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x                                                          # (N, T, D)


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN then a linear map to patch pixels."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))   # (N, T, p*p*C_out)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone.

    cond_mode "adaln": c = t_emb + CEP(y_emb) (DiT; CEP as in paper 1). "cross-attention": the class embedding (one
    token) or the text context goes through cross-attention and c = t_emb (+ control); paper 2 §2.1.
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True,
                 cond_mode="adaln",       # "adaln" (DiT) | "cross-attention" (paper 2 semantic path)
                 context_dim=None,        # width of text context tokens; None = class token of hidden_size
                 cep_mode="none", cep_gamma=0.0, cep_dim=None,
                 control_dim=0,           # K control scalars on the noise-weighted adaLN path (0 = off)
                 control_alpha=1.0,       # shape of the cosine control weight w(t)
                 control_noise_weighted=True,  # False: control embedding added plainly (paper 2 ablation baseline)
                 num_timesteps=1000,
                 pos_embed_base_size=None):  # pre-training input size to rescale positions to (None = no rescaling)
        super().__init__()
        if cond_mode not in COND_MODES:
            raise ValueError(f"cond_mode must be one of {COND_MODES}, got {cond_mode!r}")
        for name, value in (("input_size", input_size), ("patch_size", patch_size), ("in_channels", in_channels),
                            ("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} must be divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if cond_mode == "adaln" and context_dim is not None:
            raise ValueError("context_dim needs cond_mode='cross-attention' (text conditions go through attention)")
        self.in_channels, self.patch_size, self.num_heads = in_channels, patch_size, num_heads
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes, self.cond_mode, self.num_timesteps = num_classes, cond_mode, num_timesteps
        self.grid_size = input_size // patch_size
        token_dim = context_dim or hidden_size

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = ClassEmbedder(num_classes, token_dim, class_dropout_prob) if num_classes else None
        self.cep = CEP(cep_mode, cep_gamma, cep_dim)
        self.control_embedder = ControlEmbedder(control_dim, hidden_size, alpha=control_alpha,
                                                num_timesteps=num_timesteps,
                                                noise_weighted=control_noise_weighted) if control_dim else None
        base_grid = None if pos_embed_base_size is None else pos_embed_base_size / patch_size
        # Fixed sin-cos embedding, recomputed from the config (not stored in checkpoints).
        self.register_buffer("pos_embed", get_2d_sincos_pos_embed(hidden_size, self.grid_size, base_grid)[None],
                             persistent=False)
        cross_dim = token_dim if cond_mode == "cross-attention" else None
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, cross_dim) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.gradient_checkpointing = False  # set by training (--grad-checkpointing): recompute blocks in backward
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(_basic_init)
        # Patch embedding like nn.Linear (instead of nn.Conv2d):
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output as zero. Zero cross-attention output and
        # control projection keep that true for paper 2's extra paths too.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if hasattr(block, "cross_attn"):
                nn.init.zeros_(block.cross_attn.to_out.weight)
                nn.init.zeros_(block.cross_attn.to_out.bias)
        if self.control_embedder is not None:
            nn.init.zeros_(self.control_embedder.mlp[-1].weight)
            nn.init.zeros_(self.control_embedder.mlp[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        return rearrange(x, "b (gh gw) (p q c) -> b c (gh p) (gw q)", gh=self.grid_size, p=self.patch_size,
                         q=self.patch_size)

    def forward(self, x, t, y=None, context=None, context_mask=None, control=None):
        """x (N, C, H, W), t (N,) integer timesteps -> eps (N, C_out, H, W)."""
        expected = (self.in_channels, self.grid_size * self.patch_size, self.grid_size * self.patch_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must be (N, {expected[0]}, {expected[1]}, {expected[2]}), "
                             f"got {tuple(getattr(x, 'shape', ()))}")
        if not isinstance(t, torch.Tensor) or t.shape != (x.shape[0],):
            raise ValueError(f"t must be a tensor of shape ({x.shape[0]},), got {getattr(t, 'shape', t)!r}")
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t)                                            # (N, D)
        if context is not None and self.cond_mode != "cross-attention":
            raise ValueError("context needs cond_mode='cross-attention'")
        condition = semantic_condition(self.cep, self.y_embedder, y, context, context_mask,
                                       class_as_token=self.cond_mode == "cross-attention")
        if condition is not None and self.cond_mode == "adaln":
            c = c + condition.perturbed()                                 # paper 1: c = t + (y_emb + delta)
            condition = None
        if control is not None:
            if self.control_embedder is None:
                raise ValueError("control given but the model has control_dim=0")
            c = c + self.control_embedder(control, t)                     # w(t) * control embedding (or w = 1)
        for block in self.blocks:
            h = run_block(block, h, c, condition, checkpointed=self.gradient_checkpointing)  # (N, T, D)
        return self.unpatchify(self.final_layer(h, c))                   # (N, C_out, H, W)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_1d_sincos_pos_embed(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, embed_dim] (sin half, cos half)."""
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2))
    args = positions.double()[:, None] * omega[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, base_grid_size: float | None = None) -> torch.Tensor:
    """[grid_size^2, embed_dim] fixed embedding, half the channels for rows and half for columns.

    base_grid_size rescales positions to span the pre-training grid (interpolation; paper 2 §2.2 finds it beats
    extrapolation, which is base_grid_size=None: positions 0..grid_size-1). At grid_size == base_grid_size both agree.
    """
    if embed_dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for 2-D sin-cos embeddings, got {embed_dim}")
    positions = torch.arange(grid_size, dtype=torch.float64)
    if base_grid_size is not None:
        if not base_grid_size > 0:
            raise ValueError(f"pos_embed_base_size must be > 0, got {base_grid_size!r}")
        positions = positions * (base_grid_size / grid_size)
    rows = get_1d_sincos_pos_embed(embed_dim // 2, positions.repeat_interleave(grid_size))
    cols = get_1d_sincos_pos_embed(embed_dim // 2, positions.repeat(grid_size))
    return torch.cat([rows, cols], dim=1).float()


#################################################################################
#                                   DiT Configs                                 #
#################################################################################

PAPER_DEFAULTS = dict(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True, class_dropout_prob=0.1)
SIZES = {"S": dict(depth=12, hidden_size=384, num_heads=6), "B": dict(depth=12, hidden_size=768, num_heads=12),
         "L": dict(depth=24, hidden_size=1024, num_heads=16), "XL": dict(depth=28, hidden_size=1152, num_heads=16)}
# DiT paper Table 4 parameter counts (millions) for the patch-2 models.
PAPER_PARAMS_M = {"S": 33, "B": 130, "L": 458, "XL": 675}
# Tiny presets that train on 2 CPU cores: 8x8 single-channel digits in pixel space (or 8x8 latents).
TINY_DEFAULTS = dict(input_size=8, in_channels=1, num_classes=10, learn_sigma=False, class_dropout_prob=0.1)
DIT_PRESETS = {
    **{f"DiT-{size}/{p}": {**PAPER_DEFAULTS, **dims, "patch_size": p}
       for size, dims in SIZES.items() for p in (2, 4, 8)},
    "DiT-tiny/2": {**TINY_DEFAULTS, "depth": 4, "hidden_size": 128, "num_heads": 4, "patch_size": 2},
    "DiT-micro/2": {**TINY_DEFAULTS, "depth": 2, "hidden_size": 64, "num_heads": 2, "patch_size": 2},
}
