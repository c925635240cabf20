"""Text-conditional training: the denoiser and its text encoder train together (paper 1 fine-tunes its text encoder
with the U-Net), so both live in one module for the optimizer, EMA and DDP; checkpoints keep them apart so the
denoiser alone matches the `model(x, t, context=..., context_mask=...)` interface."""
import torch
from torch import nn

from models.text_encoder import TextEncoder

NULL_CAPTION = ""  # the unconditional (CFG) caption


class TextConditionedDenoiser(nn.Module):
    """captions -> text encoder -> (context, context_mask) -> denoiser."""

    def __init__(self, denoiser: nn.Module, text_encoder: TextEncoder):
        super().__init__()
        self.denoiser, self.text_encoder = denoiser, text_encoder

    def forward(self, x, t, captions: list[str], control=None):
        context, context_mask = self.text_encoder.encode(captions)       # [B, L, width], [B, L]
        return self.denoiser(x, t, context=context, context_mask=context_mask, control=control)


def drop_captions(captions: list[str], probability: float, generator: torch.Generator) -> list[str]:
    """Classifier-free guidance training: each caption becomes the null caption with `probability`."""
    drop = (torch.rand(len(captions), generator=generator) < probability).tolist()
    return [NULL_CAPTION if d else c for c, d in zip(captions, drop)]


def parts(module: nn.Module) -> dict[str, nn.Module]:
    """Checkpoint entries of a (possibly text-conditioned) model: "model" is always the bare denoiser."""
    if isinstance(module, TextConditionedDenoiser):
        return {"model": module.denoiser, "text_encoder": module.text_encoder}
    return {"model": module}
