"""The LDM U-Net (Rombach et al. 2022; names follow latent-diffusion's openaimodel.py and attention.py).

ResBlocks take the timestep embedding; SpatialTransformers run self-attention, cross-attention to the (CEP-perturbed)
condition tokens through the fused cep::cross_attention op, and a GEGLU feed-forward.
"""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.attention import CrossAttention, SelfAttention, run_block
from models.cep import CEP
from models.conditioning import (ClassEmbedder, Condition, ControlEmbedder, semantic_condition,
                                 timestep_embedding)

NORM_GROUPS = 32


def normalization(channels):
    """GroupNorm with LDM's 32 groups, but at least 4 channels per group: with one channel per group (tiny widths)
    the norm would erase the per-channel timestep embedding a ResBlock adds."""
    return nn.GroupNorm(min(NORM_GROUPS, channels // 4), channels)


def zero_module(module):
    """Zero-initialise a layer so its residual branch starts as a no-op (LDM convention)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


#################################################################################
#                                  U-Net blocks                                 #
#################################################################################

class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the projected timestep embedding, then GroupNorm-SiLU-dropout-conv (zero init)."""

    def __init__(self, channels, emb_channels, dropout=0.0, out_channels=None):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)                                            # (N, C_out, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class GEGLU(nn.Module):
    """Gated GELU feed-forward (Shazeer 2020), as LDM's FeedForward(glu=True)."""

    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        self.proj = nn.Linear(dim, dim * mult * 2)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim * mult, dim)

    def forward(self, x):
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(self.dropout(hidden * F.gelu(gate)))


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each residual."""

    def __init__(self, dim, n_heads, d_head, context_dim, dropout=0.0):
        super().__init__()
        self.attn1 = SelfAttention(dim, n_heads, qkv_bias=False)
        self.ff = GEGLU(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, condition: Condition | None):
        x = x + self.attn1(self.norm1(x))
        if condition is not None:
            x = x + self.attn2(self.norm2(x), condition)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, with a zero-initialised output projection."""

    def __init__(self, in_channels, n_heads, d_head, depth, context_dim, dropout=0.0):
        super().__init__()
        inner = n_heads * d_head
        self.norm = normalization(in_channels)
        self.proj_in = nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, n_heads, d_head, context_dim, dropout) for _ in range(depth)])
        self.proj_out = zero_module(nn.Conv2d(inner, in_channels, 1))

    def forward(self, x, condition: Condition | None):
        height, width = x.shape[2:]
        h = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")  # (N, HW, inner)
        for block in self.transformer_blocks:
            h = block(h, condition)
        return x + self.proj_out(rearrange(h, "b (h w) c -> b c h w", h=height, w=width))


class Downsample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.ModuleList):
    """Runs layers in order, giving ResBlocks the timestep embedding and transformers the condition."""

    def forward(self, x, emb, condition):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, condition)
            else:
                x = layer(x)
        return x


#################################################################################
#                                   The U-Net                                   #
#################################################################################

