"""Run-directory logging on rank 0: log.txt (+ stdout), stats.jsonl (one JSON object per status tick, edm2 style)
and PNG sample grids."""
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image


class RunLogger:
    """Appends to run_dir/log.txt and run_dir/stats.jsonl; silent on ranks other than 0."""

    def __init__(self, run_dir, rank: int):
        self.run_dir, self.enabled = Path(run_dir), rank == 0

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
        print(line, flush=True)
        with open(self.run_dir / "log.txt", "a") as handle:
            handle.write(line + "\n")

    def stats(self, record: dict) -> None:
        if self.enabled:
            with open(self.run_dir / "stats.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")


def crossed(images_seen: int, batch: int, interval: int) -> bool:
    """True when the last step (of `batch` images) crossed a multiple of `interval` images: status, checkpoint and
    sample ticks fall on the same images whatever the batch size."""
    return images_seen // interval > (images_seen - batch) // interval


def save_image_grid(images: torch.Tensor, path, columns: int | None = None) -> None:
    """Float [N, C, H, W] in [-1, 1] (C = 1 or 3) -> one PNG grid, cells framed by a 1-pixel grey line."""
    images = F.pad(images, (1, 1, 1, 1), value=0.0)
    count = images.shape[0]
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    padding = images.new_full((rows * columns - count, *images.shape[1:]), -1.0)
    grid = rearrange(torch.cat([images, padding]), "(r c) ch h w -> (r h) (c w) ch", r=rows, c=columns)
    pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)
