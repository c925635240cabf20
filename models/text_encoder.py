"""Text conditions: a deterministic hashing tokenizer and a from-scratch transformer text encoder.

Paper 1 fine-tunes bert-base-uncased; no pretrained weights can be downloaded here, so the encoder is trained from
scratch with the denoiser, or loaded from a local directory written by `save_pretrained`.
Paper 2's "noisy replicate padding" (App. D) is a padding option of the encoder output.
"""
import json
import re
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PADDINGS = ("zero", "replicate", "noisy-replicate")
WORD_PATTERN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class HashTokenizer:
    """Lower-cased words and punctuation -> ids by CRC32 hashing: deterministic across runs and machines, no vocab file.
    Sequences are [BOS, words..., EOS], truncated and right-padded to max_length."""
    PAD, BOS, EOS = 0, 1, 2
    SPECIAL = 3

    def __init__(self, vocab_size: int = 8192, max_length: int = 32):
        if not isinstance(vocab_size, int) or vocab_size <= self.SPECIAL:
            raise ValueError(f"vocab_size must be an int > {self.SPECIAL}, got {vocab_size!r}")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        self.vocab_size, self.max_length = vocab_size, max_length

    def token_id(self, word: str) -> int:
        return self.SPECIAL + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - self.SPECIAL)

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> (ids Long[B, max_length], mask Bool[B, max_length], True = real token)."""
        if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
            raise TypeError("texts must be a list of str")
        ids = torch.full((len(texts), self.max_length), self.PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            words = [self.token_id(w) for w in WORD_PATTERN.findall(text.lower())][: self.max_length - 2]
            tokens = [self.BOS, *words, self.EOS]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, ids != self.PAD


def noisy_replicate_padding(tokens: torch.Tensor, mask: torch.Tensor, noise_std: float = 0.0,
                            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill the padding slots of each row with cyclic copies of its real tokens plus N(0, noise_std^2) noise
    (paper 2 App. D: copies carry information, the noise keeps them from being exact duplicates).

    tokens [B, L, C], mask bool [B, L] with real tokens first -> (tokens [B, L, C], mask all True for rows with a
    real token). Paper 2 does not give the noise scale; noise_std is a hyperparameter.
    """
    if mask.dtype != torch.bool or mask.shape != tokens.shape[:2]:
        raise ValueError(f"mask must be bool {tuple(tokens.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
    length = tokens.shape[1]
    counts = mask.sum(1, keepdim=True).clamp(min=1)                     # [B, 1]
    position = torch.arange(length, device=tokens.device)[None]         # [1, L]
    source = torch.where(mask, position, (position - counts) % counts)  # [B, L]
    filled = tokens.gather(1, source[..., None].expand_as(tokens))
    padding = (~mask & mask.any(1, keepdim=True))[..., None]            # [B, L, 1]
    if noise_std > 0:
        noise = torch.randn(tokens.shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
        filled = filled + padding * noise_std * noise
    return filled, mask | padding[..., 0]


class TextEncoder(nn.Module):
    """Token ids -> contextual token embeddings [B, L, width] (pre-norm transformer, learned positions)."""

    def __init__(self, vocab_size=8192, max_length=32, width=256, depth=4, num_heads=4, padding="zero",
                 padding_noise=0.1):
        super().__init__()
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        if width % num_heads:
            raise ValueError(f"width {width} must be divisible by num_heads {num_heads}")
        self.config = dict(vocab_size=vocab_size, max_length=max_length, width=width, depth=depth,
                           num_heads=num_heads, padding=padding, padding_noise=padding_noise)
        self.tokenizer = HashTokenizer(vocab_size, max_length)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(max_length, width) * 0.01)
        layer = nn.TransformerEncoderLayer(width, num_heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(width)
        self.padding, self.padding_noise = padding, padding_noise

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids Long[B, L], mask Bool[B, L]) -> (context [B, L, width], context_mask Bool[B, L])."""
        if ids.dim() != 2 or ids.shape[1] > self.tokenizer.max_length or ids.dtype != torch.long:
            raise ValueError(f"ids must be Long[B, <= {self.tokenizer.max_length}], got {ids.dtype} {tuple(ids.shape)}")
        if mask.shape != ids.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool with the shape of ids {tuple(ids.shape)}")
        h = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        # Rows without any real token (never produced by the tokenizer) attend to everything instead of nothing.
        key_padding = ~mask & mask.any(1, keepdim=True)
        h = self.ln_final(self.transformer(h, src_key_padding_mask=key_padding))   # [B, L, width]
        if self.padding == "zero":
            return h * mask[..., None], mask
        noise = self.padding_noise if self.padding == "noisy-replicate" and self.training else 0.0
        return noisy_replicate_padding(h, mask, noise)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Strings -> (context, context_mask) on the encoder's device."""
        ids, mask = self.tokenizer(texts)
        device = self.token_embedding.weight.device
        return self(ids.to(device), mask.to(device))

    def save_pretrained(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config, indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, directory / "model.safetensors")

    @classmethod
    def from_pretrained(cls, directory) -> "TextEncoder":
        """Load an encoder written by save_pretrained from a local directory (nothing is downloaded)."""
        directory = Path(directory)
        if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
            raise ValueError(f"directory {str(directory)!r} must contain config.json and model.safetensors")
        encoder = cls(**json.loads((directory / "config.json").read_text()))
        encoder.load_state_dict(load_file(directory / "model.safetensors"))
        return encoder
