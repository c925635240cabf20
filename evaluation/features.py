"""Feature extractors behind one interface, for every metric in evaluation/metrics.py.

An extractor maps images [B, C, H, W] (float in [0, 1]) to a dict of 2-D feature tensors:
    "pool"    [B, D]  pooled features (FID, KID, precision/recall, RMD, memorisation, L2, CLIP-style score)
    "logits"  [B, K]  class logits (IS)                                             -- optional
    "spatial" [B, S]  flattened mid-level spatial features (sFID, Nash et al. 2021)  -- optional

Three kinds (paper 1 uses Inception-v3 and CLIP ViT-B/16, which cannot be downloaded here):
  (a) DigitClassifier: a small CNN trained here per data set, deterministically, cached by data-set hash, with its
      held-out accuracy recorded: the offline stand-in for Inception/CLIP;
  (b) ScriptedExtractor: any TorchScript (torch.jit.save) or torch.export (.pt2) module loaded from a path: how a user
      brings Inception-v3 or a CLIP image tower exported elsewhere;
  (c) TextTower: the text tower of a local text encoder (TorchScript, list[str] -> [B, D]) for CLIP-style scores.
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURE_KEYS = ("pool", "logits", "spatial")
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "cepdiff")


#################################################################################
#                              Common helpers                                   #
#################################################################################

def images_to_tensor(images) -> torch.Tensor:
    """uint8 arrays [N, H, W] / [N, H, W, C] (data sets, PNGs) or float tensors [N, C, H, W] in [0, 1] -> float [N, C, H, W]."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"images: numpy arrays must be uint8 [N, H, W(, C)], got dtype {images.dtype}")
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4:
            raise ValueError(f"images: expected [N, H, W] or [N, H, W, C], got shape {images.shape}")
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: expected a numpy uint8 array or a torch tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images: expected a [N, C, H, W] tensor, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"images: expected uint8 or floating point, got {images.dtype}")
    if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError("images: float images must lie in [0, 1]")
    return images.float()


def _state_fingerprint(module: nn.Module) -> str:
    """sha256 over a module's class name and its parameters/buffers: identifies the extractor in metrics.jsonl."""
    digest = hashlib.sha256(type(module).__name__.encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def extract_features(extractor: nn.Module, images, batch_size: int = 256,
                     keys: tuple[str, ...] = FEATURE_KEYS) -> dict[str, torch.Tensor]:
    """Run `extractor` over all images in batches; returns the float64 CPU features named in `keys` that the
    extractor provides (a large training set needs only "pool": spatial features would cost N x S doubles)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    images = images_to_tensor(images)
    if len(images) == 0:
        raise ValueError("images: the set is empty")
    extractor.eval()
    chunks: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images), batch_size):
        out = extractor(images[start:start + batch_size])
        for key, value in out.items():
            if key in keys:
                chunks.setdefault(key, []).append(value.detach().double().cpu())
    return {key: torch.cat(values) for key, values in chunks.items()}


#################################################################################
#                (a) Small classifier trained per data set                      #
#################################################################################

class DigitClassifier(nn.Module):
    """Three-conv CNN: the offline stand-in for Inception-v3 (pool = penultimate layer, spatial = mid-level map)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 8, width: int = 16,
                 spatial_channels: int = 8):
        super().__init__()
        self.input_size = input_size
        self.spatial_channels = spatial_channels
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1)
        self.head = nn.Linear(4 * width, num_classes)
        self.num_features = 4 * width

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False)
        x = F.gelu(self.conv1(2 * images - 1))                        # (B, w, S, S)
        mid = F.gelu(self.conv2(x))                              # (B, 2w, S/2, S/2)
        x = F.gelu(self.conv3(mid))                              # (B, 4w, S/4, S/4)
        pool = x.mean(dim=(2, 3))                                # (B, 4w)
        # Like sFID's first 7 channels of Inception's mixed_6/conv: a few mid-level channels keep spatial layout.
        spatial = mid[:, :self.spatial_channels].flatten(1)      # (B, c * S/2 * S/2)
        return {"pool": pool, "logits": self.head(pool), "spatial": spatial}


