"""Streamed data loading (training/sources.py) against what the model consumes, and a rank's memory as the data set
grows. Writes N and 10 x N generated JPEGs (64x64, grayscale) as img2dataset-style tar shards, then measures
  - loader images/s with 0, 1 and 2 worker processes (decode + resize to the tiny preset's 8x8, batches of 64),
  - the tiny preset's consumption: images/s of training.train (dit-tiny-digits, 1 process) on the in-memory digits
    and on the streamed shards (2 workers),
  - peak RSS of a process that reads every image of N and of 10 x N, and of a training rank on each (its own and
    its workers' peak).

    python -m benchmarks.bench_data [--images 2000] [--train-images 6400]
"""
import argparse
import io
import json
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.bench_train import loop_images_per_second
from training.sources import StreamedImages, loader, open_stream

REPO = Path(__file__).resolve().parents[1]
PIXELS, STORE_SIZE, BATCH = 64, 8, 64


def write_shards(root: Path, count: int, per_shard: int = 1000) -> Path:
    """count JPEGs as <shard>.tar files of <key>.jpg + <key>.cls (10 classes), as img2dataset writes them."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for shard in range(0, count, per_shard):
        with tarfile.open(root / f"{shard // per_shard:05d}.tar", "w") as archive:
            for i in range(shard, min(shard + per_shard, count)):
                label = i % 10
                pixels = (rng.random((PIXELS, PIXELS)) * 128 + label * 12).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels, "L").save(buffer, format="JPEG", quality=90)
                for name, data in ((f"{i:08d}.jpg", buffer.getvalue()), (f"{i:08d}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return root


def loader_images_per_second(shards: Path, workers: int) -> float:
    images = StreamedImages(open_stream(str(shards)), STORE_SIZE, 1)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    batches = [order[i:i + BATCH].tolist() for i in range(0, len(images) - BATCH + 1, BATCH)]
    iterator = iter(loader(images, batches, workers))
    next(iterator)  # worker start-up is not throughput
    started = time.perf_counter()
    count = sum(len(batch[0]) for batch in iterator)
    return count / (time.perf_counter() - started)


def peak_rss_mib(shards: Path) -> tuple[float, float]:
    """(main process, largest worker) peak RSS in MiB of a fresh process reading every image with 2 workers."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_data", "--rss-child", str(shards)], cwd=REPO,
                         check=True, capture_output=True, text=True).stdout
    return tuple(json.loads(out.splitlines()[-1]))


def training_rss_mib(shards: Path, images: int) -> tuple[float, float]:
    """(rank, largest worker) peak RSS in MiB of a training.train process (dit-tiny-digits, 2 workers) that builds
    the index of every image and trains on `images` of them."""
    script = ("import json, resource, sys, tempfile; from training.train import main; "
              "main(sys.argv[1:] + ['--run-dir', tempfile.mkdtemp()]); "
              "print(json.dumps([resource.getrusage(w).ru_maxrss / 1024 for w in "
              "(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]))")
    out = subprocess.run([sys.executable, "-c", script, "--preset", "dit-tiny-digits", "--dataset", str(shards),
                          "--num-workers", "2", "--total-images", str(images), "--no-progress", "--set",
                          "logging.num_samples=1", "--set", "logging.sample_steps=2"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    return tuple(json.loads(out.splitlines()[-1]))


def rss_child(shards: str) -> None:
    images = StreamedImages(open_stream(shards), STORE_SIZE, 1)
    batches = [list(range(i, min(i + BATCH, len(images)))) for i in range(0, len(images), BATCH)]
    for _ in loader(images, batches, 2):
        pass
    own, workers = (resource.getrusage(who).ru_maxrss / 1024 for who in (resource.RUSAGE_SELF,
                                                                         resource.RUSAGE_CHILDREN))
    print(json.dumps([own, workers]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="N (memory is also measured at 10 x N)")
    parser.add_argument("--train-images", type=int, default=6400, help="length of the consumption runs")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        small = write_shards(Path(folder) / "n", args.images)
        large = write_shards(Path(folder) / "10n", 10 * args.images)
        print(f"loader, {PIXELS}x{PIXELS} JPEG -> {STORE_SIZE}x{STORE_SIZE}, batch {BATCH}, "
              f"{10 * args.images} images:")
        for workers in (0, 1, 2):
            print(f"  {workers} workers: {loader_images_per_second(large, workers):8.0f} images/s")
        memory, _ = loop_images_per_second("dit-tiny-digits", args.train_images, 1, 1)
        streamed, _ = loop_images_per_second("dit-tiny-digits", args.train_images, 1, 1,
                                             flags=("--dataset", str(large), "--num-workers", "2"))
        print(f"dit-tiny-digits training (1 process, 1 thread): in-memory digits {memory:.0f} images/s, "
              f"streamed shards with 2 workers {streamed:.0f} images/s ({streamed / memory:.2f}x)")
        for name, shards in ((f"N = {args.images}", small), (f"10N = {10 * args.images}", large)):
            own, worker = peak_rss_mib(shards)
            print(f"peak RSS reading {name} images: main {own:.0f} MiB, largest worker {worker:.0f} MiB")
            rank, worker = training_rss_mib(shards, 1280)
            print(f"peak RSS of a training rank on {name} images (1280 trained): rank {rank:.0f} MiB, "
                  f"largest worker {worker:.0f} MiB")


if __name__ == "__main__":
    main()
