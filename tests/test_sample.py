"""evaluation/sample.py on a tiny trained run: per-seed determinism, resume, balanced labels, torchrun, errors."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation import sample as sample_module
from evaluation.sample import Sampler, generate, load_samples, pack_npz, parse_seeds, read_prompts
from training.checkpoint import CheckpointError
from training.train import parse_args, train

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = ["--preset", "dit-tiny-digits", "--set", "model.preset=DiT-micro/2", "--batch-size", "16",
            "--total-images", "32", "--no-progress", "--set", "logging.num_samples=2",
            "--set", "logging.sample_steps=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    config, _, _ = parse_args([*TINY_RUN, "--run-dir", str(run)])
    train(config, run, progress=False)
    return run


class GaussianClassDenoiser(torch.nn.Module):
    """Exact eps-predictor for data x0 ~ N(mu_y, std^2 I): E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) mu_y) / (a std^2 + 1 - a).
    Class y has mean MEANS[y]; the null class (10) has mean 0, so guidance visibly moves the samples."""
    MEANS = torch.linspace(-0.6, 0.6, 10).tolist() + [0.0]

    def __init__(self, alphas_cumprod, std=0.2):
        super().__init__()
        self.alphas_cumprod, self.std = alphas_cumprod.float(), std

    def forward(self, x, t, y=None, **unused):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        mu = torch.tensor(self.MEANS)[y].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * self.std ** 2 + 1 - a)


@pytest.fixture(scope="module")
def sampler(run_dir):
    """The run's sampler (config, schedule, conditions) with the barely trained network swapped for the exact
    Gaussian denoiser, so images are well-formed and their class means are known."""
    sampler = Sampler(run_dir)
    sampler.model = GaussianClassDenoiser(sampler.diffusion.alphas_cumprod)
    return sampler


def images_in(folder, seeds):
    return load_samples(folder, seeds)["images"]


@pytest.mark.parametrize("method, eta", [("ddim", 0.0), ("ddpm", 0.0), ("dpm++2m", 0.0), ("ddim", 0.5)])
def test_images_do_not_depend_on_batch_size(sampler, tmp_path, method, eta):
    seeds = [3, 4, 5, 6, 7]
    generate(sampler, tmp_path / "b1", seeds, 2.0, method, steps=3, eta=eta, batch_size=1, progress=False)
    generate(sampler, tmp_path / "b5", seeds, 2.0, method, steps=3, eta=eta, batch_size=5, progress=False)
    generate(sampler, tmp_path / "sub", seeds[2:], 2.0, method, steps=3, eta=eta, batch_size=2, progress=False)
    one, five = images_in(tmp_path / "b1", seeds), images_in(tmp_path / "b5", seeds)
    assert one.shape == (5, 8, 8, 1) and one.dtype == np.uint8
    assert np.array_equal(one, five)
    assert np.array_equal(one[2:], images_in(tmp_path / "sub", seeds[2:]))
    assert not np.array_equal(one[0], one[1])   # different seeds, different images
    assert len(np.unique(one)) > 10             # not saturated: the comparison is meaningful


def test_labels_reach_the_model_and_guidance_acts(sampler):
    seeds = list(range(40))
    class_means = lambda images: images.reshape(4, 10, -1).mean(axis=(0, 2)) / 127.5 - 1  # seed % 10 = label
    plain = sampler(seeds, 1.0, "ddim", 20)["images"]
    assert np.allclose(class_means(plain), GaussianClassDenoiser.MEANS[:10], atol=0.06)
    guided = sampler(seeds, 2.0, "ddim", 20)["images"]   # CFG pushes away from the null mean 0
    assert np.abs(class_means(guided)).sum() > 1.3 * np.abs(class_means(plain)).sum()


def test_resume_skips_existing_seeds(sampler, tmp_path):
    out = tmp_path / "s"
    generate(sampler, out, [0, 1, 2], 1.5, "ddim", 3, batch_size=3, progress=False)
    reference = images_in(out, [0, 1, 2])
    (out / "000001.png").unlink()
    marker = np.full((8, 8, 1), 7, np.uint8)
    sample_module.write_png(out / "000002.png", marker)          # an existing seed must not be recomputed
    generate(sampler, out, [0, 1, 2, 3], 1.5, "ddim", 3, batch_size=4, progress=False)
    again = images_in(out, [0, 1, 2, 3])
    assert np.array_equal(again[:2], reference[:2]) and np.array_equal(again[2], marker)
    assert not list(out.glob("*.tmp.png"))


def test_resume_with_other_settings_is_refused(sampler, tmp_path):
    generate(sampler, tmp_path, [0], 1.5, "ddim", 3, progress=False)
    with pytest.raises(ValueError, match="out_dir.*guidance"):
        generate(sampler, tmp_path, [0], 2.5, "ddim", 3, progress=False)


def test_samples_of_other_weights_are_refused_or_made_again(run_dir, tmp_path):
    """A folder made by other weights (the run trained further) is refused, or remade where the folder belongs to the
    run's current weights (evaluate); the fingerprint covers every weight."""
    first = Sampler(run_dir)
    generate(first, tmp_path, [0, 1], 1.5, "ddim", 3, progress=False)
    before = images_in(tmp_path, [0, 1])
    further = Sampler(run_dir)
    with torch.no_grad():
        for parameter in further.model.parameters():
            parameter.add_(0.1)
    assert further.fingerprint != first.fingerprint == Sampler(run_dir).fingerprint
    with pytest.raises(ValueError, match="out_dir.*weights"):
        generate(further, tmp_path, [0, 1], 1.5, "ddim", 3, progress=False)
    generate(further, tmp_path, [0, 1], 1.5, "ddim", 3, progress=False, replace_other_weights=True)
    assert not np.array_equal(images_in(tmp_path, [0, 1]), before)
    generate(first, tmp_path / "other", [0, 1], 1.5, "ddim", 3, progress=False)
    assert np.array_equal(images_in(tmp_path / "other", [0, 1]), before)


