"""Training on streamed data: 2000 generated images as tar shards give the same runs as the same images loaded into
memory from a folder (autoencoder and DiT), a SIGKILLed 2-rank torchrun job resumes bit-identically, and caption
swaps work on streamed and latent shards (text-conditional DiT and U-Net)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from stream_data import write_folder, write_shards
from test_train import ENV, REPO, TINY, assert_same_weights, weights
from training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from training.corruption import swap_captions
from training.data import hash_seed
from training.encode_latents import main as encode
from training.sources import open_stream
from training.train import main as train
from training.train_autoencoder import main as train_autoencoder

COUNT = 2000
STREAMED = [*TINY, "--image-size", "8", "--total-images", "96", "--checkpoint-every-images", "48"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return write_folder(root / "folder", COUNT), write_shards(root / "shards", COUNT, per_shard=500)


def test_streamed_shards_train_like_the_in_memory_folder(tmp_path, data):
    folder, shards = data
    train([*STREAMED, "--dataset", str(folder), "--run-dir", str(tmp_path / "memory")])
    train([*STREAMED, "--dataset", str(shards), "--num-workers", "2", "--run-dir", str(tmp_path / "streamed")])
    assert_same_weights(weights(tmp_path / "memory"), weights(tmp_path / "streamed"))
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config["training"]["tf32"] is True and config["data"]["num_workers"] == 2


def test_streamed_autoencoder_training_matches_in_memory(tmp_path, data):
    folder, shards = data
    flags = ["--preset", "vq-f4-tiny", "--image-size", "8", "--batch-size", "16", "--total-images", "48",
             "--checkpoint-every-images", "32"]
    train_autoencoder([*flags, "--dataset", str(folder), "--run-dir", str(tmp_path / "memory")])
    train_autoencoder([*flags, "--dataset", str(folder), "--stream", "--num-workers", "1",
                       "--run-dir", str(tmp_path / "streamed")])
    memory, streamed = (load_checkpoint(latest_checkpoint(tmp_path / run))["model"] for run in ("memory", "streamed"))
    assert all(torch.equal(memory[k], streamed[k]) for k in memory)
    assert (tmp_path / "streamed" / "autoencoder.pt").is_file()


def test_two_rank_streamed_job_resumes_bit_identically_after_sigkill(tmp_path, data):
    _, shards = data
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "training.train", *TINY, "--dataset", str(shards), "--num-workers", "1", "--total-images", "192",
               "--checkpoint-every-images", "32", "--grad-accum", "2"]
    reference = subprocess.Popen([*command, "--run-dir", str(tmp_path / "reference")], cwd=REPO, env=ENV,
                                 stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen([*command, "--run-dir", str(tmp_path / "killed")], cwd=REPO, env=ENV,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not list_checkpoints(tmp_path / "killed") and time.time() < deadline and victim.poll() is None:
        time.sleep(0.01)
    os.killpg(victim.pid, signal.SIGKILL)  # torchrun, both ranks and their decoding workers
    victim.wait()
    assert load_checkpoint(latest_checkpoint(tmp_path / "killed"))["images_seen"] < 192
    rerun = subprocess.run([*command, "--run-dir", str(tmp_path / "killed")], cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _, stderr = reference.communicate(timeout=600)
    assert reference.returncode == 0, stderr[-3000:]
    assert "resumed from" in (tmp_path / "killed" / "log.txt").read_text()
    assert_same_weights(weights(tmp_path / "reference"), weights(tmp_path / "killed"))


def test_caption_swap_on_streamed_shards_is_a_recorded_seeded_permutation(tmp_path, data):
    _, shards = data
    run_dir = tmp_path / "text"
    train(["--preset", "text-tiny-digits", "--set", "model.preset=DiT-micro/2", "--dataset", str(shards),
           "--image-size", "8", "--batch-size", "16", "--total-images", "32", "--corruption-ratio", "0.1",
           "--num-workers", "1", "--no-progress", "--set", "logging.num_samples=4", "--set",
           "logging.sample_steps=2", "--run-dir", str(run_dir)])
    corruption = np.load(run_dir / "corruption.npz")
    assert str(corruption["kind"]) == "caption-swap" and len(corruption["corrupted_indices"]) == 200
    assert "clean_captions" not in corruption  # streamed captions are recorded by their permutation, not as text
    store = open_stream(str(shards)).captions
    captions = [store[i] for i in range(COUNT)]
    swapped, indices = swap_captions(captions, 0.1, hash_seed(0, 0xC0))  # the list version, in memory
    assert np.array_equal(corruption["corrupted_indices"], indices.numpy())
    assert [captions[j] for j in corruption["caption_sources"]] == [swapped[i] for i in indices.tolist()]


def test_text_conditional_unet_trains_from_latent_shards(tmp_path, data):
    """The ldm4-cc3m path in miniature: tar shards with captions -> latent shards -> text U-Net, captions swapped."""
    from models.autoencoder import build_autoencoder, save_autoencoder

    _, shards = data
    torch.manual_seed(0)
    save_autoencoder(build_autoencoder({"preset": "vq-f4-tiny"}), {"preset": "vq-f4-tiny"}, tmp_path / "ae.pt")
    encode(["--dataset", str(shards), "--autoencoder", str(tmp_path / "ae.pt"), "--out", str(tmp_path / "latents"),
            "--image-size", "16", "--shard-size", "512", "--num-workers", "1", "--no-progress"])
    run_dir = tmp_path / "ldm"
    train(["--preset", "text-tiny-digits", "--set", "model.arch=unet", "--set", "model.preset=UNet-micro",
           "--latents", str(tmp_path / "latents"), "--image-size", "16", "--batch-size", "16", "--total-images", "32",
           "--corruption-ratio", "0.1", "--grad-checkpointing", "--no-progress", "--set", "logging.num_samples=4",
           "--set", "logging.sample_steps=2", "--run-dir", str(run_dir)])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["in_channels"] == 3 and config["model"]["image_size"] == 4
    assert config["latent"]["autoencoder"] == str((tmp_path / "ae.pt").resolve())  # what sampling decodes with
    assert len(np.load(run_dir / "corruption.npz")["caption_sources"]) == 200
    assert (run_dir / "samples").is_dir()
