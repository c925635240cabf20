"""Condition Embedding Perturbation (CEP, paper 1 §5, Eq. 8) and the fused CEP cross-attention op.

Public API (DESIGN.md §4):
  perturb(x, gamma, mode, seed, offset, dim)      x + gamma/sqrt(dim) * noise, noise U(-1,1) or N(0,1)
  cross_attention(q, context, w_k, w_v, ...)      softmax(q K^T / sqrt(Dh)) V, K/V = perturb(context) @ w^T
  CEP(mode, gamma, dim)                           training-only perturbation module used by the models

Both ops run the C++/CUDA kernels of `models._C` (torch.ops.cep.*) when the extension is built, else the pure-PyTorch
twins below (with a one-time warning). The twins are also the test oracles.

Philox counter layout (identical in csrc/philox.h, the CPU and the CUDA kernels, and `philox_uniform_bits` below):
  key     = (seed mod 2^32, seed >> 32)                           64-bit seed -> two 32-bit key words
  element i of the row-major (logical, contiguity-independent) flattening uses g = offset + i:
  counter = (g >> 2 mod 2^32, g >> 34, 0, 0)                      one Philox4x32-10 call yields 4 words ...
  lane    = g & 3                                                 ... and element g takes word `lane`.
  uniform : w -> ((w >> 8) * 2 + 1 - 2^24) * 2^-24                odd multiples of 2^-24 in (-1, 1), exact in fp32,
                                                                  so the stream is bit-identical on every backend
  gaussian: Box-Muller on word pairs (0,1) and (2,3) of a call:   u1 = ((w0 >> 8) + 1) 2^-24 in (0, 1],
            r = sqrt(-2 ln u1), theta = 2 pi (w1 >> 8) 2^-24;     lane 0 = r cos theta, lane 1 = r sin theta
                                                                  (agrees across backends to float rounding)
The noise is generated in fp32 (fp64 inputs get the same fp32 noise, upcast) and added in fp32 for fp16/bf16 inputs.
"""
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

try:
    from models import _C  # noqa: F401  (registers torch.ops.cep.*)

    HAS_EXTENSION = True
except ImportError:
    HAS_EXTENSION = False

MODES = ("uniform", "gaussian")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_INT64 = 2**63 - 1

# Philox4x32-10 constants (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3").
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------------------------
# Argument checks shared by the public functions (the C++ ops repeat them with TORCH_CHECK_VALUE/TYPE).

def _check_number(name, value, low=0.0):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value < low:
        raise ValueError(f"{name} must be finite and >= {low}, got {value}")


def _check_int(name, value, low, high=MAX_INT64):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def _check_mode(mode, allowed=MODES):
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str, got {type(mode).__name__}")
    if mode not in allowed:
        raise ValueError(f"mode must be one of {allowed}, got {mode!r}")


def _check_float_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def _check_stream(gamma, mode, seed, offset, numel):
    _check_number("gamma", gamma)
    _check_mode(mode)
    _check_int("seed", seed, 0)
    _check_int("offset", offset, 0, MAX_INT64 - numel)


def _resolve_dim(x, dim):
    if dim is None:
        if x.dim() == 0 or x.shape[-1] == 0:
            raise ValueError("dim must be given when x has no non-empty last dimension")
        return int(x.shape[-1])
    _check_int("dim", dim, 1)
    return dim


# ---------------------------------------------------------------------------------------------------------------------
# Pure-PyTorch twins. Philox runs on int64 tensors holding uint32 values; written by hand because torch exposes no
# counter-based generator with a documented, reproducible stream layout.

def _mulhilo(multiplier: int, word: torch.Tensor):
    """(hi, lo) 32-bit halves of multiplier * word, split in 16-bit halves so int64 never overflows."""
    partial_lo = word * (multiplier & 0xFFFF)  # < 2^48
    partial_hi = word * (multiplier >> 16)  # < 2^48
    low_sum = partial_lo + ((partial_hi & 0xFFFF) << 16)
    return (partial_hi >> 16) + (low_sum >> 32), low_sum & MASK32