def test_class_balanced_labels_and_npz(sampler, tmp_path):
    kwargs, null_kwargs, labels, _ = sampler.conditioner(list(range(20)))
    assert torch.equal(torch.bincount(labels), torch.full((10,), 2))
    assert torch.equal(kwargs["y"], torch.arange(20) % 10) and bool((null_kwargs["y"] == 10).all())
    seeds = list(range(12))
    generate(sampler, tmp_path, seeds, 1.0, "ddim", 2, batch_size=12, progress=False)
    with np.load(pack_npz(tmp_path, seeds, num_classes=10)) as packed:
        assert packed["arr_0"].shape == (12, 8, 8, 1)
        assert packed["labels"].tolist() == [s % 10 for s in seeds] and packed["seeds"].tolist() == seeds


def test_torchrun_two_ranks_match_one_process(sampler, run_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "evaluation.sample",
                    "--run-dir", str(run_dir), "--out", str(tmp_path), "--seeds", "0-5", "--sampler", "ddim",
                    "--steps", "2", "--guidance", "1.5", "--batch-size", "2", "--npz", "--no-progress"],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    folder = tmp_path / "ddim-2-g1.5-eta0"
    assert (folder / "samples.npz").is_file()
    single_process = Sampler(run_dir)(list(range(6)), 1.5, "ddim", 2)["images"]
    assert np.array_equal(images_in(folder, list(range(6))), single_process)


def test_prompts_condition_a_text_run(tmp_path):
    run = tmp_path / "text-run"
    config, _, _ = parse_args(["--preset", "text-tiny-digits", *TINY_RUN[2:], "--run-dir", str(run)])
    train(config, run, progress=False)
    prompts = ["a photo of a 3.", "a photo of a 7."]
    sampler = Sampler(run, prompts)
    kwargs, null_kwargs, labels, used = sampler.conditioner([0, 1, 2])
    assert used == [prompts[0], prompts[1], prompts[0]] and labels is None
    assert kwargs["context"].shape[0] == 3 and not torch.equal(kwargs["context"], null_kwargs["context"])
    generate(sampler, tmp_path / "out", [0, 1, 2], 2.0, "ddim", 2, batch_size=2, progress=False)
    assert len(list((tmp_path / "out").glob("*.png"))) == 3
    with pytest.raises(ValueError, match="prompts"):
        Sampler(run)                                             # a text run needs prompts


def test_bad_inputs(sampler, run_dir, tmp_path):
    with pytest.raises(CheckpointError, match="run-dir"):
        Sampler(tmp_path / "no-run")
    with pytest.raises(ValueError, match="sampler"):
        generate(sampler, tmp_path, [0], 1.0, "euler", 3)
    with pytest.raises(ValueError, match="seeds"):
        generate(sampler, tmp_path, [-1], 1.0, "ddim", 3)
    with pytest.raises(ValueError, match="seeds"):
        parse_seeds("0-x")
    assert parse_seeds("0-2,7") == [0, 1, 2, 7]
    with pytest.raises(FileNotFoundError, match="prompts"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "prompts.txt").write_text("a four\n\n")
    with pytest.raises(ValueError, match="prompts"):
        Sampler(run_dir, read_prompts(tmp_path / "prompts.txt"))   # a class run has no text encoder
    with pytest.raises(FileNotFoundError, match="out_dir"):
        load_samples(tmp_path / "empty", [0])
