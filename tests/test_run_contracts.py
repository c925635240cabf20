"""Issue 9's defects, one test each: what training writes, evaluation must read; the CLIs reject bad input in one
line without touching a finished run; a truncated checkpoint does not stop a resume."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from evaluation.sample import Sampler
from test_train import ENV, REPO, TINY, single_thread  # noqa: F401 (autouse fixture)
from training.checkpoint import list_checkpoints, load_checkpoint
from training.data import load_dataset
from training.prepare import PixelSource
from training.train import main, parse_args
from training.train_autoencoder import main as main_autoencoder, parse_args as parse_autoencoder_args


def files(run_dir) -> dict:
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_unet_run_samples_through_the_evaluation_sampler(tmp_path):
    """Defect 1: evaluation read the DiT-only model.input_size (KeyError for U-Net and LDM runs)."""
    main([*TINY, "--run-dir", str(tmp_path), "--set", "model.arch=unet", "--set", "model.preset=UNet-micro",
          "--total-images", "16"])
    out = Sampler(tmp_path)([0, 1, 2], 1.5, "ddim", 2)
    assert out["images"].shape == (3, 8, 8, 1) and out["images"].dtype == np.uint8


def test_sampling_uses_the_training_control_of_an_unflipped_image(tmp_path):
    """Defect 2: sampling passed the model size (12) as the original size; training saw the data's 8 (padded)."""
    main([*TINY, "--run-dir", str(tmp_path), "--set", "model.cond_mode=cross-attention", "--set", "model.control_dim=5",
          "--image-size", "12", "--set", "data.resize=pad", "--total-images", "16"])
    dataset = load_dataset("digits", image_size=12, resize="pad")
    _, control = PixelSource(dataset, 12, False, False).batch(torch.arange(4), torch.Generator())
    sampler = Sampler(tmp_path)
    assert sampler.conditioner.control.tolist() == control[0].tolist() == [0.0, 0.0, 8.0, 8.0, 0.0]
    kwargs, null_kwargs, _, _ = sampler.conditioner([0, 1])
    assert torch.equal(kwargs["control"], control[:2]) and torch.equal(null_kwargs["control"], control[:2])


@pytest.mark.parametrize("override,message", [
    ("training.batchsize=32", "training.batchsize: unknown config key; did you mean training.batch_size"),
    ("training.batch_size=\"32\"", "training.batch_size: expected a int"),
    ("model.dpeth=2", "did you mean model.depth"),
    ("logging.sample_steps=2.5", "expected a int"),
])
def test_set_rejects_unknown_keys_and_wrong_types(tmp_path, override, message):
    """Defect 3: `--set training.batchsize=32` was accepted and the batch size stayed 64."""
    with pytest.raises(ValueError, match=message):
        parse_args([*TINY, "--run-dir", str(tmp_path), "--set", override])
    config, _, _ = parse_args([*TINY, "--run-dir", str(tmp_path), "--set", "model.depth=2", "--set",
                               "latent.autoencoder=x", "--set", "training.lr=1"])
    assert config["model"]["depth"] == 2 and config["training"]["lr"] == 1


def test_a_refused_command_writes_nothing_into_the_run_dir(tmp_path):
    """Defect 4: the corruption record was rewritten before the config check refused the command."""
    main([*TINY, "--run-dir", str(tmp_path), "--total-images", "16"])
    before = files(tmp_path)
    with pytest.raises(SystemExit, match="2"):
        main([*TINY, "--run-dir", str(tmp_path), "--total-images", "32", "--corruption-ratio", "0.2"])
    assert files(tmp_path) == before