def philox_uniform_bits(seed: int, first_block: int, num_blocks: int, device=None) -> torch.Tensor:
    """Philox4x32-10 output words for counters first_block .. first_block + num_blocks - 1: int64 [num_blocks, 4]."""
    block = torch.arange(first_block, first_block + num_blocks, dtype=torch.int64, device=device)
    c0, c1 = block & MASK32, block >> 32
    c2 = c3 = torch.zeros_like(block)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for round_index in range(PHILOX_ROUNDS):
        if round_index > 0:
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack([c0, c1, c2, c3], dim=-1)


def philox_noise(numel: int, mode: str, seed: int, offset: int, device=None) -> torch.Tensor:
    """fp32 noise for stream elements offset .. offset + numel - 1 (layout in the module docstring)."""
    if numel == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    first_block, last_block = offset >> 2, (offset + numel - 1) >> 2
    words = philox_uniform_bits(seed, first_block, last_block - first_block + 1, device)
    top24 = words >> 8
    if mode == "uniform":
        noise = ((top24 * 2 + 1 - (1 << 24)).to(torch.float32) * 2.0**-24).flatten()
    else:
        u1 = (top24[:, 0::2] + 1).to(torch.float32) * 2.0**-24
        theta = top24[:, 1::2].to(torch.float32) * (2.0**-24 * 2.0 * math.pi)
        radius = torch.sqrt(-2.0 * torch.log(u1))
        noise = torch.stack([radius * torch.cos(theta), radius * torch.sin(theta)], dim=-1).flatten()
    start = offset & 3
    return noise[start:start + numel]


def perturb_reference(x, gamma, mode="uniform", seed=0, offset=0, dim=None):
    """Pure-PyTorch twin of cep::perturb (differentiable: the noise is a constant)."""
    dim = _resolve_dim(x, dim)
    noise = philox_noise(x.numel(), mode, seed, offset, x.device).view(x.shape)
    scale = gamma / math.sqrt(dim)
    if x.dtype == torch.float64:
        return x + scale * noise.double()
    return (x.float() + scale * noise).to(x.dtype)


def cross_attention_reference(q, context, w_k, w_v, key_mask=None, gamma=0.0, mode="uniform", seed=0, offset=0,
                              dim=None):
    """Pure-PyTorch twin of cep::cross_attention: perturb + 2 linears + SDPA. Batch elements whose keys are all masked
    give output 0 (and so zero gradients), like the kernels."""
    batch, heads, _, head_dim = q.shape
    tokens = context.shape[1]
    if gamma > 0:
        context = perturb_reference(context, gamma, mode, seed, offset, dim)
    # [B, M, H*Dh] -> [B, H, M, Dh]
    k = F.linear(context, w_k).view(batch, tokens, heads, head_dim).transpose(1, 2)
    v = F.linear(context, w_v).view(batch, tokens, heads, head_dim).transpose(1, 2)
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    has_key = key_mask.any(dim=1)  # [B]
    safe_mask = key_mask | ~has_key[:, None]  # attend everywhere in empty rows, then zero them: no NaN anywhere
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe_mask[:, None, None, :])
    return out * has_key[:, None, None, None].to(out.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Public ops.

_warned_fallback = False


def _use_extension(device: torch.device) -> bool:
    """True when models._C has a kernel for this device type; else warn once and use the twin."""
    global _warned_fallback
    has_kernel = HAS_EXTENSION and device.type in KERNEL_DEVICE_TYPES
    if not has_kernel and not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"models._C has no {device.type} kernels (not built, or built without them); cep ops run the "
                      "slower pure-PyTorch twins (run `make install`)", RuntimeWarning, stacklevel=3)
    return has_kernel


def perturb(x, gamma: float, mode: str = "uniform", seed: int = 0, offset: int = 0, dim: int | None = None):
    """x + gamma/sqrt(dim) * noise (paper 1 Eq. 8); noise U(-1,1) or N(0,1) from Philox keyed by seed, counter =
    offset + element index. dim defaults to x.shape[-1]; pass L*D for the NEFTune convention. Gradient wrt x = I."""
    _check_float_tensor("x", x)
    dim = _resolve_dim(x, dim)
    _check_stream(gamma, mode, seed, offset, x.numel())
    if _use_extension(x.device):
        return torch.ops.cep.perturb(x, float(gamma), mode, seed, offset, dim)
    return perturb_reference(x, gamma, mode, seed, offset, dim)


