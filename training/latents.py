"""The LDM path: training inputs are an autoencoder's latents, encoded once and cached in the run dir
(run_dir/latents.pt), with horizontally flipped copies when flips are on (flipping latents only approximates
encoding a flipped image, so both orientations are encoded); with random crops, encoded per batch."""
from pathlib import Path

import torch

from models.autoencoder import AutoencoderKL, load_autoencoder
from training import distributed
from training.checkpoint import atomic_write
from training.data import ImageDataset, PixelSource, augment, centre_offset, control_metadata

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
    x, _ = augment(dataset.images[:1], dataset.original_sizes[:1], config["data"]["image_size"], False, False,
                   torch.Generator())
    with torch.no_grad():
        return tuple(autoencoder.encode(x.to(device)).shape[1:])


class LatentSource:
    """Cached latents [N, C, h, w] (+ flipped copies) -> (x, control) batches."""

    def __init__(self, latents: torch.Tensor, flipped: torch.Tensor | None, original_sizes: torch.Tensor,
                 crop_offset: int, std: torch.Tensor | None = None, flipped_std: torch.Tensor | None = None):
        """`latents`, `flipped`, `std`: tensors or memory-mapped latent_shards.ShardedArray. With `std` (a KL
        posterior's scaled std) each batch draws a fresh posterior sample, as LDM and DiT do when encoding on the
        fly; without it the stored latent (VQ latent, KL mean) is used as is."""
        self.latents, self.flipped, self.original_sizes, self.crop_offset = latents, flipped, original_sizes, crop_offset
        self.std, self.flipped_std = std, flipped_std

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
        autoencoder_file(spec["autoencoder"])  # sampling decodes with it: a missing file fails now, not after training
        sample = (config.get("latent") or {}).get("posterior", "mean") == "sample" and shards.has("latents_std")
        arrays = {name: ShardedArray(shards, name) if shards.has(name) else None
                  for name in ("latents", "flipped", "latents_std", "flipped_std")}
        # encode_latents encodes at the storage size (no crop margin): the crop offset is 0.
        return cls(arrays["latents"], arrays["flipped"] if data["hflip"] else None,
                   ShardedArray(shards, "original_sizes"), 0,
                   arrays["latents_std"] if sample else None, arrays["flipped_std"] if sample and data["hflip"] else None)

    @classmethod
    def build(cls, dataset: ImageDataset, config: dict, run_dir: Path | None, rank: int, device) -> "LatentSource":
        data, path = config["data"], autoencoder_file(config["latent"]["autoencoder"])
        autoencoder, _ = load_autoencoder(path, map_location=device)
        # The cache is valid for this exact autoencoder file and data selection.
        key = {"autoencoder": str(path.resolve()), "mtime": path.stat().st_mtime_ns, "hflip": data["hflip"],
               **{k: data[k] for k in ("dataset", "path", "split", "image_size", "channels", "resize")}}
        cache = run_dir / "latents.pt" if run_dir is not None else None
        if rank == 0 and (cache is None or not cache.exists() or torch.load(cache, weights_only=True)["key"] != key):
            encoded = encode_dataset(autoencoder, dataset, data["image_size"], data["hflip"], device)
            if cache is not None:
                atomic_write(cache, lambda temporary: torch.save({"key": key, **encoded}, temporary))
        distributed.barrier()
        if cache is not None:
            encoded = torch.load(cache, weights_only=True)
        crop_offset = centre_offset(dataset.images.shape[-1], data["image_size"])  # encode_dataset's centre crop
        return cls(encoded["latents"], encoded.get("flipped"), dataset.original_sizes, crop_offset)

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
        offsets = torch.full((len(indices), 2), self.crop_offset, dtype=torch.int64)
        return x, control_metadata(offsets, self.original_sizes[indices], flips)


class EncodedCropSource:
    """Random crops on the LDM path, as SDXL trains: each batch's pixel crops (with their offsets and flips as
    control metadata) are encoded by the frozen autoencoder. Cropping cached latents instead is cheaper but wrong:
    the crop of an encoding is not the encoding of the crop (convolutions see past the crop's edge)."""

    def __init__(self, pixels: PixelSource, autoencoder, device):
        self.pixels, self.autoencoder, self.device = pixels, autoencoder, device

    @classmethod
    def build(cls, dataset: ImageDataset, config: dict, device) -> "EncodedCropSource":
        data = config["data"]
        autoencoder, _ = load_autoencoder(autoencoder_file(config["latent"]["autoencoder"]), map_location=device)
        return cls(PixelSource(dataset, data["image_size"], data["hflip"], random_crop=True), autoencoder, device)

    @torch.no_grad()
    def batch(self, indices: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, control = self.pixels.batch(indices, generator)
        return self.autoencoder.encode(x.to(self.device)).float(), control


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
