"""Latents encoded once into shards (training/encode_latents.py, training/latent_shards.py): the shards hold exactly
what encoding on the fly gives (scale factor included: fast-DiT's users hit a 10x loss mismatch there), training on
them matches training with the autoencoder in the loop, and a killed encode job re-run ends with the same files."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from models.autoencoder import build_autoencoder, load_autoencoder, save_autoencoder
from stream_data import write_shards
from test_train import ENV, REPO, TINY, assert_same_weights, weights
from training.data import DatasetError, load_dataset
from training.encode_latents import main as encode
from training.latent_shards import LatentShards, shard_path
from training.latents import LatentSource, to_model_range
from training.sources import open_stream
from training.train import main as train


@pytest.fixture(scope="module")
def autoencoders(tmp_path_factory):
    """Untrained tiny KL and VQ autoencoders with a fitted (non-1) latent scale factor."""
    folder, x = tmp_path_factory.mktemp("ae"), to_model_range(load_dataset("digits", image_size=16).images[:64], 16)
    paths = {}
    for preset in ("kl-f4-tiny", "vq-f4-tiny"):
        torch.manual_seed(0)
        model = build_autoencoder({"preset": preset}).eval()
        model.fit_scale_factor(x)
        paths[preset] = folder / f"{preset}.pt"
        save_autoencoder(model, {"preset": preset}, paths[preset])
    return paths


def encode_digits(out, autoencoder, *flags):
    encode(["--dataset", "digits", "--autoencoder", str(autoencoder), "--out", str(out), "--image-size", "16",
            "--shard-size", "500", "--num-workers", "0", "--no-progress", *flags])
    return LatentShards(out)


def test_kl_shards_hold_the_on_the_fly_encoding(tmp_path, autoencoders):
    shards = encode_digits(tmp_path / "kl", autoencoders["kl-f4-tiny"], "--hflip")
    assert len(shards) == 1797 and shards.manifest["num_shards"] == 4 and shards.manifest["latent_shape"] == [3, 4, 4]
    assert sorted(p.name for p in (tmp_path / "kl").iterdir()) == [
        "manifest.json", *[shard_path("", k).name for k in range(4)], "spec.json"]
    autoencoder, _ = load_autoencoder(autoencoders["kl-f4-tiny"])
    dataset = load_dataset("digits", image_size=16)
    indices = torch.tensor([0, 499, 500, 1796, 1000, 3])
    x = to_model_range(dataset.images[indices], 16)
    with torch.no_grad():
        mean, logvar = autoencoder.moments(x)
        torch.testing.assert_close(shards.gather("latents", indices), autoencoder.encode(x))
        torch.testing.assert_close(shards.gather("latents_std", indices),
                                   (0.5 * logvar).exp() * autoencoder.scale_factor)
        torch.testing.assert_close(shards.gather("flipped", indices), autoencoder.encode(x.flip(-1)))
        # A posterior sample per step from the stored mean and std = encode(x, generator) on the fly.
        config = {"data": {"random_crop": False, "hflip": False}, "latent": {"posterior": "sample"}}
        source = LatentSource.from_shards(shards, config, "cpu")
        drawn, control = source.batch(indices, torch.Generator().manual_seed(7))
        torch.testing.assert_close(drawn, autoencoder.encode(x, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(shards.labels, dataset.labels)
    assert torch.equal(control[:, 2:4], dataset.original_sizes[indices].float())


def test_vq_shards_from_tar_shards_keep_labels_and_captions(tmp_path, autoencoders):
    source = write_shards(tmp_path / "tars", 300, per_shard=100)
    encode(["--dataset", str(source), "--autoencoder", str(autoencoders["vq-f4-tiny"]), "--out",
            str(tmp_path / "vq"), "--image-size", "16", "--shard-size", "128", "--num-workers", "1", "--no-progress"])
    shards, index = LatentShards(tmp_path / "vq"), open_stream(str(source))
    assert not shards.has("latents_std") and not shards.has("flipped") and shards.manifest["num_shards"] == 3
    assert torch.equal(shards.labels, index.labels)
    assert [shards.captions[i] for i in range(300)] == [index.captions[i] for i in range(300)]
    with pytest.raises(ValueError, match="--hflip"):
        LatentSource.from_shards(shards, {"data": {"random_crop": False, "hflip": True}}, "cpu")


def test_other_settings_or_broken_shards_are_refused(tmp_path, autoencoders, capsys):
    encode_digits(tmp_path / "out", autoencoders["vq-f4-tiny"])
    with pytest.raises(SystemExit) as exit_info:
        encode(["--dataset", "digits", "--autoencoder", str(autoencoders["vq-f4-tiny"]), "--out",
                str(tmp_path / "out"), "--image-size", "8", "--no-progress"])
    assert exit_info.value.code == 2
    assert "encode_latents: error: --out: " in capsys.readouterr().err  # one line naming the flag
    with pytest.raises(SystemExit):
        encode(["--dataset", "digits", "--autoencoder", str(tmp_path), "--out", str(tmp_path / "x"),
                "--image-size", "8"])
    assert "error: --autoencoder: " in capsys.readouterr().err
    shard = shard_path(tmp_path / "out", 2)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="shard-00002.*truncated"):
        LatentShards(tmp_path / "out")
    with pytest.raises(DatasetError, match="manifest.json"):
        LatentShards(tmp_path)


def test_training_on_cached_latents_matches_encoding_in_the_loop(tmp_path, autoencoders):
    """The same run with the autoencoder in the loop (--autoencoder) and on the shards (--latents): same losses and
    weights, so the shards carry the same latents, scale factor and flips."""
    autoencoder = autoencoders["kl-f4-tiny"]
    encode_digits(tmp_path / "latents", autoencoder, "--hflip")
    flags = [*TINY, "--image-size", "16", "--hflip", "--total-images", "64", "--checkpoint-every-images", "32"]
    train([*flags, "--autoencoder", str(autoencoder), "--run-dir", str(tmp_path / "in-loop")])
    train([*flags, "--latents", str(tmp_path / "latents"), "--run-dir", str(tmp_path / "cached")])
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "stats.jsonl").read_text().splitlines()]
              for run in ("in-loop", "cached")]
    assert losses[0] == losses[1]
    assert_same_weights(weights(tmp_path / "in-loop"), weights(tmp_path / "cached"))


def test_encode_killed_midway_and_rerun_gives_the_same_shards(tmp_path, autoencoders):
    source = write_shards(tmp_path / "tars", 600, per_shard=200)
    command = [sys.executable, "-m", "training.encode_latents", "--dataset", str(source), "--autoencoder",
               str(autoencoders["kl-f4-tiny"]), "--image-size", "16", "--shard-size", "30", "--batch-size", "10",
               "--num-workers", "1", "--no-progress"]
    reference = subprocess.Popen([*command, "--out", str(tmp_path / "reference")], cwd=REPO, env=ENV)
    victim = subprocess.Popen([*command, "--out", str(tmp_path / "killed")], cwd=REPO, env=ENV,
                              start_new_session=True)
    deadline = time.time() + 300
    while not shard_path(tmp_path / "killed", 1).exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.01)
    os.killpg(victim.pid, signal.SIGKILL)  # the encoder and its decoding worker
    victim.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists(), "the job finished before it could be killed"
    assert subprocess.run([*command, "--out", str(tmp_path / "killed")], cwd=REPO, env=ENV).returncode == 0
    assert reference.wait(timeout=600) == 0
    files = sorted(p.name for p in (tmp_path / "reference").iterdir())
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == files and len(files) == 22
    for name in files:
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