def _check_attention_args(q, context, w_k, w_v, key_mask):
    for name, t in (("q", q), ("context", context), ("w_k", w_k), ("w_v", w_v)):
        _check_float_tensor(name, t)
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, N, Dh], got shape {tuple(q.shape)}")
    if context.dim() != 3:
        raise ValueError(f"context must be [B, M, C], got shape {tuple(context.shape)}")
    batch, heads, _, head_dim = q.shape
    if context.shape[0] != batch:
        raise ValueError(f"context batch {context.shape[0]} != q batch {batch}")
    if context.shape[1] < 1 or context.shape[2] < 1 or head_dim < 1 or heads < 1:
        raise ValueError("context tokens/channels and q heads/head_dim must be >= 1, got "
                         f"context {tuple(context.shape)}, q {tuple(q.shape)}")
    for name, w in (("w_k", w_k), ("w_v", w_v)):
        if tuple(w.shape) != (heads * head_dim, context.shape[2]):
            raise ValueError(f"{name} must be [H*Dh, C] = [{heads * head_dim}, {context.shape[2]}], "
                             f"got {tuple(w.shape)}")
    for name, t in (("context", context), ("w_k", w_k), ("w_v", w_v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} != q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} device {t.device} != q device {q.device}")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
            raise TypeError(f"key_mask must be a bool tensor, got {getattr(key_mask, 'dtype', type(key_mask))}")
        if tuple(key_mask.shape) != tuple(context.shape[:2]):
            raise ValueError(f"key_mask must be [B, M] = {tuple(context.shape[:2])}, got {tuple(key_mask.shape)}")
        if key_mask.device != q.device:
            raise ValueError(f"key_mask device {key_mask.device} != q device {q.device}")


def _autocast_to_float(t):
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def cross_attention(q, context, w_k, w_v, key_mask=None, gamma: float = 0.0, mode: str = "uniform", seed: int = 0,
                    offset: int = 0, dim: int | None = None):
    """Fused CEP cross-attention: q [B,H,N,Dh], context [B,M,C], w_k/w_v [H*Dh, C], key_mask bool [B,M] (True =
    attend) -> [B,H,N,Dh] = softmax(q K^T / sqrt(Dh)) V with K, V = perturb(context) @ w^T split into heads.
    Batch elements with every key masked give 0 (zero gradients). gamma = 0 is plain cross-attention."""
    if isinstance(q, torch.Tensor) and torch.amp.is_autocast_available(q.device.type) \
            and torch.is_autocast_enabled(q.device.type):
        # Under autocast q arrives in bf16/fp16 while the condition tokens and weights stay fp32. The op accumulates in
        # fp32 anyway, so it runs on fp32 inputs with autocast off (which would otherwise re-cast the BLAS calls made
        # inside the kernel) and returns fp32, like autocast's fp32 ops (softmax).
        with torch.autocast(q.device.type, enabled=False):
            return cross_attention(*(_autocast_to_float(t) for t in (q, context, w_k, w_v)), key_mask, gamma, mode,
                                   seed, offset, dim)
    _check_attention_args(q, context, w_k, w_v, key_mask)
    dim = _resolve_dim(context, dim)
    _check_stream(gamma, mode, seed, offset, context.numel())
    if _use_extension(q.device):
        out, _ = torch.ops.cep.cross_attention(q, context, w_k, w_v, key_mask, float(gamma), mode, seed, offset, dim)
        return out
    return cross_attention_reference(q, context, w_k, w_v, key_mask, gamma, mode, seed, offset, dim)


# ---------------------------------------------------------------------------------------------------------------------
# Fake (meta) kernels and autograd of the C++ ops, so they trace under torch.compile and pass torch.library.opcheck.

def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


