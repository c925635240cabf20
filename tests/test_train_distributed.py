"""2-process `torchrun --standalone --nproc_per_node=2` on CPU (gloo): ranks stay in sync (checked bit-exactly at
every checkpoint) and a job whose workers are SIGKILLed after a checkpoint resumes to the uninterrupted weights."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_train import ENV, REPO, TINY, assert_same_weights, weights
from training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

FLAGS = [*TINY, "--total-images", "320", "--checkpoint-every-images", "64", "--grad-accum", "2"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "training.train", *FLAGS]


def torchrun(run_dir, **kwargs):
    return subprocess.Popen([*TORCHRUN, "--run-dir", str(run_dir)], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def finish(job):
    _, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-3000:]


def test_two_processes_stay_in_sync_and_resume_after_sigkill(tmp_path):
    # The reference job and the job to kill start together: both spend most of their time starting up.
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    reference = torchrun(uninterrupted)
    victim = torchrun(killed, start_new_session=True)
    deadline = time.time() + 300
    while not list_checkpoints(killed) and time.time() < deadline and victim.poll() is None:
        time.sleep(0.01)
    os.killpg(victim.pid, signal.SIGKILL)  # torchrun and both workers
    victim.wait()
    assert load_checkpoint(latest_checkpoint(killed))["images_seen"] < 320
    finish(torchrun(killed))  # the same command again resumes
    finish(reference)
    assert "resumed from" in (killed / "log.txt").read_text()
    stats = [json.loads(line) for line in (uninterrupted / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["world_size"] == 2 and stats[-1]["images_seen"] == 320
    assert "2 process(es)" in (uninterrupted / "log.txt").read_text()
    assert_same_weights(weights(uninterrupted), weights(killed))


def _consistency_worker(rank, folder):
    import torch
    import torch.distributed as dist

    from training.distributed import check_consistency

    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=2)
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    check_consistency(module)  # identical replicas pass
    if rank == 1:
        with torch.no_grad():
            module.bias[0] += 1e-6
    try:
        check_consistency(module)
        outcome = "passed"
    except RuntimeError as error:
        outcome = str(error)
    (Path(folder) / f"rank{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


def test_consistency_check_catches_a_diverged_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_consistency_worker, args=(str(tmp_path),), nprocs=2)
    assert (tmp_path / "rank0.txt").read_text() == "passed"
    assert "rank 1 is out of sync with rank 0 at bias" in (tmp_path / "rank1.txt").read_text()


def _shutdown_worker(rank, folder, port):
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from training import distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    distributed.init()
    model = DistributedDataParallel(torch.nn.Linear(3, 2))
    model(torch.ones(4, 3)).sum().backward()
    del model
    distributed.shutdown()
    threads = [Path(f"/proc/self/task/{tid}/comm").read_text().strip() for tid in os.listdir("/proc/self/task")]
    (Path(folder) / f"rank{rank}.txt").write_text(" ".join(name for name in threads if "gloo" in name))


def test_shutdown_frees_the_group_after_ddp(tmp_path):
    """A DDP run's process group (and its gloo threads) is gone after `shutdown`, not left to interpreter teardown."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_shutdown_worker, args=(str(tmp_path), port), nprocs=2)
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)] == ["", ""]
