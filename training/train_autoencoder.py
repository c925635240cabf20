r"""Trains the VQ / KL autoencoder whose latents the LDM path (train.py --autoencoder RUN_DIR) diffuses in.

    python -m training.train_autoencoder --preset vq-f4-tiny --dataset mnist --data-path ../shared/datasets \
        --image-size 32 --resize pad --run-dir runs/ae-mnist
    torchrun --standalone --nproc_per_node=2 -m training.train_autoencoder ...   # same, data-parallel

Resumable like train.py (re-run the same command); at the end the latent scale factor is fitted (LDM: 1/std of
the latents) and run_dir/autoencoder.pt is written (models.autoencoder.save_autoencoder format).
"""
import argparse
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from models.autoencoder import AUTOENCODER_PRESETS, build_autoencoder, save_autoencoder
from training import distributed
from training.checkpoint import atomic_write, latest_checkpoint, load_checkpoint, record_config, save_checkpoint
from training.data import DataOrder, augment, hash_seed
from training.presets import parse_override
from training.sources import loader, open_images, step_indices
from training.stats import RunLogger, crossed, save_image_grid

SCALE_FIT_IMAGES = 1024


def parse_args(argv=None) -> tuple[dict, Path, int]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=sorted(AUTOENCODER_PRESETS), help="autoencoder preset")
    parser.add_argument("--run-dir", required=True, help="output folder; re-running with it resumes")
    parser.add_argument("--dataset", default="digits",
                        help="digits | mnist | fashion-mnist | .npz | image folder | tar shards (dir or glob)")
    parser.add_argument("--stream", action="store_true", help="stream an image folder (tar shards always stream)")
    parser.add_argument("--num-workers", type=int, default=2, help="decoding worker processes per rank")
    parser.add_argument("--data-path", default=None, help="folder holding mnist.npz / fashion_mnist.npz")
    parser.add_argument("--image-size", type=int, default=8, help="training resolution in pixels")
    parser.add_argument("--resize", default="resize", help="resize | pad (fit images to --image-size)")
    parser.add_argument("--hflip", action="store_true", help="random horizontal flips")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--total-images", type=int, default=64_000, help="training length in images")
    parser.add_argument("--lr", type=float, default=4.5e-6 * 64, help="Adam learning rate (LDM: 4.5e-6 x batch)")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    parser.add_argument("--checkpoint-every-images", type=int, default=16_000, help="checkpoint interval")
    parser.add_argument("--keep-checkpoints", type=int, default=2, help="keep the newest K checkpoints")
    parser.add_argument("--seed", type=int, default=0, help="run seed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="autoencoder constructor override, e.g. --set n_embed=128")
    args = parser.parse_args(argv)
    overrides = dict(parse_override(item) for item in args.set)
    config = {"autoencoder": {"preset": args.preset, **overrides}, "seed": args.seed,
              "data": {"dataset": args.dataset, "path": args.data_path, "image_size": args.image_size,
                       "resize": args.resize, "hflip": args.hflip, "stream": args.stream,
                       "channels": AUTOENCODER_PRESETS[args.preset]["in_channels"]},
              "training": {"batch_size": args.batch_size, "total_images": args.total_images, "lr": args.lr,
                           "grad_clip": args.grad_clip},
              "logging": {"checkpoint_every_images": args.checkpoint_every_images,
                          "keep_checkpoints": args.keep_checkpoints}}
    for flag, value in (("--batch-size", args.batch_size), ("--total-images", args.total_images),
                        ("--checkpoint-every-images", args.checkpoint_every_images)):
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    if not 0 < args.lr < math.inf:
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr}")
    return config, Path(args.run_dir), args.num_workers


