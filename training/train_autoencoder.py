r"""Trains the VQ / KL autoencoder whose latents the LDM path (train.py --autoencoder RUN_DIR) diffuses in.

    python -m training.train_autoencoder --preset vq-f4-tiny --dataset mnist --data-path ../shared/datasets \
        --image-size 32 --resize pad --run-dir runs/ae-mnist
    torchrun --standalone --nproc_per_node=2 -m training.train_autoencoder ...   # same, data-parallel (DDP)

Same run skeleton and CLI dialect as train.py (training/run.py, --set with dotted config keys, --no-progress);
re-running the same command resumes. At the end the latent scale factor is fitted (LDM: 1/std of the latents) and
run_dir/autoencoder.pt is written (models.autoencoder.save_autoencoder format).
"""
import argparse
import copy
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from models.autoencoder import AUTOENCODER_PRESETS, build_autoencoder, save_autoencoder
from training import cli, distributed
from training.checkpoint import atomic_write
from training.data import DataOrder, augment, hash_seed
from training.presets import config_keys
from training.run import Run, Tick
from training.sources import loader, open_images, step_indices
from training.stats import RunLogger, crossed, save_image_grid

SCALE_FIT_IMAGES = 1024
DEFAULTS = {
    "seed": 0,
    "autoencoder": {},
    "data": {"dataset": "digits", "path": None, "image_size": 8, "resize": "resize", "hflip": False, "stream": False,
             "num_workers": 2},
    "training": {"batch_size": 64, "total_images": 64_000, "lr": 4.5e-6 * 64, "grad_clip": 1.0},
    "logging": {"log_every_images": 16_000, "checkpoint_every_images": 16_000, "keep_checkpoints": 2},
}
FLAGS = (
    ("--resize", "data.resize", str, "resize | pad (fit images to --image-size)"),
    ("--hflip", "data.hflip", bool, "random horizontal flips"),
    ("--lr", "training.lr", float, "Adam learning rate (LDM: 4.5e-6 x batch)"),
    *cli.RUN_FLAGS,
)


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser("python -m training.train_autoencoder", __doc__, FLAGS,
                            choices=sorted(AUTOENCODER_PRESETS), help="autoencoder preset")


def settable_keys(config: dict) -> dict:
    """The config's values plus the autoencoder constructor's arguments (e.g. autoencoder.n_embed)."""
    preset = AUTOENCODER_PRESETS[config["autoencoder"]["preset"]]
    return {f"autoencoder.{k}": v for k, v in preset.items() if k != "kind"} | config_keys(config)


def parse_args(argv=None, parser=None) -> tuple[dict, Path, bool]:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    config = copy.deepcopy(DEFAULTS)
    config["autoencoder"]["preset"] = args.preset
    config = cli.apply_config_flags(args, config, FLAGS, settable_keys)
    config["data"]["channels"] = AUTOENCODER_PRESETS[args.preset]["in_channels"]
    return config, Path(args.run_dir), not args.no_progress


def check_config(config: dict, world_size: int) -> None:
    training, logging = config["training"], config["logging"]
    for flag, value in (("--batch-size", training["batch_size"]), ("--total-images", training["total_images"]),
                        ("--log-every-images", logging["log_every_images"]),
                        ("--checkpoint-every-images", logging["checkpoint_every_images"])):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    workers = config["data"]["num_workers"]
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ValueError(f"--num-workers must be an integer >= 0, got {workers!r}")
    if training["batch_size"] % world_size:
        raise ValueError(f"--batch-size {training['batch_size']} must be divisible by processes ({world_size})")
    if not isinstance(training["lr"], (int, float)) or not 0 < training["lr"] < math.inf:
        raise ValueError(f"--lr must be a finite number > 0, got {training['lr']!r}")


class AutoencoderLoss(torch.nn.Module):
    """model.loss as forward, so DistributedDataParallel averages its gradients (every parameter, every rank)."""

    def __init__(self, autoencoder):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x):
        return self.autoencoder.loss(x)


def train_autoencoder(config: dict, run_dir: Path, progress: bool = True) -> dict:
    distributed.init()
    check_config(config, distributed.get_world_size())
    run = Run(run_dir, config["logging"]["keep_checkpoints"])
    training, data, logging = config["training"], config["data"], config["logging"]
    run.record_config(config)
    images, _ = open_images(data["dataset"], data["path"], "train", data["image_size"], data["channels"],
                            data["resize"], data["stream"])
    model = run.build(lambda: build_autoencoder(config["autoencoder"]), config["seed"])
    optimizer = torch.optim.Adam(model.parameters(), lr=training["lr"], betas=(0.5, 0.9))  # LDM's first stage
    images_seen = 0
    state = run.checkpoints.resume(map_location=run.device)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        images_seen = state["images_seen"]
    loss_module = run.wrap(AutoencoderLoss(model))
    order = DataOrder(len(images), hash_seed(config["seed"], 0xDA7A))
    batches = iter(loader(images, step_indices(order, images_seen, training["total_images"], training["batch_size"],
                                               run.world_size, run.rank, 1), data["num_workers"]))
    bar = tqdm(total=training["total_images"], initial=images_seen, unit="img", disable=run.rank != 0 or not progress)
    tick, record = Tick(run.device), {}
    while images_seen < training["total_images"]:
        started = time.perf_counter()
        step_seed = run.step_seed(config["seed"], images_seen)
        torch.manual_seed(step_seed)  # the KL posterior sample draws from the global RNG
        _, pixels, sizes = next(batches)  # decoded by the workers for streamed images
        x, _ = augment(pixels, sizes, data["image_size"], data["hflip"], False,
                       torch.Generator().manual_seed(step_seed))
        loss, parts = loss_module(x.to(run.device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), training["grad_clip"] or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        images_seen += training["batch_size"]
        tick.add(**parts)
        tick.steps += 1
        tick.seconds += time.perf_counter() - started
        bar.update(training["batch_size"])
        done = images_seen >= training["total_images"]
        if done or crossed(images_seen, training["batch_size"], logging["log_every_images"]):
            seconds = tick.seconds
            record = {"images_seen": images_seen, **tick.read(), "seconds": seconds}
            if hasattr(model, "quantize"):   # fraction of the VQ codebook used since the last tick (all ranks)
                record["codebook_usage"] = model.quantize.usage()
                model.quantize.reset_usage()
            run.logger.stats(record)
            run.logger.log(f"kimg {images_seen / 1000:.1f} loss {record['loss']:.4f} "
                           f"reconstruction {record['reconstruction']:.4f}")
        if done or crossed(images_seen, training["batch_size"], logging["checkpoint_every_images"]):
            distributed.check_consistency(model)   # DDP keeps the replicas bit-identical
            if run.rank == 0:
                run.checkpoints.save(images_seen, {"config": config, "images_seen": images_seen,
                                                   "model": model.state_dict(), "optimizer": optimizer.state_dict()})
            distributed.barrier()
    bar.close()
    if run.rank == 0:
        finish(model, images, config, run.run_dir, run.device, run.logger)
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
    parser = build_parser()
    cli.run(parser, lambda: train_autoencoder(*parse_args(argv, parser)))


if __name__ == "__main__":
    main()
