"""Training throughput of the CPU-tiny presets: training.train with 1 process (2 threads) and with
`torchrun --nproc_per_node=2` (1 thread each), against a bare eager loop (same model, batch, AdamW and loss; no
EMA, seeding, checkpoints or DDP) in the same run, so the ratio shows what the training infrastructure costs.

    python -m benchmarks.bench_train [--presets dit-tiny-digits unet-tiny-digits] [--images 12800]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from models import build_model
from training.data import load_dataset
from training.prepare import complete_config
from training.presets import build_diffusion, load_preset

REPO = Path(__file__).resolve().parents[1]


def loop_images_per_second(preset: str, images: int, processes: int, threads: int, *flags: str) -> float:
    """Median images/s over the status ticks of a real run (the first tick, with warm-up, is left out)."""
    with tempfile.TemporaryDirectory() as run_dir:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
            if processes > 1 else [sys.executable]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run([*launcher, "-m", "training.train", "--preset", preset, "--run-dir", run_dir,
                        "--total-images", str(images), "--log-every-images", str(images // 8),
                        "--checkpoint-every-images", str(images), "--no-progress", "--set", "logging.num_samples=1",
                        "--set", "logging.sample_steps=2", *flags], cwd=REPO, env=env, check=True, capture_output=True)
        ticks = [json.loads(line) for line in (Path(run_dir) / "stats.jsonl").read_text().splitlines()]
    return statistics.median(t["images_per_second"] for t in ticks[1:])


def bare_images_per_second(preset: str, threads: int, steps: int = 30) -> float:
    """The eager twin: forward, backward and AdamW step on random batches of the preset's shape."""
    torch.set_num_threads(threads)
    config = load_preset(preset)
    config = complete_config(config, load_dataset("digits", image_size=config["data"]["image_size"]), None)
    torch.manual_seed(0)
    model = build_model(config["model"])
    diffusion = build_diffusion(config["diffusion"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["training"]["lr"])
    batch = config["training"]["batch_size"]
    x0 = torch.randn(batch, config["model"]["in_channels"], config["data"]["image_size"], config["data"]["image_size"])
    y = torch.randint(0, 10, (batch,))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        diffusion.training_losses(model, x0, {"y": y}).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times[5:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["dit-tiny-digits", "unet-tiny-digits"])
    parser.add_argument("--images", type=int, default=12_800, help="images per measured run")
    args = parser.parse_args()
    print("img/s; threads = intra-op threads per process (OpenMP oversubscription on a busy machine is costly)")
    print("| preset | threads | train.py, 1 process | bare eager loop, 1 process | train.py / bare "
          "| train.py, torchrun 2 processes x 1 thread |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        two = loop_images_per_second(preset, args.images, 2, 1)
        for threads in (1, 2):
            one = loop_images_per_second(preset, args.images, 1, threads)
            bare = bare_images_per_second(preset, threads)
            print(f"| {preset} | {threads} | {one:.0f} | {bare:.0f} | {one / bare:.2f} | {two:.0f} |", flush=True)


if __name__ == "__main__":
    main()
