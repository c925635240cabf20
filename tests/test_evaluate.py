"""evaluation/evaluate.py and report.py end to end on a tiny trained run."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evaluation import report
from evaluation.evaluate import evaluate, parser
from evaluation.features import DigitClassifier
from models.autoencoder import build_autoencoder, save_autoencoder
from training.train import parse_args, train

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = ["--preset", "dit-tiny-digits", "--set", "model.preset=DiT-micro/2", "--batch-size", "16",
            "--total-images", "32", "--no-progress", "--set", "logging.num_samples=2",
            "--set", "logging.sample_steps=2", "--corruption", "symmetric", "--corruption-ratio", "0.05"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny run, evaluated at two guidance scales with the per-data-set classifier and a tiny VQ codebook."""
    root = tmp_path_factory.mktemp("eval")
    run = root / "run"
    config, _, _ = parse_args([*TINY_RUN, "--run-dir", str(run)])
    train(config, run, progress=False)
    torch.manual_seed(0)
    vq_config = {"preset": "vq-f4-tiny", "n_embed": 16}
    save_autoencoder(build_autoencoder(vq_config), vq_config, root / "vq.pt")
    argv = ["--run-dir", str(run), "--num-samples", "24", "--steps", "3", "--sampler", "ddim",
            "--guidance", "1.0", "2.0", "--batch-size", "12", "--cache-dir", str(root / "cache"),
            "--classifier-steps", "200", "--kid-subsets", "5", "--kid-subset-size", "20", "--is-splits", "2",
            "--vq-autoencoder", str(root / "vq.pt"), "--no-progress"]
    records = evaluate(parser().parse_args(argv))
    return run, root, argv, records


def test_metrics_jsonl_holds_every_setting(evaluated):
    run, root, _, records = evaluated
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines == records and [r["guidance"] for r in lines] == [1.0, 2.0]
    for record in lines:
        values = record["metrics"]
        for key in ("fid", "sfid", "is", "kid", "precision", "recall", "rmd_top", "memorization_ratio",
                    "top5_l2", "vq_entropy", "label_agreement", "com_offset"):
            assert math.isfinite(values[key]), key
        assert 0 <= values["precision"] <= 1 and 0 <= values["recall"] <= 1 and values["fid"] > 0
        assert 0 < values["vq_entropy"] <= math.log(16) + 1e-9
        assert record["settings"]["entropy_temperature"] == 1.0
        assert "top_pr_skipped" in values          # 24 samples are too few for TopP&R's balloon bandwidth
        assert record["num_samples"] == 24 and record["sampler"] == "ddim" and record["steps"] == 3
        assert record["extractor"]["kind"] == "digit-classifier" and record["extractor"]["test_accuracy"] > 0.8
        assert len(record["extractor"]["fingerprint"]) == 16 and record["extractor"]["steps"] == 200
        assert set(record["versions"]) >= {"torch", "torchmetrics"}
        assert record["run"]["corruption"]["ratio"] == 0.05
        assert record["reference"] == {"split": "train", "num": 1797, "num_train": 1797, "dataset": "digits"}
        assert "memorization_ratio_held_out" not in values     # the reference is the train split itself
        assert record["timing"]["sample_seconds_per_1000"] > 0
        assert len(list(Path(record["samples_dir"]).glob("*.png"))) == 24


def test_held_out_memorisation_scores_fresh_images_against_the_train_split():
    from evaluation import metrics
    from evaluation.evaluate import held_out_memorisation
    train = {"pool": torch.randn(50, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)}
    near = {"pool": torch.cat([train["pool"][:10] * 1.001, -train["pool"][:10]])}   # copies, then far directions
    scores = held_out_memorisation(near, train, "test", 10, 0.12)               # the first 10: the copies
    assert scores == {"memorization_ratio_held_out": 1.0,
                      "top5_l2_held_out": pytest.approx(metrics.mean_topk_distance(near["pool"][:10], train["pool"]))}
    assert held_out_memorisation(near, train, "test", 20, 0.12)["memorization_ratio_held_out"] < 1.0
    assert held_out_memorisation(near, train, "train", 10, 0.12) == {}


