"""Everything a run needs before its first step: the data set (with its fixed condition corruption, saved in the run
dir), the input source (pixels, or latents encoded once), and a run config completed with the data's shape."""
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from training.corruption import (CORRUPTION_KINDS, asymmetric_flip, check_ratio, class_prior, save_corruption,
                                 swap_captions, symmetric_flip)
from training.data import ImageDataset, PixelSource, hash_seed, load_dataset, sampling_control, template_captions
from training.sources import (StreamedImages, StreamedPixelSource, StreamIndex, header_sizes, is_streamed,
                              open_stream)

CONDITIONS = ("class", "text", "none")
# A small from-scratch text encoder (models/text_encoder.py); paper 1's bert-base cannot be downloaded here.
TEXT_ENCODER_DEFAULTS = {"vocab_size": 4096, "max_length": 16, "width": 64, "depth": 2, "num_heads": 2,
                         "padding": "zero"}


@dataclass
class TrainingData:
    source: object                      # PixelSource | latents.LatentSource: .batch(indices, generator)
    labels: torch.Tensor | None         # training labels after the fixed corruption, int64 [N]
    captions: list[str] | None          # training captions after the fixed corruption (text runs)
    prior: torch.Tensor | None          # class prior, for the on-the-fly random-flip baseline
    num_items: int


def load_training_data(config: dict):
    """The data set's catalogue (labels, captions, class names): an in-memory ImageDataset, the index of streamed
    images (tar shards; an image folder with data.stream) or memory-mapped latent shards (data.latents)."""
    data = config["data"]
    if data.get("latents"):
        from training.latent_shards import LatentShards

        return LatentShards(data["latents"])
    if is_streamed(data["dataset"], data.get("stream", False)):
        return open_stream(data["dataset"])
    return load_dataset(data["dataset"], data["path"], data["split"], data["image_size"], data["channels"],
                        data["resize"], store_margin(data))


def store_margin(data: dict) -> int:
    """Pixels stored beyond the model resolution, room for random crops."""
    return data["crop_margin"] if data["random_crop"] else 0


def latent_shape(config: dict, dataset, device) -> tuple[int, int, int] | None:
    """(C, h, w) of the latents the model sees, None in pixel space."""
    if config["data"].get("latents"):
        return tuple(dataset.manifest["latent_shape"])
    if not config.get("latent"):
        return None
    if isinstance(dataset, StreamIndex):
        raise ValueError("--autoencoder encodes the whole data set in memory; for streamed data encode once with "
                         "`python -m training.encode_latents --out DIR ...` and train with --latents DIR")
    from training.latents import encoded_shape

    return encoded_shape(config, dataset, device)


def size_statistics(dataset, data: dict) -> tuple[torch.Tensor, int]:
    """(original sizes, storage size) for the sampling control vector: all sizes in memory or in latent shards,
    the headers of the first images of a streamed set."""
    if isinstance(dataset, ImageDataset):
        return dataset.original_sizes, dataset.images.shape[-1]
    if isinstance(dataset, StreamIndex):
        return header_sizes(dataset), data["image_size"] + store_margin(data)
    return dataset.gather("original_sizes", torch.arange(len(dataset))), data["image_size"]  # encoded uncropped


def input_source(config: dict, dataset, run_dir: Path | None, rank: int, device):
    """What turns data-set indices into model inputs: latents (memory-mapped shards, or encoded once here with an
    autoencoder), streamed pixels decoded by worker processes, or in-memory pixels."""
    data = config["data"]
    if data.get("latents"):
        from training.latents import LatentSource

        return LatentSource.from_shards(dataset, config, device)
    if config.get("latent"):  # the LDM path: encode with a trained autoencoder, once or (random crops) per batch
        from training.latents import EncodedCropSource, LatentSource

        if data["random_crop"]:
            return EncodedCropSource.build(dataset, config, device)
        return LatentSource.build(dataset, config, run_dir, rank, device)
    if isinstance(dataset, StreamIndex):
        images = StreamedImages(dataset, data["image_size"] + store_margin(data), data["channels"], data["resize"])
        return StreamedPixelSource(images, data["image_size"], data["hflip"], data["random_crop"],
                                   data.get("num_workers", 0))
    return PixelSource(dataset, data["image_size"], data["hflip"], data["random_crop"])