def train_autoencoder(config: dict, run_dir: Path, num_workers: int = 0) -> dict:
    device = distributed.init()
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    training, data = config["training"], config["data"]
    if training["batch_size"] % world_size:
        raise ValueError(f"--batch-size {training['batch_size']} must be divisible by processes ({world_size})")
    run_dir.mkdir(parents=True, exist_ok=True)
    record_config(run_dir, config)
    logger = RunLogger(run_dir, rank)
    images, _ = open_images(data["dataset"], data["path"], "train", data["image_size"], data["channels"],
                            data["resize"], data.get("stream", False))
    torch.manual_seed(hash_seed(config["seed"], 0xA11))
    model = build_autoencoder(config["autoencoder"]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=training["lr"], betas=(0.5, 0.9))  # LDM's first stage
    images_seen = 0
    latest = distributed.broadcast_object(str(latest_checkpoint(run_dir) or "") if rank == 0 else None)
    if latest:
        state = load_checkpoint(latest, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        images_seen = state["images_seen"]
        logger.log(f"resumed from {latest} at {images_seen} images")
    order = DataOrder(len(images), hash_seed(config["seed"], 0xDA7A))
    batches = iter(loader(images, step_indices(order, images_seen, training["total_images"], training["batch_size"],
                                               world_size, rank, 1), num_workers))  # workers decode streamed images
    record, started = {}, time.perf_counter()
    while images_seen < training["total_images"]:
        step_seed = hash_seed(config["seed"], rank, images_seen)
        torch.manual_seed(step_seed)  # the KL posterior sample draws from the global RNG
        _, pixels, sizes = next(batches)
        x, _ = augment(pixels, sizes, data["image_size"], data["hflip"], False,
                       torch.Generator().manual_seed(step_seed))
        loss, stats = model.loss(x.to(device))
        loss.backward()
        if world_size > 1:  # data parallel without DDP: the loss is a method, not forward, so average by hand
            for parameter in model.parameters():
                if parameter.grad is not None:
                    dist.all_reduce(parameter.grad)
                    parameter.grad /= world_size
        torch.nn.utils.clip_grad_norm_(model.parameters(), training["grad_clip"] or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        images_seen += training["batch_size"]
        done = images_seen >= training["total_images"]
        if done or crossed(images_seen, training["batch_size"], config["logging"]["checkpoint_every_images"]):
            seconds, started = time.perf_counter() - started, time.perf_counter()
            record = {"images_seen": images_seen, **stats, "seconds": seconds}
            logger.stats(record)
            logger.log(f"kimg {images_seen / 1000:.1f} loss {stats['loss']:.4f} "
                       f"reconstruction {stats['reconstruction']:.4f}")
            if rank == 0:
                save_checkpoint(run_dir, images_seen, {"config": config, "images_seen": images_seen,
                                                       "model": model.state_dict(),
                                                       "optimizer": optimizer.state_dict()},
                                config["logging"]["keep_checkpoints"])
            distributed.barrier()
    if rank == 0:
        finish(model, images, config, run_dir, device, logger)
    distributed.barrier()
    return record


@torch.no_grad()
def finish(model, images, config, run_dir: Path, device, logger: RunLogger) -> None:
    """Fits the latent scale factor, writes autoencoder.pt and a reconstruction grid (top: input, bottom: output)."""
    model.eval()
    _, pixels, sizes = next(iter(loader(images, [list(range(min(SCALE_FIT_IMAGES, len(images))))], 0)))
    x, _ = augment(pixels, sizes, config["data"]["image_size"], False, False, torch.Generator())
    scale = model.fit_scale_factor(x.to(device))
    atomic_write(run_dir / "autoencoder.pt", lambda temporary: save_autoencoder(model, config["autoencoder"], temporary))
    reconstruction = model.decode(model.encode(x[:8].to(device))).cpu()
    save_image_grid(torch.cat([x[:8], reconstruction]), run_dir / "reconstructions.png", columns=8)
    logger.log(f"wrote {run_dir / 'autoencoder.pt'} (latent scale factor {scale:.4f})")


def main(argv=None) -> None:
    config, run_dir, num_workers = parse_args(argv)
    try:
        train_autoencoder(config, run_dir, num_workers)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
