"""Training data: the .npz class data sets (MNIST, Fashion-MNIST), image folders (class per sub-folder, captions from
a sidecar `captions.json`) and scikit-learn's 8x8 digits (the embedded default), held in memory as uint8 at a
fixed storage size. Augmentation (random flip / crop) runs per batch and emits the control metadata of paper 2
(crop top, crop left, original h, original w, flip). The data order is a seeded permutation per epoch over an
infinite stream, indexed by images seen, so a resumed run reads exactly the same batches."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Control metadata columns (paper 2), in the order of the models' `control` argument.
CONTROL_FIELDS = ("crop_top", "crop_left", "original_height", "original_width", "flip")

NPZ_DATASETS = {"mnist": "mnist.npz", "fashion-mnist": "fashion_mnist.npz"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
CAPTION_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of the {}.", "a {}.")


class DatasetError(ValueError):
    """A data set that is missing or malformed; the message names the path and what is wrong."""


@dataclass
class ImageDataset:
    images: torch.Tensor  # uint8 [N, C, S, S] at storage size
    original_sizes: torch.Tensor  # int64 [N, 2]: (h, w) before any resizing (control metadata)
    class_names: list[str]
    labels: torch.Tensor | None = None  # int64 [N]
    captions: list[str] | None = None
    name: str = ""

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ----------------------------------------------------------------------------------------------------------------
# Loading.

def load_dataset(name: str, data_path: str | None = None, split: str = "train", image_size: int = 8,
                 channels: int = 1, resize: str = "resize", crop_margin: int = 0) -> ImageDataset:
    """`name` is "digits", "mnist", "fashion-mnist" (found in `data_path`), a path to an .npz file or to an image
    folder. Images are fitted to a square of `image_size + crop_margin` pixels (the margin leaves room for random
    crops) by `resize` ("resize": short side resized, centre crop; "pad": centred zero padding, no resampling)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if resize not in ("resize", "pad"):
        raise ValueError(f"resize must be 'resize' or 'pad', got {resize!r}")
    if crop_margin < 0:
        raise ValueError(f"crop_margin must be >= 0, got {crop_margin!r}")
    store_size = image_size + crop_margin
    if name == "digits":
        images, labels, class_names = _load_digits(split)
    elif name in NPZ_DATASETS:
        if data_path is None:
            raise DatasetError(f"data set {name!r} needs --data-path, the folder that holds {NPZ_DATASETS[name]}")
        images, labels, class_names = _load_npz(Path(data_path) / NPZ_DATASETS[name], split)
    elif name.endswith(".npz"):
        images, labels, class_names = _load_npz(Path(name), split)
    else:
        return _load_image_folder(Path(name), store_size, channels)
    original_sizes = torch.tensor(images.shape[1:3]).expand(images.shape[0], 2).clone()
    images = torch.from_numpy(images).unsqueeze(1)  # [N, 1, H, W]
    if channels == 3:
        images = images.expand(-1, 3, -1, -1)
    images = fit_to_size(images, store_size, resize)
    return ImageDataset(images.contiguous(), original_sizes, class_names, torch.from_numpy(labels), name=name)


def _load_digits(split: str):
    from sklearn.datasets import load_digits  # shipped with scikit-learn: no download

    if split != "train":
        raise DatasetError("data set 'digits' (scikit-learn load_digits) has only a 'train' split")
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # pixel values 0..16 -> 0..255
    return images, digits.target.astype(np.int64), [str(i) for i in range(10)]