if HAS_EXTENSION:
    @torch.library.register_fake("cep::perturb")
    def _perturb_fake(x, gamma, mode, seed, offset, dim):
        return x.new_empty(x.shape)

    @torch.library.register_fake("cep::cross_attention")
    def _cross_attention_fake(q, context, w_k, w_v, key_mask, gamma, mode, seed, offset, dim):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))

    @torch.library.register_fake("cep::cross_attention_backward")
    def _cross_attention_backward_fake(grad_out, q, context, w_k, w_v, key_mask, out, lse, gamma, mode, seed,
                                       offset, dim):
        return q.new_empty(q.shape), context.new_empty(context.shape), w_k.new_empty(w_k.shape), \
            w_v.new_empty(w_v.shape)

    def _perturb_backward(ctx, grad):
        return grad, None, None, None, None, None  # the noise is additive: d out / d x = I

    def _cross_attention_setup(ctx, inputs, output):
        q, context, w_k, w_v, key_mask, *ctx.stream = inputs
        ctx.save_for_backward(q, context, w_k, w_v, key_mask, *output)

    def _cross_attention_backward(ctx, grad_out, grad_lse):
        # lse is an internal output (the public wrapper drops it), so its gradient is not propagated.
        q, context, w_k, w_v, key_mask, out, lse = ctx.saved_tensors
        grads = torch.ops.cep.cross_attention_backward(grad_out, q, context, w_k, w_v, key_mask, out, lse,
                                                       *ctx.stream)
        return *grads, None, None, None, None, None, None

    torch.library.register_autograd("cep::perturb", _perturb_backward)
    torch.library.register_autograd("cep::cross_attention", _cross_attention_backward,
                                    setup_context=_cross_attention_setup)

# Device types with kernels (meta: the fake kernels above), looked up once: a plain set keeps the ops traceable by
# torch.compile.
KERNEL_DEVICE_TYPES = frozenset(
    device_type for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"), ("meta", "Meta"))
    if HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key("cep::perturb", key))


# ---------------------------------------------------------------------------------------------------------------------
# The CEP module.

class CEP(nn.Module):
    """Condition Embedding Perturbation (paper 1 Eq. 8): c + delta with delta ~ U(-gamma/sqrt(d), gamma/sqrt(d)) ("uniform",
    CEP-U) or gamma/sqrt(d) * N(0, I) ("gaussian", CEP-G, standard-deviation reading). Active only in training mode with
    gamma > 0; each call draws a fresh Philox seed from torch's global generator, so a training loop that seeds
    torch per step gets reproducible perturbations."""

    def __init__(self, mode: str = "uniform", gamma: float = 0.0, dim: int | None = None):
        super().__init__()
        _check_mode(mode, MODES + ("none",))
        _check_number("gamma", gamma)
        if dim is not None:
            _check_int("dim", dim, 1)
        self.mode, self.gamma, self.dim = mode, float(gamma), dim
        self.record_noise_ratio, self._noise_ratio = False, None   # training statistics, off by default

    @property
    def active(self) -> bool:
        return self.training and self.mode != "none" and self.gamma > 0

    def draw_seed(self) -> int | None:
        """A fresh Philox key for this call (None when inactive); cross-attention layers pass it to cross_attention."""
        if not self.active:
            return None
        return int(torch.randint(0, MAX_INT64, (), dtype=torch.int64))

    def forward(self, x):
        seed = self.draw_seed()
        if seed is None:
            return x
        self.note(x, seed)
        return perturb(x, self.gamma, self.mode, seed, 0, self.dim)

    @torch.no_grad()
    def note(self, embedding: torch.Tensor, seed: int) -> None:
        """With record_noise_ratio on, keeps the batch mean of |delta| / |c(y)| for this draw as a device tensor
        (delta regenerated from the same Philox seed; no host synchronisation)."""
        if not self.record_noise_ratio:
            return
        embedding = embedding.detach().float()
        delta = perturb(torch.zeros_like(embedding), self.gamma, self.mode, seed, 0, self.dim)
        self._noise_ratio = (delta.flatten(1).norm(dim=1) / embedding.flatten(1).norm(dim=1).clamp_min(1e-12)).mean()

    def pop_noise_ratio(self) -> torch.Tensor | None:
        """The last recorded ratio (then cleared), or None when no draw was recorded since."""
        ratio, self._noise_ratio = self._noise_ratio, None
        return ratio

    def extra_repr(self):
        return f"mode={self.mode!r}, gamma={self.gamma}, dim={self.dim}"