def dataset_hash(images: np.ndarray, labels: np.ndarray, **settings) -> str:
    """Cache key: sha256 of the raw arrays plus every training setting."""
    digest = hashlib.sha256()
    for array in (images, labels):
        digest.update(str((array.dtype, array.shape)).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def classifier_accuracy(model: nn.Module, images, labels) -> float:
    logits = extract_features(model, images)["logits"]
    return float((logits.argmax(1) == torch.as_tensor(labels)).double().mean())


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, input_size: int = 8,
                     steps: int = 600, batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> DigitClassifier:
    """Deterministic AdamW training (fixed seed for init and batches); seconds on 8x8 digits."""
    x = images_to_tensor(images)
    y = torch.as_tensor(labels, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitClassifier(x.shape[1], num_classes, input_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # such tiny convs only lose to thread sync (measured 30x slower on a busy 2-core box)
    try:
        for _ in range(steps):
            idx = torch.randint(len(x), (batch_size,), generator=generator)
            loss = F.cross_entropy(model(x[idx])["logits"], y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def load_or_train_classifier(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                             test_labels: np.ndarray, num_classes: int, cache_dir: str | os.PathLike | None = None,
                             input_size: int | None = None, steps: int = 600, seed: int = 0) -> tuple[DigitClassifier, dict]:
    """The per-data-set classifier, from `cache_dir` when trained before on the same arrays and settings.

    Returns (model, info) with info = {"kind", "dataset_hash", "fingerprint", "test_accuracy", "num_test", ...}.
    """
    for name, value in (("train_labels", train_labels), ("test_labels", test_labels)):
        value = np.asarray(value)
        if value.ndim != 1 or value.size == 0 or value.min() < 0 or value.max() >= num_classes:
            raise ValueError(f"{name}: expected a non-empty 1-D array of class ids in [0, {num_classes})")
    if len(train_images) != len(train_labels):
        raise ValueError(f"train_images/train_labels: lengths differ ({len(train_images)} vs {len(train_labels)})")
    if len(test_images) != len(test_labels):
        raise ValueError(f"test_images/test_labels: lengths differ ({len(test_images)} vs {len(test_labels)})")
    input_size = input_size or int(images_to_tensor(train_images[:1]).shape[-1])  # default: native resolution
    settings = dict(num_classes=num_classes, input_size=input_size, steps=steps, seed=seed, version=1)
    key = dataset_hash(train_images, np.asarray(train_labels), **settings)
    path = Path(cache_dir or DEFAULT_CACHE_DIR) / f"classifier-{key}.pt"
    if path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            model = DigitClassifier(**blob["config"])
            model.load_state_dict(blob["state_dict"])
            return model.eval(), blob["info"]
        except Exception as error:  # a truncated/corrupt cache entry is retrained, not trusted
            print(f"[features] ignoring unreadable cache {path}: {error}")
    model = train_classifier(train_images, train_labels, num_classes, input_size, steps, seed=seed)
    info = dict(kind="digit-classifier", dataset_hash=key, fingerprint=_state_fingerprint(model),
                test_accuracy=classifier_accuracy(model, test_images, test_labels), num_test=len(test_labels),
                **settings)
    config = dict(in_channels=model.conv1.in_channels, num_classes=num_classes, input_size=input_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "config": config, "info": info}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return model, info


#################################################################################
#                 (b) TorchScript / torch.export module by path                 #
#################################################################################

class ScriptedExtractor(nn.Module):
    """Wraps a serialized module (TorchScript `.pt`/`.ts` or torch.export `.pt2`), e.g. Inception-v3 exported elsewhere.

    The module's output may be a tensor (taken as "pool"), a tuple/list in FEATURE_KEYS order, or a dict with
    FEATURE_KEYS. Spatial outputs with more than 2 dims are flattened. Images are resized to `input_size`, gray
    images repeated to `in_channels`, and scaled to `value_range` ("0,1", "-1,1" or "0,255") before the call.
    """

    VALUE_RANGES = ("0,1", "-1,1", "0,255")

    def __init__(self, path: str | os.PathLike, input_size: int | None = None, in_channels: int | None = None,
                 value_range: str = "0,1"):
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: no extractor module at {path}")
        if value_range not in self.VALUE_RANGES:
            raise ValueError(f"value_range: expected one of {self.VALUE_RANGES}, got {value_range!r}")
        try:
            if path.suffix == ".pt2":
                self.module = torch.export.load(str(path)).module()
            else:
                self.module = torch.jit.load(str(path), map_location="cpu")
        except Exception as error:
            raise ValueError(f"path: {path} is not a TorchScript or torch.export module ({error})") from error
        self.input_size, self.in_channels, self.value_range = input_size, in_channels, value_range
        self.fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.input_size is not None:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False)
        if self.in_channels is not None and images.shape[1] != self.in_channels:
            if images.shape[1] != 1:
                raise ValueError(f"images: {images.shape[1]} channels cannot feed a {self.in_channels}-channel module")
            images = images.expand(-1, self.in_channels, -1, -1)
        if self.value_range == "-1,1":
            images = 2 * images - 1
        elif self.value_range == "0,255":
            images = images * 255
        out = self.module(images)
        if isinstance(out, torch.Tensor):
            out = {"pool": out}
        elif isinstance(out, (tuple, list)):
            out = dict(zip(FEATURE_KEYS, out))
        elif not isinstance(out, dict):
            raise TypeError(f"extractor returned {type(out).__name__}; expected a tensor, tuple or dict")
        return {key: (value.flatten(1) if value.ndim > 2 else value) for key, value in out.items()
                if key in FEATURE_KEYS and value is not None}


#################################################################################
#                   (c) Text tower of a local text encoder                      #
#################################################################################

class TextTower:
    """Text side of a CLIP-style pair: a TorchScript module mapping list[str] -> [B, D] in the image tower's space."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: no text tower module at {path}")
        try:
            self.module = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as error:
            raise ValueError(f"path: {path} is not a TorchScript module ({error})") from error
        self.fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    @torch.no_grad()
    def __call__(self, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts) or not prompts:
            raise TypeError("prompts: expected a non-empty list of str")
        chunks = [self.module(list(prompts[i:i + batch_size])) for i in range(0, len(prompts), batch_size)]
        embeddings = torch.cat(chunks).double()
        if embeddings.ndim != 2 or len(embeddings) != len(prompts):
            raise ValueError(f"text tower returned shape {tuple(embeddings.shape)}; expected [{len(prompts)}, D]")
        return embeddings


def extractor_fingerprint(extractor: nn.Module) -> str:
    """File hash for loaded modules, weight hash for modules built here."""
    return getattr(extractor, "fingerprint", None) or _state_fingerprint(extractor)