def _load_npz(path: Path, split: str):
    if not path.is_file():
        raise DatasetError(f"data set {path}: file does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
        keys = set(archive.files)
    except Exception as error:  # a truncated or non-zip file raises several unrelated types
        raise DatasetError(f"data set {path}: not a readable .npz archive ({error})") from error
    needed = {f"x_{split}", f"y_{split}", "class_names"}
    if not needed <= keys:
        raise DatasetError(f"data set {path}: missing arrays {sorted(needed - keys)} (has {sorted(keys)})")
    try:
        images, labels = archive[f"x_{split}"], archive[f"y_{split}"]
        class_names = [str(name) for name in archive["class_names"].tolist()]
    except Exception as error:
        raise DatasetError(f"data set {path}: arrays cannot be read ({error})") from error
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DatasetError(f"data set {path}: x_{split} must be uint8 [N, H, W], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"data set {path}: y_{split} must be integer [N] matching x_{split}, got "
                           f"{labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DatasetError(f"data set {path}: y_{split} has labels outside 0..{len(class_names) - 1}")
    return images, labels.astype(np.int64), class_names


def _load_image_folder(root: Path, store_size: int, channels: int) -> ImageDataset:
    """root/<class name>/<image> (optional root/captions.json maps "<class>/<file>" to a caption) or tar shards,
    decoded here, all at once, by the streamed source's own reader (training/sources.py)."""
    from training.sources import StreamedImages, index_folder, is_streamed, open_stream

    if is_streamed(str(root)):
        index = open_stream(str(root))
    elif root.is_dir():
        index = index_folder(root)
    else:
        raise DatasetError(f"data set {root}: not a known data set name, an .npz file, an existing folder or tar "
                           f"shards")
    items = [StreamedImages(index, store_size, channels)[i] for i in range(len(index))]
    captions = None if index.captions is None else [index.captions[i] for i in range(len(index))]
    return ImageDataset(torch.stack([image for _, image, _ in items]), torch.stack([size for _, _, size in items]),
                        index.class_names, index.labels, captions, name=str(root))


def fit_to_size(images: torch.Tensor, size: int, mode: str = "resize") -> torch.Tensor:
    """uint8 [N, C, H, W] -> uint8 [N, C, size, size]. "resize": short side to `size` (antialiased), centre crop;
    "pad": centred zero padding (the image must not be larger than `size`)."""
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    if mode == "pad":
        if height > size or width > size:
            raise ValueError(f"resize='pad' needs images no larger than {size}, got {height}x{width}")
        top, left = (size - height) // 2, (size - width) // 2
        return F.pad(images, (left, size - width - left, top, size - height - top))
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    resized = F.interpolate(images.float(), size=(new_h, new_w), mode="bilinear", antialias=True,
                            align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[..., top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Per-batch augmentation and captions.

def augment(images: torch.Tensor, original_sizes: torch.Tensor, image_size: int, hflip: bool,
            random_crop: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [B, C, S, S] (S >= image_size) -> (float [B, C, image_size, image_size] in [-1, 1], control [B, 5]).
    Without random_crop the crop is centred; control holds (crop top, crop left, original h, original w, flip)."""
    batch, store_size = images.shape[0], images.shape[-1]
    margin = store_size - image_size
    if random_crop and margin > 0:
        offsets = torch.randint(0, margin + 1, (batch, 2), generator=generator)
    else:
        offsets = torch.full((batch, 2), centre_offset(store_size, image_size), dtype=torch.int64)
    flips = torch.rand(batch, generator=generator) < 0.5 if hflip else torch.zeros(batch, dtype=torch.bool)
    crops = crop(images, offsets[:, 0], offsets[:, 1], image_size)
    crops = torch.where(flips[:, None, None, None], crops.flip(-1), crops)
    x = crops.float() / 127.5 - 1.0
    return x, control_metadata(offsets, original_sizes, flips)


def crop(images: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, S, S] -> [B, C, size, size], image i cropped at (tops[i], lefts[i])."""
    return torch.stack([image[:, top:top + size, left:left + size]
                        for image, top, left in zip(images, tops.tolist(), lefts.tolist())])


def control_metadata(offsets: torch.Tensor, original_sizes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Paper 2's control vector per image, float [B, 5] in CONTROL_FIELDS order: the one builder for training
    batches (pixels and latents) and, via sampling_control, for sampling."""
    return torch.cat([offsets.long(), original_sizes.long(), flips[:, None].long()], dim=1).float()


def centre_offset(store_size: int, image_size: int) -> int:
    """Crop offset (top = left) of the centre crop that augment takes without random_crop."""
    return (store_size - image_size) // 2


def sampling_control(original_sizes: torch.Tensor, store_size: int, image_size: int) -> list[float]:
    """The in-distribution control vector sampling uses by default: the centre crop, the data set's most common
    original size, no flip (a size the model saw in training, unlike the model resolution)."""
    sizes, counts = torch.unique(original_sizes, dim=0, return_counts=True)
    offset = torch.full((1, 2), centre_offset(store_size, image_size))
    return control_metadata(offset, sizes[counts.argmax()][None], torch.zeros(1, dtype=torch.bool))[0].tolist()


def template_captions(labels: torch.Tensor, class_names: list[str], generator: torch.Generator) -> list[str]:
    """Captions for text-conditional runs on class data sets: a random template filled with the class name."""
    choice = torch.randint(0, len(CAPTION_TEMPLATES), (len(labels),), generator=generator)
    return [CAPTION_TEMPLATES[c].format(class_names[y]) for c, y in zip(choice.tolist(), labels.tolist())]


# ----------------------------------------------------------------------------------------------------------------
# Data order.

class DataOrder:
    """An infinite stream of data-set indices: epoch e is randperm(N) seeded by (seed, e). Position p of the stream
    is the p-th image the whole job has seen, so (images seen) alone restores the order on resume, for any number
    of processes (edm2's InfiniteSampler(start_idx=cur_nimg) idea)."""

    def __init__(self, num_items: int, seed: int):
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.num_items, self.seed = num_items, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(hash_seed(self.seed, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.num_items, generator=generator)
        return self._perm

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Stream positions [start, start + count) -> data-set indices, Long[count]."""
        positions = torch.arange(start, start + count)
        out = torch.empty(count, dtype=torch.int64)
        for epoch in torch.unique(positions // self.num_items).tolist():
            mask = positions // self.num_items == epoch
            out[mask] = self._permutation(epoch)[positions[mask] % self.num_items]
        return out


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of ints (seed, rank, step, ...), stable across runs and Python versions."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class PixelSource:
    """Training inputs in pixel space: uint8 images augmented per batch -> (x [-1, 1], control)."""

    def __init__(self, dataset: ImageDataset, image_size: int, hflip: bool, random_crop: bool):
        self.dataset, self.image_size, self.hflip, self.random_crop = dataset, image_size, hflip, random_crop

    def batch(self, indices: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return augment(self.dataset.images[indices], self.dataset.original_sizes[indices], self.image_size,
                       self.hflip, self.random_crop, generator)
