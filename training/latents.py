"""The LDM path: training inputs are an autoencoder's latents, encoded once and cached in the run dir
(run_dir/latents.pt), with horizontally flipped copies when flips are on (flipping latents only approximates
encoding a flipped image, so both orientations are encoded)."""
from pathlib import Path

import torch

from models.autoencoder import AutoencoderKL, load_autoencoder
from training import distributed
from training.checkpoint import atomic_write
from training.data import ImageDataset, augment, centre_offset, control_metadata, crop

ENCODE_BATCH = 256


def autoencoder_file(path) -> Path:
    """An autoencoder checkpoint: the file itself, or run_dir/autoencoder.pt of a train_autoencoder run."""
    path = Path(path)
    path = path / "autoencoder.pt" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"--autoencoder {path} does not exist (expected a train_autoencoder run dir or .pt file)")
    return path


def encoded_shape(config: dict, dataset: ImageDataset, device) -> tuple[int, int, int]:
    """(C, h, w) of the run's latents, from one encoded image (nothing cached: the run dir is not checked yet)."""
    autoencoder, _ = load_autoencoder(autoencoder_file(config["latent"]["autoencoder"]), map_location=device)
    margin = dataset.images.shape[-1] - config["data"]["image_size"]
    if margin % autoencoder.downsample_factor:
        raise ValueError(f"--set data.crop_margin={margin}: must be a multiple of the autoencoder's downsampling "
                         f"factor {autoencoder.downsample_factor} (random crops of latents move in whole latent cells)")
    x, _ = augment(dataset.images[:1], dataset.original_sizes[:1], config["data"]["image_size"], False, False,
                   torch.Generator())
    with torch.no_grad():
        return tuple(autoencoder.encode(x.to(device)).shape[1:])