def test_rerun_resumes_and_reproduces(evaluated):
    run, _, argv, records = evaluated
    again = evaluate(parser().parse_args(argv))
    assert [r["metrics"] for r in again] == [r["metrics"] for r in records]   # same seeds -> same numbers
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    assert [r["timing"]["samples_reused"] for r in again] == [24, 24]
    assert again[0]["timing"]["sample_seconds_per_1000"] is None


def test_torchrun_two_ranks_reproduce_the_single_process_numbers(evaluated, tmp_path):
    """Ranks split the seeds; rank 0 scores. Also guards against metric code joining collectives (torchmetrics' sync)
    that would pair with the other rank's sampling barriers."""
    run, _, argv, records = evaluated
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("samples", "metrics.jsonl"))
    argv = [copy.as_posix() if a == str(run) else a for a in argv]
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "evaluation.evaluate", *argv],
                   cwd=REPO, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    lines = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in lines] == [2, 2]
    for two_ranks, one in zip(lines, records):   # float64 BLAS reductions (sFID's sqrtm) may split differently
        assert two_ranks["metrics"].keys() == one["metrics"].keys()
        for key, value in one["metrics"].items():
            assert two_ranks["metrics"][key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value)


def test_exported_extractor_by_path(evaluated):
    run, root, argv, _ = evaluated

    class PoolOnly(torch.nn.Module):   # what a user-exported image tower might return: pooled features only
        def __init__(self):
            super().__init__()
            self.net = DigitClassifier()

        def forward(self, x):
            return self.net(x)["pool"]

    path = root / "pool_only.pt"
    torch.jit.save(torch.jit.script(PoolOnly()), str(path))
    records = evaluate(parser().parse_args([*argv[:argv.index("--vq-autoencoder")], "--no-progress",
                                            "--guidance", "1.0", "--extractor", str(path)]))
    values = records[0]["metrics"]
    assert "fid" in values and "is" not in values and "sfid" not in values and "vq_entropy" not in values
    assert records[0]["extractor"]["kind"] == "scripted" and records[0]["extractor"]["path"] == str(path)


def test_report_table_plots_and_grids(evaluated, tmp_path):
    run, _, _, _ = evaluated
    path = report.write_report([run], tmp_path)
    text = path.read_text()
    assert "| run | corruption eta | CEP |" in text and "FID" in text and "Entropy" in text
    assert (tmp_path / "fid_vs_guidance.png").is_file() and (tmp_path / "fid_vs_eta.png").is_file()
    assert len(list(tmp_path.glob("samples_*.png"))) >= 2


def test_entropy_temperature_is_a_number_or_the_quantization_error(evaluated, capsys):
    from evaluation import metrics
    from evaluation.evaluate import load_reference, vq_latents, vq_temperature
    from models.autoencoder import load_autoencoder
    run, root, argv, _ = evaluated
    vq = load_autoencoder(root / "vq.pt")[0]
    assert parser().parse_args([*argv, "--entropy-temperature", "quantization"]).entropy_temperature == "quantization"
    train = load_reference(json.loads((run / "config.json").read_text()))["train_images"]    # 1797 digits
    latents = vq_latents(vq, "encode", {"images": train})
    assert vq_temperature("quantization", vq, train) == metrics.quantization_temperature(latents, vq.codebook.detach())
    assert vq_temperature(0.5, vq, train) == 0.5 and vq_temperature("quantization", None, train) is None
    for bad in ("hot", "0", "-1", "nan"):
        with pytest.raises(SystemExit):
            parser().parse_args([*argv, "--entropy-temperature", bad])
        assert "--entropy-temperature" in capsys.readouterr().err


def test_help_and_bad_inputs(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "evaluation.evaluate", "--help"], cwd=REPO, check=True,
                               capture_output=True, text=True).stdout
    assert "--guidance" in help_text and "metrics.jsonl" in help_text
    with pytest.raises(FileNotFoundError, match="run_dir"):
        evaluate(parser().parse_args(["--run-dir", str(tmp_path / "missing")]))
    with pytest.raises(FileNotFoundError, match="runs"):
        report.load_records([tmp_path])
    (tmp_path / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="runs"):
        report.load_records([tmp_path])