def complete_config(config: dict, dataset: ImageDataset, latent_shape: tuple[int, int, int] | None) -> dict:
    """Fills the fields the data determines (class names, model input shape, number of classes, context width)."""
    data, model = config["data"], config["model"]
    if data["condition"] not in CONDITIONS:
        raise ValueError(f"data.condition must be one of {CONDITIONS}, got {data['condition']!r}")
    data["num_classes"], data["class_names"] = dataset.num_classes, list(dataset.class_names)
    channels, size = (latent_shape[0], latent_shape[1]) if latent_shape else (data["channels"], data["image_size"])
    model["in_channels"] = channels
    model["image_size" if model.get("arch") == "unet" else "input_size"] = size
    model["num_classes"] = dataset.num_classes if data["condition"] == "class" else 0
    if model.get("control_dim", 0):
        data["sample_control"] = sampling_control(*size_statistics(dataset, data), data["image_size"])
    if data["condition"] == "text":
        config["text_encoder"] = {**TEXT_ENCODER_DEFAULTS, **(config.get("text_encoder") or {})}
        model["context_dim"] = config["text_encoder"]["width"]
        if model.get("arch") == "dit":
            model["cond_mode"] = "cross-attention"
    return config


def transfer_defaults(config: dict) -> dict:
    """With --init-from on a DiT, positions are interpolated to the source run's grid unless set explicitly
    (paper 2 §2.2: interpolation beats extrapolation). The noise-schedule shift stays an explicit setting."""
    model = config["model"]
    if not config.get("init_from") or model.get("arch") != "dit" or "pos_embed_base_size" in model:
        return config
    from training.checkpoint import load_checkpoint, resolve_checkpoint

    source = Path(config["init_from"])
    if (source / "config.json").is_file():  # a run dir: read its config, not a (possibly huge) checkpoint
        source_model = json.loads((source / "config.json").read_text())["model"]
    else:
        source_model = load_checkpoint(resolve_checkpoint(source))["config"]["model"]
    model["pos_embed_base_size"] = source_model.get("pos_embed_base_size") or source_model["input_size"]
    return config


def model_input_shape(config: dict) -> tuple[int, int, int]:
    """(C, H, W) the denoiser sees: pixels, or latents on the LDM path."""
    model = config["model"]
    size = model["image_size" if model.get("arch") == "unet" else "input_size"]
    return model["in_channels"], size, size


def corrupt_conditions(config: dict, dataset: ImageDataset):
    """(labels, captions, class prior, record) after the fixed corruption, seeded by the run seed and so identical on
    every rank; `record` holds save_corruption's arguments. Labels are None in text runs, captions None in class runs."""
    corruption, condition = config["corruption"], config["data"]["condition"]
    kind, eta = corruption["kind"], check_ratio(corruption["ratio"])
    if kind not in CORRUPTION_KINDS:
        raise ValueError(f"--corruption must be one of {CORRUPTION_KINDS}, got {kind!r}")
    if eta == 0:
        kind = "none"
    seed = hash_seed(config["seed"], 0xC0)
    labels, captions, prior = dataset.labels, None, None
    if condition == "text":
        captions = dataset.captions
        if captions is None:  # class data set in a text run: template captions, fixed per image
            captions = template_captions(dataset.labels, dataset.class_names, torch.Generator().manual_seed(seed))
    if kind in ("symmetric", "asymmetric", "random") and condition != "class":
        raise ValueError(f"--corruption {kind} flips class labels; it needs data.condition 'class'")
    if kind == "caption-swap" and condition != "text":
        raise ValueError("--corruption caption-swap needs data.condition 'text'")
    if condition == "class":
        prior = class_prior(labels, dataset.num_classes)
    clean_labels, clean_captions, indices = labels, captions, torch.zeros(0, dtype=torch.int64)
    if kind == "symmetric":
        labels, indices = symmetric_flip(labels, dataset.num_classes, eta, seed, prior)
    elif kind == "asymmetric":
        if not corruption.get("classes"):
            raise ValueError("--corruption asymmetric needs --corruption-classes (the class subset)")
        labels, indices = asymmetric_flip(labels, dataset.num_classes, eta, seed, corruption["classes"], prior)
    elif kind == "caption-swap":
        captions, indices = swap_captions(captions, eta, seed)
    record = (kind, eta, clean_labels, labels, indices, clean_captions, captions if clean_captions is not None else None)
    return (labels if condition == "class" else None), captions, prior, record


def prepare(config: dict, run_dir: Path | None, rank: int, device, check_run_dir=None) -> tuple[dict, TrainingData]:
    """(completed config, training data) for a run. `check_run_dir(config)` sees the completed config before anything
    is written to the run dir (the corruption record, cached latents), so a refused command leaves it untouched."""
    dataset = load_training_data(config)
    if config["data"].get("latents"):  # samples decode with the autoencoder that encoded the shards
        config["latent"] = {**(config.get("latent") or {}), "autoencoder": dataset.manifest["autoencoder"]}
    labels, captions, prior, corruption = corrupt_conditions(config, dataset)
    config = transfer_defaults(complete_config(config, dataset, latent_shape(config, dataset, device)))
    if check_run_dir is not None:
        check_run_dir(config)
    if rank == 0 and run_dir is not None:
        save_corruption(run_dir / "corruption.npz", *corruption)
    source = input_source(config, dataset, run_dir, rank, device)
    return config, TrainingData(source, labels, captions, prior, len(dataset))
