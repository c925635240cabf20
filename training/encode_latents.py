r"""Encodes a data set once with a trained autoencoder into latent shards that training reads memory-mapped
(`training.train --latents DIR`). Every rank encodes its own shards (k = rank, rank + world, ...):

    torchrun --standalone --nproc_per_node=8 -m training.encode_latents --dataset /data/imagenet/train \
        --autoencoder runs/kl-f8-in1k --image-size 256 --hflip --out latents/in1k-256
    python -m training.encode_latents --dataset digits --autoencoder runs/ae --image-size 8 --out latents/digits

Re-running the same command skips finished shards (each is written atomically) and ends with the same files as an
uninterrupted run. Layout and contents: training/latent_shards.py.
"""
import argparse
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from models.autoencoder import load_autoencoder
from training import cli, distributed
from training.checkpoint import write_json
from training.latent_shards import MANIFEST, SPEC, map_shard, pack_captions, shard_path, write_shard
from training.latents import autoencoder_file, encode_moments, to_model_range
from training.sources import loader, open_images


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.encode_latents", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="image folder | tar shards (dir or glob) | digits | mnist | .npz")
    parser.add_argument("--data-path", default=None, help="folder holding mnist.npz / fashion_mnist.npz")
    parser.add_argument("--autoencoder", required=True, help="train_autoencoder run dir or autoencoder .pt")
    parser.add_argument("--out", required=True, help="output folder of shards + manifest.json")
    parser.add_argument("--image-size", type=int, required=True, help="resolution the autoencoder encodes")
    parser.add_argument("--resize", default="resize", choices=("resize", "pad"), help="fit images to --image-size")
    parser.add_argument("--hflip", action="store_true", help="also encode mirrored images (for --hflip training)")
    parser.add_argument("--shard-size", type=int, default=8192, help="items per shard")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    parser.add_argument("--num-workers", type=int, default=4, help="decoding worker processes per rank")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return parser


def parse_args(argv=None, parser=None) -> tuple[dict, bool]:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    for flag in ("image_size", "shard_size", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    if args.num_workers < 0:
        parser.error(f"--num-workers must be >= 0, got {args.num_workers}")
    return vars(args), not args.no_progress


def check_spec(out: Path, spec: dict) -> None:
    """Every rank refuses an --out that holds latents of other settings; rank 0 records the spec."""
    spec_file = out / SPEC
    if spec_file.exists():
        old = json.loads(spec_file.read_text())
        if old != spec:
            changed = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
            raise ValueError(f"--out {out} holds latents encoded with other settings ({', '.join(changed)}); use a "
                             f"new --out or the original flags")
    distributed.barrier()
    if distributed.get_rank() == 0:
        write_json(spec_file, spec)


@torch.no_grad()
def encode_shards(autoencoder, images, catalogue, shards: list[int], args: dict, device, progress: bool) -> None:
    """Encodes and writes the given shards; one DataLoader (workers started once) runs over all their batches."""
    size, count, batch_size = args["shard_size"], len(images), args["batch_size"]
    plan = [(shard, list(range(b, min(b + batch_size, (shard + 1) * size, count))))
            for shard in shards for b in range(shard * size, min((shard + 1) * size, count), batch_size)]
    parts, batches = [], loader(images, [indices for _, indices in plan], args["num_workers"])
    for (shard, indices), (_, pixels, sizes) in tqdm(zip(plan, batches), total=len(plan), unit="batch",
                                                     disable=not progress):
        x = to_model_range(pixels, args["image_size"]).to(device)
        parts.append({"original_sizes": sizes.long(), **encode_moments(autoencoder, x)})
        if args["hflip"]:
            parts[-1].update(encode_moments(autoencoder, x.flip(-1), prefix="flipped"))
        if indices[-1] + 1 == min((shard + 1) * size, count):  # the shard's last batch
            start, end = shard * size, indices[-1] + 1
            arrays = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
            if catalogue.labels is not None:
                arrays["labels"] = catalogue.labels[start:end].clone()
            if catalogue.captions is not None:
                arrays.update(pack_captions([catalogue.captions[i] for i in range(start, end)]))
            write_shard(shard_path(args["out"], shard), arrays)
            parts = []


def encode_latents(args: dict, progress: bool = True) -> Path:
    device = distributed.init()
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    out, path = Path(args["out"]), autoencoder_file(args["autoencoder"])
    autoencoder, _ = load_autoencoder(path, map_location=device)
    images, catalogue = open_images(args["dataset"], args["data_path"], "train", args["image_size"],
                                    autoencoder.in_channels, args["resize"], stream=True)
    spec = {"dataset": args["dataset"], "data_path": args["data_path"], "image_size": args["image_size"],
            "resize": args["resize"], "hflip": args["hflip"], "shard_size": args["shard_size"],
            "autoencoder": str(path.resolve()), "autoencoder_mtime_ns": path.stat().st_mtime_ns,
            "num_items": len(images)}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".shard-*.tmp*"):  # left by a killed job; no rank writes before check_spec's barrier
            stale.unlink()
    check_spec(out, spec)
    num_shards = math.ceil(len(images) / args["shard_size"])
    mine = [k for k in range(rank, num_shards, world_size) if not shard_path(out, k).exists()]
    encode_shards(autoencoder, images, catalogue, mine, args, device, progress and rank == 0)
    distributed.barrier()
    if rank == 0:
        latent_shape = map_shard(shard_path(out, 0))["latents"].shape[1:]
        write_json(out / MANIFEST, {**spec, "num_shards": num_shards, "class_names": list(catalogue.class_names),
                                    "latent_shape": list(latent_shape)})
    distributed.barrier()
    return out


def main(argv=None) -> None:
    parser = build_parser()
    cli.run(parser, lambda: encode_latents(*parse_args(argv, parser)))  # user errors: one line, exit status 2


if __name__ == "__main__":
    main()
