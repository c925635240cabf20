"""Latents encoded once (training/encode_latents.py) into fixed-size shards and read memory-mapped by training.

    DIR/spec.json                 what was encoded (data set, resolution, autoencoder file, shard size); a re-run with
                                  other settings is refused
    DIR/shard-00000.safetensors   items [0, S), a few large arrays (never a file per image, fast-DiT's bottleneck):
        latents [n, c, h, w] f32            scaled latents: VQ pre-quantisation output, KL posterior mean
        latents_std [n, c, h, w] f32        KL only: scaled posterior std, for a fresh posterior sample per step
        flipped, flipped_std                with --hflip: the same for the mirrored image (flipping a latent only
                                            approximates encoding the mirrored image, so both are encoded, as fast-DiT)
        original_sizes [n, 2] i64           (h, w) before resizing (paper 2's control metadata)
        labels [n] i64                      class labels, when the data set has them
        caption_bytes [bytes] u8, caption_offsets [n + 1] i64     utf-8 captions, when it has them
    DIR/manifest.json             written last: item count, shard size, latent shape, class names

Shards hold clean conditions: the corruption (label flips, caption swaps) is a property of a run, seeded by its seed
and eta and saved in its run dir, so one latent cache serves the clean run and every eta. Each shard file is written
atomically (safetensors, temp file, rename), so a finished shard is never re-encoded and never half-written.
Readers map the safetensors arrays with numpy (offsets from its JSON header): memory stays flat as the set grows.
"""
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from training.checkpoint import atomic_write
from training.data import DatasetError

SPEC, MANIFEST = "spec.json", "manifest.json"
NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "U8": np.uint8, "BOOL": np.bool_}


def shard_path(root, shard: int) -> Path:
    return Path(root) / f"shard-{shard:05d}.safetensors"


def write_shard(path: Path, arrays: dict[str, torch.Tensor]) -> None:
    atomic_write(path, lambda temporary: save_file({k: v.contiguous() for k, v in arrays.items()}, str(temporary)))


def pack_captions(captions: list[str]) -> dict[str, torch.Tensor]:
    encoded = [c.encode() for c in captions]
    offsets = torch.tensor([0] + [len(e) for e in encoded], dtype=torch.int64).cumsum(0)
    return {"caption_bytes": torch.frombuffer(bytearray(b"".join(encoded)) or bytearray(1), dtype=torch.uint8),
            "caption_offsets": offsets}


def map_shard(path: Path) -> dict[str, np.ndarray]:
    """name -> read-only np.memmap of a safetensors file (nothing is read until indexed)."""
    try:
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_size))
        header.pop("__metadata__", None)
        data_size = max((info["data_offsets"][1] for info in header.values()), default=0)
        if path.stat().st_size < 8 + header_size + data_size:
            raise DatasetError(f"--latents shard {path} is truncated; delete it and re-run the encode command")
        arrays = {}
        for name, info in header.items():
            start, end = info["data_offsets"]
            dtype, shape = NUMPY_DTYPES[info["dtype"]], tuple(info["shape"])
            arrays[name] = (np.memmap(path, dtype, mode="r", offset=8 + header_size + start, shape=shape)
                            if end > start else np.zeros(shape, dtype))
    except (OSError, KeyError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"--latents shard {path} is unreadable ({error}); delete it and re-run the encode "
                           f"command") from error
    return arrays


class LatentShards:
    """All shards of an encoded data set, memory-mapped. Has the catalogue attributes training needs (labels,
    captions, class names, len) so it stands in for an ImageDataset when choosing the corruption."""

    def __init__(self, root):
        self.root = Path(root)
        manifest_file = self.root / MANIFEST
        if not manifest_file.is_file():
            raise DatasetError(f"--latents {root}: no {MANIFEST} (run training.encode_latents to completion first)")
        self.manifest = json.loads(manifest_file.read_text())
        self.shard_size, self.num_items = self.manifest["shard_size"], self.manifest["num_items"]
        self.shards = [map_shard(shard_path(root, k)) for k in range(self.manifest["num_shards"])]
        self.class_names = self.manifest["class_names"]
        self.name = str(root)
        self.labels = torch.from_numpy(np.concatenate([s["labels"] for s in self.shards])) \
            if "labels" in self.shards[0] else None
        self.captions = ShardCaptions(self) if "caption_offsets" in self.shards[0] else None

    def __len__(self) -> int:
        return self.num_items

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def has(self, name: str) -> bool:
        return name in self.shards[0]

    def gather(self, name: str, indices: torch.Tensor) -> torch.Tensor:
        """Rows `indices` (global item numbers) of one array, read shard by shard."""
        first = self.shards[0][name]
        out = np.empty((len(indices), *first.shape[1:]), dtype=first.dtype)
        indices = indices.numpy()
        shard_of = indices // self.shard_size
        for shard in np.unique(shard_of):
            rows = shard_of == shard
            out[rows] = self.shards[shard][name][indices[rows] - shard * self.shard_size]
        return torch.from_numpy(out)


class ShardedArray:
    """One array of the shards, indexable by a tensor of item numbers like an in-memory tensor."""

    def __init__(self, shards: LatentShards, name: str):
        self.shards, self.name = shards, name
        self.shape = (shards.num_items, *shards.shards[0][name].shape[1:])

    def __getitem__(self, indices: torch.Tensor) -> torch.Tensor:
        return self.shards.gather(self.name, indices)


class ShardCaptions:
    def __init__(self, shards: LatentShards):
        self.shards = shards

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int) -> str:
        shard = self.shards.shards[i // self.shards.shard_size]
        local = i % self.shards.shard_size
        start, end = shard["caption_offsets"][local:local + 2]
        return shard["caption_bytes"][start:end].tobytes().decode()
