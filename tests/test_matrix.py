"""End to end for every config family: train a few dozen images, resume once, sample with every sampler, evaluate
and build the report; a subset also under `torchrun --nproc_per_node=2` (see test_two_processes). Kept fast with
micro models, 32-image runs and a 3-step sampler; the autoencoders are trained once per module."""
import json
import sys

import numpy as np
import pytest

from evaluation import report
from evaluation.evaluate import evaluate, parser as evaluate_parser
from evaluation.sample import Sampler
from models.diffusion import SAMPLERS
from test_train import ENV, REPO, TINY, run_ok, single_thread  # noqa: F401 (autouse fixture)
from training.train import main
from training.train_autoencoder import main as main_autoencoder

UNET = ["--set", "model.arch=unet", "--set", "model.preset=UNet-micro"]
FAMILIES = {
    "dit-pixel": [],
    "dit-paper2": ["--set", "model.cond_mode=cross-attention", "--set", "model.control_dim=5", "--hflip"],
    "unet-pixel": UNET,
    "ldm-vq": [*UNET, "--image-size", "16", "--autoencoder", "{ae-vq}"],
    "ldm-kl": [*UNET, "--image-size", "16", "--autoencoder", "{ae-kl}"],
    "text": ["--set", "data.condition=text", "--corruption", "caption-swap", "--corruption-ratio", "0.1"],
}
PROMPTS = [f"a photo of a {digit}." for digit in range(10)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    for kind in ("vq", "kl"):
        main_autoencoder(["--preset", f"{kind}-f4-tiny", "--image-size", "16", "--batch-size", "16",
                          "--total-images", "32", "--set", "autoencoder.ch=8", "--no-progress",
                          "--run-dir", str(root / f"ae-{kind}")])
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def family_flags(family: str, root) -> list[str]:
    return [flag.format(**{"ae-vq": root / "ae-vq", "ae-kl": root / "ae-kl"}) for flag in FAMILIES[family]]


def evaluate_run(run_dir, root, family):
    argv = ["--run-dir", str(run_dir), "--num-samples", "8", "--steps", "3", "--sampler", "ddim", "--guidance",
            "1.0", "2.0", "--cache-dir", str(root / "cache"), "--classifier-steps", "20", "--kid-subsets", "2",
            "--kid-subset-size", "4", "--is-splits", "2", "--no-progress"]
    if family == "text":
        argv += ["--prompts", str(root / "prompts.txt")]
    return evaluate(evaluate_parser().parse_args(argv))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_resumes_samples_evaluates_and_reports(workspace, family):
    run_dir = workspace / family
    flags = [*TINY, *family_flags(family, workspace), "--run-dir", str(run_dir), "--checkpoint-every-images", "16"]
    main([*flags, "--total-images", "16"])
    main([*flags, "--total-images", "32"])
    assert "resumed from" in (run_dir / "log.txt").read_text()
    assert (run_dir / "samples" / "samples-000000032.png").is_file()   # training's grid, evaluation's sampler
    prompts = PROMPTS if family == "text" else None
    sampler = Sampler(run_dir, prompts)
    for method in SAMPLERS:
        images = sampler([0, 1, 2], 1.5, method, 3)["images"]
        assert images.shape[:3] == (3, 16, 16) if "ldm" in family else images.shape[:3] == (3, 8, 8)
    records = evaluate_run(run_dir, workspace, family)
    assert [r["guidance"] for r in records] == [1.0, 2.0]
    assert all(np.isfinite(r["metrics"]["fid"]) for r in records)
    report.main(["--runs", str(run_dir), "--out", str(workspace / f"report-{family}")])
    assert (workspace / f"report-{family}" / "report.md").is_file()


@pytest.mark.parametrize("family", ["dit-paper2", "ldm-kl"])
def test_two_processes(workspace, family, tmp_path):
    """torchrun --nproc_per_node=2 for the families with the most moving parts (control metadata; latents):
    train, resume, evaluate. The other families share every line of this path with them."""
    run_dir = tmp_path / family
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    flags = [*TINY, *family_flags(family, workspace), "--run-dir", str(run_dir), "--checkpoint-every-images", "16"]
    for total in ("16", "32"):
        run_ok([*torchrun, "-m", "training.train", *flags, "--total-images", total])
    assert "resumed from" in (run_dir / "log.txt").read_text()
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["world_size"] == 2 and stats[-1]["images_seen"] == 32
    run_ok([*torchrun, "-m", "evaluation.evaluate", "--run-dir", str(run_dir), "--num-samples", "8", "--steps", "3",
            "--sampler", "dpm++2m", "--guidance", "1.5", "--cache-dir", str(workspace / "cache"),
            "--classifier-steps", "20", "--kid-subsets", "2", "--kid-subset-size", "4", "--is-splits", "2",
            "--no-progress"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["world_size"] == 2 and np.isfinite(records[-1]["metrics"]["fid"])


@pytest.mark.parametrize("preset", ["kl-f4-tiny", "vq-f4-tiny"])
def test_autoencoder_under_two_processes(tmp_path, preset):
    """train_autoencoder's loss goes through DDP; the replicas (VQ: with the code-usage counts) are checked
    bit-identical at every checkpoint."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run_ok([*torchrun, "-m", "training.train_autoencoder", "--preset", preset, "--image-size", "8",
            "--batch-size", "16", "--total-images", "32", "--log-every-images", "16", "--checkpoint-every-images", "16",
            "--set", "autoencoder.ch=8", "--no-progress", "--run-dir", str(tmp_path)])
    stats = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [s["images_seen"] for s in stats] == [16, 32] and (tmp_path / "autoencoder.pt").is_file()
    assert all(0 < s["codebook_usage"] <= 1 if preset == "vq-f4-tiny" else "codebook_usage" not in s for s in stats)