def test_train_autoencoder_speaks_the_train_dialect(tmp_path):
    """Defect 5: train_autoencoder had no --no-progress and --set took constructor kwargs, not dotted keys."""
    flags = ["--preset", "vq-f4-tiny", "--image-size", "8", "--batch-size", "16", "--total-images", "32",
             "--log-every-images", "16", "--no-progress", "--set", "autoencoder.ch=8", "--set", "seed=3"]
    main_autoencoder([*flags, "--run-dir", str(tmp_path)])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["autoencoder"]["ch"] == 8 and config["seed"] == 3
    stats = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [s["images_seen"] for s in stats] == [16, 32] and all(np.isfinite(s["loss"]) for s in stats)
    with pytest.raises(ValueError, match="did you mean autoencoder.n_embed"):
        parse_autoencoder_args([*flags, "--run-dir", str(tmp_path), "--set", "autoencoder.n_embd=8"])


@pytest.mark.parametrize("module,args,line", [
    ("training.train", ["--preset", "dit-tiny-digits", "--corruption-ratio", "1.5"],
     "python -m training.train: error: --corruption-ratio: must be a number in [0, 1), got 1.5"),
    ("training.train", ["--preset", "dit-tiny-digits", "--set", "training.batchsize=32"],
     "python -m training.train: error: --set: training.batchsize: unknown config key; "
     "did you mean training.batch_size?"),
    ("training.train", ["--preset", "dit-tiny-mnist", "--data-path", "/nonexistent"],
     "python -m training.train: error: --dataset: data set /nonexistent/mnist.npz: file does not exist"),
    ("training.train_autoencoder", ["--preset", "vq-f4-tiny", "--batch-size", "0"],
     "python -m training.train_autoencoder: error: --batch-size: must be a positive integer, got 0"),
    ("evaluation.evaluate", ["--num-samples", "8"],
     "python -m evaluation.evaluate: error: --run-dir: {run_dir} is not a directory"),
])
def test_bad_flags_print_one_line_and_exit_2(tmp_path, module, args, line):
    """Defect 8: every bad flag printed a 19-line traceback."""
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", module, *args, "--run-dir", str(run_dir)], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == line.format(run_dir=run_dir)
    assert not run_dir.exists() or not any(run_dir.iterdir())   # a data error comes after the (empty) run dir


def test_a_truncated_newest_checkpoint_is_moved_aside_and_the_run_resumes(tmp_path):
    """Defect 9: the run stopped and asked the user to delete the file."""
    flags = [*TINY, "--run-dir", str(tmp_path), "--checkpoint-every-images", "16", "--keep-checkpoints", "2"]
    main([*flags, "--total-images", "32"])
    newest = list_checkpoints(tmp_path)[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    main([*flags, "--total-images", "48"])
    log = (tmp_path / "log.txt").read_text()
    assert "warning: moved the unreadable checkpoint" in log and "resumed from" in log and "at 16 images" in log
    assert (tmp_path / "checkpoints" / "ckpt-000000032.pt.corrupt").stat().st_size == 1000
    assert load_checkpoint(list_checkpoints(tmp_path)[-1])["images_seen"] == 48


def test_cep_noise_ratio_is_logged(tmp_path):
    """Issue 10: |delta| / |c(y)| at log ticks. CEP-U gives |delta| = gamma / sqrt(3) per sample (gamma 1 here)."""
    main([*TINY, "--run-dir", str(tmp_path), "--total-images", "32", "--log-every-images", "16"])
    stats = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    model = torch.load(list_checkpoints(tmp_path)[-1], weights_only=True)["model"]
    table = model["y_embedder.embedding_table.weight"]
    expected = float((1 / 3**0.5) / table[:10].norm(dim=1).mean())   # |c(y)| ~ the class rows' norm
    assert len(stats) == 2 and all(0.5 * expected < s["cep_noise_ratio"] < 2 * expected for s in stats)



@pytest.mark.parametrize("module", ["training.train", "training.train_autoencoder", "training.encode_latents",
                                    "evaluation.evaluate", "evaluation.report", "evaluation.study",
                                    "evaluation.learning_curve", "evaluation.sample",
                                    "gmm_theory.verify"])
def test_every_command_prints_its_help(module):
    """--help of every documented command renders (argparse formats help strings with %: a stray % crashed it)."""
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: ")
