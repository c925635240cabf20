"""Training throughput of the CPU-tiny presets: training.train with 1 process (2 threads) and with
`torchrun --nproc_per_node=2` (1 thread each), against a bare eager loop (same model, batch, AdamW and loss; no
EMA, seeding, checkpoints or DDP) in the same run, so the ratio shows what the training infrastructure costs.

    python -m benchmarks.bench_train [--presets dit-tiny-digits unet-tiny-digits] [--images 12800]
    python -m benchmarks.bench_train --compare /path/to/other/checkout   # images/s of both trees, back to back
    python -m benchmarks.bench_train --precisions fp32 bf16 --presets dit-tiny-digits
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


def loop_images_per_second(preset: str, images: int, processes: int, threads: int, repo: Path = REPO,
                           precision: str = "fp32", flags: tuple = ()) -> tuple[float, list[float]]:
    """(median images/s over the status ticks of a real run, the loss per tick); the first tick (warm-up) is left
    out of the median. `repo` runs another checkout's training.train (e.g. before a change)."""
    with tempfile.TemporaryDirectory() as run_dir:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
            if processes > 1 else [sys.executable]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(repo)}
        subprocess.run([*launcher, "-m", "training.train", "--preset", preset, "--run-dir", run_dir,
                        "--total-images", str(images), "--log-every-images", str(images // 8),
                        "--checkpoint-every-images", str(images), "--no-progress", "--set", "logging.num_samples=1",
                        "--set", "logging.sample_steps=2", "--precision", precision, *flags], cwd=repo, env=env,
                       check=True, capture_output=True)
        ticks = [json.loads(line) for line in (Path(run_dir) / "stats.jsonl").read_text().splitlines()]
    return statistics.median(t["images_per_second"] for t in ticks[1:]), [t["loss"] for t in ticks]


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
    parser.add_argument("--compare", type=Path, default=None, help="another checkout: images/s of both, back to back")
    parser.add_argument("--precisions", nargs="+", default=None, help="e.g. fp32 bf16: images/s and loss per tick")
    args = parser.parse_args()
    print(f"img/s; load average {os.getloadavg()[0]:.1f}; threads = intra-op threads per process")
    if args.compare or args.precisions:
        compare(args)
        return
    print("| preset | threads | train.py, 1 process | bare eager loop, 1 process | train.py / bare "
          "| train.py, torchrun 2 processes x 1 thread |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        two, _ = loop_images_per_second(preset, args.images, 2, 1)
        for threads in (1, 2):
            one, _ = loop_images_per_second(preset, args.images, 1, threads)
            bare = bare_images_per_second(preset, threads)
            print(f"| {preset} | {threads} | {one:.0f} | {bare:.0f} | {one / bare:.2f} | {two:.0f} |", flush=True)


def compare(args) -> None:
    """This checkout against --compare (1 process, 2 processes; 1 thread each), or precisions against fp32."""
    variants = [("this", REPO, "fp32"), ("other", args.compare.resolve(), "fp32")] if args.compare else \
        [(p, REPO, p) for p in args.precisions]
    print("| preset | processes x threads | " + " | ".join(name for name, _, _ in variants) + " | ratio |")
    print("|---|---|" + "---|" * (len(variants) + 1))
    for preset in args.presets:
        for processes, threads in ((1, 1), (2, 1)):  # one thread each: 2 threads oversubscribe a busy machine
            results = [loop_images_per_second(preset, args.images, processes, threads, repo, precision)
                       for _, repo, precision in variants]
            speeds = [f"{speed:.0f}" for speed, _ in results]
            print(f"| {preset} | {processes} x {threads} | {' | '.join(speeds)} | "
                  f"{results[0][0] / results[-1][0]:.2f} |", flush=True)
            for (name, _, _), (_, losses) in zip(variants, results):
                print(f"  loss per tick ({name}): {' '.join(f'{loss:.4f}' for loss in losses)}", flush=True)


if __name__ == "__main__":
    main()
