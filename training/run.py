"""The run skeleton every trainer shares (training.train, training.train_autoencoder), in the shape of edm2's
training_loop: process group, run-dir check before any write, seeding, checkpoint I/O with resume, DDP wrapping and
the logging tick. Trainers only add their model, loss and what a checkpoint holds."""
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from training import distributed
from training.checkpoint import CheckpointIO, check_run_dir, write_json
from training.data import hash_seed
from training.stats import RunLogger


class Run:
    """One training job in `run_dir`: rank/device, logger, checkpoints; re-running the same command resumes it."""

    def __init__(self, run_dir, keep_checkpoints: int):
        self.device = distributed.init()
        self.rank, self.world_size = distributed.get_rank(), distributed.get_world_size()
        self.run_dir = Path(run_dir)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        self.logger = RunLogger(self.run_dir, self.rank)
        self.checkpoints = CheckpointIO(self.run_dir, keep_checkpoints, self.logger.log)

    def check(self, config: dict) -> None:
        """Refuses a run dir holding another run's config; call before writing anything into it."""
        check_run_dir(self.run_dir, config)

    def record_config(self, config: dict) -> None:
        self.check(config)
        distributed.barrier()   # every rank has checked before rank 0 writes
        if self.rank == 0:
            write_json(self.run_dir / "config.json", config)

    def build(self, make_module, seed: int) -> torch.nn.Module:
        """make_module() seeded from the run seed: identical initial weights on every rank."""
        torch.manual_seed(hash_seed(seed, 0xA11))
        return make_module().to(self.device)

    def wrap(self, net: torch.nn.Module, compile_model: bool = False) -> torch.nn.Module:
        """DDP (gradients averaged inside backward) when there are several processes, then optionally compiled."""
        model = net
        if self.world_size > 1:
            model = DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(model) if compile_model else model

    def step_seed(self, seed: int, images_seen: int, accumulation_round: int = 0) -> int:
        """Every random draw of a step derives from (seed, rank, images seen, round): a resume is bit-identical."""
        return hash_seed(seed, self.rank, images_seen, accumulation_round)


class Tick:
    """Per-step values summed on the device between log ticks; `read` all-reduces them once per tick (no host
    synchronisation per step), giving the mean over the tick's steps and all ranks."""

    def __init__(self, device):
        self.device, self.sums, self.steps, self.seconds = device, {}, 0, 0.0

    def add(self, **values: torch.Tensor) -> None:
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()

    def read(self) -> dict:
        names = sorted(self.sums)
        means = {}
        if names:
            totals = distributed.all_reduce_mean(torch.stack([self.sums[n] for n in names]))
            means = {n: float(v) / max(self.steps, 1) for n, v in zip(names, totals.tolist())}
        self.sums, self.steps, self.seconds = {}, 0, 0.0
        return means