class UNetModel(nn.Module):
    """LDM U-Net denoiser. Class labels (num_classes > 0) become one context token of width context_dim, as LDM's
    ClassEmbedder; text models get `context` tokens directly. CEP perturbs that token/context (paper 1)."""

    def __init__(self, image_size=64, in_channels=3, model_channels=192, out_channels=None, num_res_blocks=2,
                 attention_resolutions=(8, 4, 2),   # downsampling rates with a SpatialTransformer
                 dropout=0.0, channel_mult=(1, 2, 3, 5), num_heads=1, num_head_channels=-1, transformer_depth=1,
                 context_dim=512, num_classes=1000, class_dropout_prob=0.1,
                 cep_mode="none", cep_gamma=0.0, cep_dim=None,
                 control_dim=0, control_alpha=1.0, control_noise_weighted=True, num_timesteps=1000):
        super().__init__()
        for name, value in (("image_size", image_size), ("in_channels", in_channels),
                            ("num_res_blocks", num_res_blocks), ("context_dim", context_dim),
                            ("transformer_depth", transformer_depth)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(model_channels, int) or model_channels < NORM_GROUPS or model_channels % NORM_GROUPS:
            raise ValueError(f"model_channels must be a positive multiple of {NORM_GROUPS}, got {model_channels!r}")
        if not channel_mult or any(not isinstance(m, int) or m < 1 for m in channel_mult):
            raise ValueError(f"channel_mult must be a non-empty sequence of ints >= 1, got {channel_mult!r}")
        if image_size % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"image_size {image_size} must be divisible by 2^(len(channel_mult)-1)")
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError("set exactly one of num_heads and num_head_channels (the other -1)")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        self.in_channels, self.image_size = in_channels, image_size
        self.out_channels = out_channels or in_channels
        self.num_classes = num_classes
        time_embed_dim = model_channels * 4

        def transformer(ch):
            heads = num_heads if num_heads != -1 else ch // num_head_channels
            if heads < 1 or ch % heads:
                raise ValueError(f"{ch} channels cannot be split into {heads} attention heads (num_heads / "
                                 f"num_head_channels)")
            return SpatialTransformer(ch, heads, ch // heads, transformer_depth, context_dim, dropout)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))
        self.label_embedder = ClassEmbedder(num_classes, context_dim, class_dropout_prob) if num_classes else None
        self.cep = CEP(cep_mode, cep_gamma, cep_dim)
        self.control_embedder = ControlEmbedder(control_dim, time_embed_dim, alpha=control_alpha,
                                                num_timesteps=num_timesteps,
                                                noise_weighted=control_noise_weighted) if control_dim else None

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential([nn.Conv2d(in_channels, model_channels, 3,
                                                                              padding=1)])])
        input_block_chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, time_embed_dim, dropout, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                input_block_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential([ResBlock(ch, time_embed_dim, dropout), transformer(ch),
                                                     ResBlock(ch, time_embed_dim, dropout)])
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + input_block_chans.pop(), time_embed_dim, dropout, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(model_channels, self.out_channels, 3, padding=1)))
        self.model_channels = model_channels
        self.gradient_checkpointing = False  # set by training (--grad-checkpointing): recompute blocks in backward
        if self.control_embedder is not None:
            zero_module(self.control_embedder.mlp[-1])                  # control starts as a no-op

    def forward(self, x, t, y=None, context=None, context_mask=None, control=None):
        """x (N, C, H, W), t (N,) integer timesteps -> eps (N, C_out, H, W)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (N, {self.in_channels}, H, W), got {tuple(getattr(x, 'shape', ()))}")
        if not isinstance(t, torch.Tensor) or t.shape != (x.shape[0],):
            raise ValueError(f"t must be a tensor of shape ({x.shape[0]},), got {getattr(t, 'shape', t)!r}")
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))  # (N, 4 * model_channels)
        if control is not None:
            if self.control_embedder is None:
                raise ValueError("control given but the model has control_dim=0")
            emb = emb + self.control_embedder(control, t)               # w(t) * control embedding
        condition = semantic_condition(self.cep, self.label_embedder, y, context, context_mask, class_as_token=True)
        skips, h = [], x
        checkpointed = self.gradient_checkpointing
        for block in self.input_blocks:
            h = run_block(block, h, emb, condition, checkpointed=checkpointed)
            skips.append(h)
        h = run_block(self.middle_block, h, emb, condition, checkpointed=checkpointed)
        for block in self.output_blocks:
            h = run_block(block, torch.cat([h, skips.pop()], dim=1), emb, condition, checkpointed=checkpointed)
        return self.out(h)                                               # (N, C_out, H, W)


#################################################################################
#                                  U-Net Configs                                #
#################################################################################

# LDM-4 (paper 1 Table 3; latent-diffusion cin256-v2): 64x64x3 VQ-f4 latents, ~400M parameters.
LDM4 = dict(image_size=64, in_channels=3, model_channels=192, num_res_blocks=2, attention_resolutions=(8, 4, 2),
            channel_mult=(1, 2, 3, 5), num_heads=1, transformer_depth=1, context_dim=512, num_classes=1000)
TINY = dict(image_size=8, in_channels=1, model_channels=32, num_res_blocks=1, channel_mult=(1, 2), num_heads=2,
            transformer_depth=1, context_dim=32, num_classes=10)
UNET_PRESETS = {
    "LDM-4": LDM4,
    "LDM-4-text": {**LDM4, "context_dim": 768, "num_classes": 0},       # CC3M: BERT-base tokens as context
    "UNet-tiny": {**TINY, "attention_resolutions": (1, 2)},
    "UNet-micro": {**TINY, "channel_mult": (1,), "attention_resolutions": (1,)},
}