class LatentSource:
    """Cached latents [N, C, h, w] (+ flipped copies) -> (x, control) batches; `decode` maps samples to pixels."""

    def __init__(self, latents: torch.Tensor, flipped: torch.Tensor | None, original_sizes: torch.Tensor,
                 crop_offset: int, autoencoder, std: torch.Tensor | None = None,
                 flipped_std: torch.Tensor | None = None, crop_size: int | None = None):
        """`latents`, `flipped`, `std`: tensors or memory-mapped latent_shards.ShardedArray. With `std` (a KL
        posterior's scaled std) each batch draws a fresh posterior sample, as LDM and DiT do when encoding on the
        fly; without it the stored latent (VQ latent, KL mean) is used as is. With `crop_size` (latent cells) the
        latents are of the whole stored image and each batch takes random crops (crop_offset is then unused)."""
        self.latents, self.flipped, self.original_sizes, self.crop_offset = latents, flipped, original_sizes, crop_offset
        self.std, self.flipped_std = std, flipped_std
        self.crop_size = crop_size
        self.autoencoder = autoencoder
        self.shape = (latents.shape[1], crop_size, crop_size) if crop_size else tuple(latents.shape[1:])

    @classmethod
    def from_shards(cls, shards, config: dict, device) -> "LatentSource":
        """Latents encoded by training.encode_latents (--latents DIR), read memory-mapped."""
        from training.latent_shards import ShardedArray

        data, spec = config["data"], shards.manifest
        if data["random_crop"]:
            raise ValueError("--random-crop is not supported with --latents (latents are encoded once)")
        if data.get("image_size", spec["image_size"]) != spec["image_size"]:
            raise ValueError(f"--image-size {data['image_size']} differs from the {spec['image_size']} px that "
                             f"{shards.root} was encoded at")
        if data["hflip"] and not shards.has("flipped"):
            raise ValueError(f"--hflip needs flipped latents: encode {shards.root} with --hflip")
        autoencoder, _ = load_autoencoder(autoencoder_file(spec["autoencoder"]), map_location=device)
        sample = (config.get("latent") or {}).get("posterior", "mean") == "sample" and shards.has("latents_std")
        arrays = {name: ShardedArray(shards, name) if shards.has(name) else None
                  for name in ("latents", "flipped", "latents_std", "flipped_std")}
        # encode_latents encodes at the storage size (no crop margin): the crop offset is 0.
        return cls(arrays["latents"], arrays["flipped"] if data["hflip"] else None,
                   ShardedArray(shards, "original_sizes"), 0, autoencoder,
                   arrays["latents_std"] if sample else None, arrays["flipped_std"] if sample and data["hflip"] else None)

    @classmethod
    def build(cls, dataset: ImageDataset, config: dict, run_dir: Path | None, rank: int, device) -> "LatentSource":
        data, path = config["data"], autoencoder_file(config["latent"]["autoencoder"])
        autoencoder, _ = load_autoencoder(path, map_location=device)
        store_size, factor = dataset.images.shape[-1], autoencoder.downsample_factor
        # Random crops of cached latents (paper 2's crop conditioning on an LDM): the stored image (image_size +
        # crop_margin, a whole number of latent cells: encoded_shape checks) is encoded whole and each batch crops it.
        crop_size = data["image_size"] // factor if data["random_crop"] else None
        encode_size = store_size if crop_size else data["image_size"]
        # The cache is valid for this exact autoencoder file and data selection.
        key = {"autoencoder": str(path.resolve()), "mtime": path.stat().st_mtime_ns, "hflip": data["hflip"],
               **{k: data[k] for k in ("dataset", "path", "split", "channels", "resize")}, "image_size": encode_size}
        cache = run_dir / "latents.pt" if run_dir is not None else None
        if rank == 0 and (cache is None or not cache.exists() or torch.load(cache, weights_only=True)["key"] != key):
            encoded = encode_dataset(autoencoder, dataset, encode_size, data["hflip"], device)
            if cache is not None:
                atomic_write(cache, lambda temporary: torch.save({"key": key, **encoded}, temporary))
        distributed.barrier()
        if cache is not None:
            encoded = torch.load(cache, weights_only=True)
        crop_offset = centre_offset(store_size, data["image_size"])  # encode_dataset's centre crop
        return cls(encoded["latents"], encoded.get("flipped"), dataset.original_sizes, crop_offset, autoencoder,
                   crop_size=crop_size)

    def batch(self, indices: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.latents[indices]
        std = self.std[indices] if self.std is not None else None
        flips = torch.zeros(len(indices), dtype=torch.bool)
        if self.flipped is not None:
            flips = torch.rand(len(indices), generator=generator) < 0.5
            x = torch.where(flips[:, None, None, None], self.flipped[indices], x)
            if std is not None:
                std = torch.where(flips[:, None, None, None], self.flipped_std[indices], std)
        if std is not None:
            x = x + std * torch.randn(x.shape, generator=generator)
        if self.crop_size:
            x, offsets = self.random_crops(x, flips, generator)
        else:
            offsets = torch.full((len(indices), 2), self.crop_offset, dtype=torch.int64)
        return x, control_metadata(offsets, self.original_sizes[indices], flips)

    def random_crops(self, x: torch.Tensor, flips: torch.Tensor, generator: torch.Generator):
        """Latents [B, C, L, L] of whole stored images -> (random crops [B, C, c, c], crop offsets in pixels [B, 2]),
        the offsets as augment reports them: (top, left) of the crop in the unflipped image."""
        span, size = x.shape[-1] - self.crop_size, self.crop_size
        cells = torch.randint(0, span + 1, (len(x), 2), generator=generator)
        # a flipped latent encodes the mirrored image: the crop at `left` of the image is at span - left there
        lefts = torch.where(flips, span - cells[:, 1], cells[:, 1])
        return crop(x, cells[:, 0], lefts, size), cells * self.autoencoder.downsample_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents.float())


@torch.no_grad()
def encode_dataset(autoencoder, dataset: ImageDataset, image_size: int, hflip: bool, device) -> dict:
    """Centre-cropped images in [-1, 1] -> scaled latents (posterior mean for KL), in batches."""
    orientations = {"latents": False, "flipped": True} if hflip else {"latents": False}
    out = {}
    for name, flip in orientations.items():
        chunks = []
        for start in range(0, len(dataset), ENCODE_BATCH):
            x = to_model_range(dataset.images[start:start + ENCODE_BATCH], image_size)
            chunks.append(autoencoder.encode((x.flip(-1) if flip else x).to(device)).float().cpu())
        out[name] = torch.cat(chunks)
    return out


def to_model_range(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [B, C, S, S] -> centre crop of image_size in [-1, 1] (what the autoencoder encodes)."""
    sizes = torch.zeros(len(images), 2, dtype=torch.int64)
    return augment(images, sizes, image_size, False, False, torch.Generator())[0]


@torch.no_grad()
def encode_moments(autoencoder, x: torch.Tensor, prefix: str = "latents") -> dict[str, torch.Tensor]:
    """{prefix: scaled latent (VQ pre-quantisation output, KL posterior mean)} and for a KL autoencoder
    {prefix + "_std": scaled posterior std}; encode(x) == out[prefix], encode(x, generator) == a draw from both."""
    if isinstance(autoencoder, AutoencoderKL):
        mean, logvar = autoencoder.moments(x)
        scale = autoencoder.scale_factor
        return {prefix: (mean * scale).float().cpu(), f"{prefix}_std": ((0.5 * logvar).exp() * scale).float().cpu()}
    return {prefix: autoencoder.encode(x).float().cpu()}
