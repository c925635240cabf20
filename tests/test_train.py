"""End-to-end training runs on the 8x8 digits with a micro DiT: single process, resume after SIGKILL (bit-identical
to an uninterrupted run), truncated checkpoints, non-finite losses, bad flags, resolution transfer."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import training.train as train_module
from training.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, load_ema_model
from training.data import DatasetError
from training.train import main, parse_args, train

REPO = Path(__file__).resolve().parents[1]
# Small and quick: 2-block width-64 DiT, batch 16, CEP-U, symmetric corruption at 5 %.
TINY = ["--preset", "dit-tiny-digits", "--set", "model.preset=DiT-micro/2", "--batch-size", "16",
        "--cep", "uniform", "--cep-gamma", "1.0", "--corruption", "symmetric", "--corruption-ratio", "0.05",
        "--no-progress", "--set", "logging.num_samples=4", "--set", "logging.sample_steps=3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread, as the subprocesses get: with pytest-xdist every core already runs a test worker, and
    oversubscribed OpenMP threads make these tiny models several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(*args, check=True):
    return subprocess.run([sys.executable, "-m", "training.train", *TINY, *args], cwd=REPO, env=ENV, check=check,
                          capture_output=True, text=True, timeout=600)


def run_ok(command: list[str]) -> subprocess.CompletedProcess:
    """Runs a CLI in the repo; a failure shows the command and the tail of its stderr (not just the exit code)."""
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-4000:]}"
    return result


def weights(run_dir) -> dict:
    state = load_checkpoint(latest_checkpoint(run_dir))
    return {"model": state["model"], "ema": state["ema"], "optimizer": state["optimizer"]["state"],
            "images_seen": state["images_seen"]}


def assert_same_weights(a: dict, b: dict):
    assert a["images_seen"] == b["images_seen"]
    for part in ("model", "ema"):
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{part}.{name} differs"
    for index in a["optimizer"]:
        for key, value in a["optimizer"][index].items():
            assert torch.equal(value, b["optimizer"][index][key]), f"optimizer {index}.{key} differs"


def test_run_dir_layout_and_ema_export(tmp_path):
    run_dir = tmp_path / "run"
    config, _, _ = parse_args([*TINY, "--run-dir", str(run_dir), "--total-images", "64",
                               "--checkpoint-every-images", "32", "--keep-checkpoints", "1"])
    record = train(config, run_dir, progress=False)
    assert record["images_seen"] == 64 and record["world_size"] == 1 and np.isfinite(record["loss"])
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["data"]["class_names"] == [str(i) for i in range(10)] and saved["model"]["num_classes"] == 10
    assert saved["model"]["cep_mode"] == "uniform" and saved["model"]["cep_gamma"] == 1.0
    assert [p.name for p in list_checkpoints(run_dir)] == ["ckpt-000000064.pt"]
    corruption = np.load(run_dir / "corruption.npz")
    assert len(corruption["corrupted_indices"]) == round(0.05 * 1797)
    changed = np.nonzero(corruption["clean_labels"] != corruption["corrupted_labels"])[0]
    assert (changed == corruption["corrupted_indices"]).all()
    assert (run_dir / "samples" / "samples-000000064.png").is_file()
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["images_seen"] == 64
    model, ema_config = load_ema_model(run_dir)
    state = load_checkpoint(latest_checkpoint(run_dir))
    assert ema_config == state["config"]
    assert all(torch.equal(v, state["ema"][k]) for k, v in model.state_dict().items())
    # an EMA that moved away from the initial weights but not all the way to the trained ones
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    flags = ["--total-images", "640", "--checkpoint-every-images", "64", "--keep-checkpoints", "2"]
    killed, uninterrupted = tmp_path / "killed", tmp_path / "uninterrupted"
    command = [sys.executable, "-m", "training.train", *TINY, *flags, "--run-dir"]
    reference = subprocess.Popen([*command, str(uninterrupted)], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen([*command, str(killed)], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list_checkpoints(killed) and time.time() < deadline and victim.poll() is None:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert load_checkpoint(latest_checkpoint(killed))["images_seen"] < 640
    rerun = run_cli(*flags, "--run-dir", str(killed))  # the same command again resumes
    assert "resumed from" in rerun.stdout
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]
    assert_same_weights(weights(uninterrupted), weights(killed))


def test_resume_with_a_different_config_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    main([*TINY, "--run-dir", str(run_dir), "--total-images", "16"])
    with pytest.raises(ValueError, match="different config.*corruption.ratio"):
        train(*parse_args([*TINY, "--run-dir", str(run_dir), "--total-images", "32", "--corruption-ratio", "0.1"]))


class NonFiniteEvery:
    """Wraps a denoiser; its output is NaN on the calls for which `bad(call_index)` is true."""

    def __init__(self, bad):
        self.bad, self.calls = bad, 0

    def __call__(self, config):
        model = train_module_build(config)
        wrapper = self

        def hook(module, inputs, output):
            wrapper.calls += 1
            return output * float("nan") if wrapper.bad(wrapper.calls) else output

        model.register_forward_hook(hook)
        return model


train_module_build = train_module.build_model


def test_nonfinite_loss_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "build_model", NonFiniteEvery(lambda call: call % 2 == 0))
    config, _, _ = parse_args([*TINY, "--run-dir", str(tmp_path), "--total-images", "96"])
    record = train(config, tmp_path, progress=False)
    assert record["nonfinite_total"] == 3 and np.isfinite(record["loss"])
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_repeated_nonfinite_loss_aborts(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "build_model", NonFiniteEvery(lambda call: True))
    config, _, _ = parse_args([*TINY, "--run-dir", str(tmp_path), "--total-images", "160", "--max-nonfinite", "3"])
    with pytest.raises(RuntimeError, match="3 consecutive steps had a non-finite loss"):
        train(config, tmp_path, progress=False)


@pytest.mark.parametrize("flags, error, message", [
    (["--batch-size", "0"], ValueError, "--batch-size"),
    (["--batch-size", "15", "--grad-accum", "2"], ValueError, "--batch-size 15 must be divisible"),
    (["--precision", "fp8"], ValueError, "--precision"),
    (["--lr", "-1"], ValueError, "--lr"),
    (["--ema-decay", "1.0"], ValueError, "--ema-decay"),
    (["--seed", "-1"], ValueError, "--seed"),
    (["--corruption-ratio", "1.5"], ValueError, "--corruption-ratio"),
    (["--corruption", "flip-all"], ValueError, "--corruption"),
    (["--corruption", "asymmetric"], ValueError, "--corruption-classes"),
    (["--corruption", "caption-swap"], ValueError, "caption-swap"),
    (["--cep", "laplace"], ValueError, "--cep"),
    (["--cep-gamma", "-1"], ValueError, "--cep-gamma"),
    (["--dataset", "/nonexistent/data"], DatasetError, "/nonexistent/data"),
    (["--dataset", "mnist", "--data-path", "/nonexistent"], DatasetError, "/nonexistent/mnist.npz"),
    (["--init-from", "/nonexistent/run"], CheckpointError, "--init-from /nonexistent/run does not exist"),
])
def test_bad_flags_name_the_flag(tmp_path, flags, error, message):
    with pytest.raises(error, match=message):
        train(*parse_args([*TINY, "--run-dir", str(tmp_path), "--total-images", "16", *flags]))


def test_unknown_preset_and_flag_values(tmp_path, capsys):
    with pytest.raises(SystemExit, match="2"):
        main(["--preset", "nope", "--run-dir", str(tmp_path)])
    assert "error: --preset: 'nope' not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*TINY, "--run-dir", str(tmp_path), "--corruption-classes", "1,x"])
    assert "--corruption-classes" in capsys.readouterr().err


def test_resolution_transfer_from_a_lower_resolution_run(tmp_path):
    low = tmp_path / "low"
    main([*TINY, "--run-dir", str(low), "--total-images", "32"])
    high = tmp_path / "high"
    main([*TINY, "--run-dir", str(high), "--total-images", "32", "--image-size", "16", "--init-from", str(low),
          "--resolution-shift", "2.0"])
    config = json.loads((high / "config.json").read_text())
    assert config["model"]["input_size"] == 16 and config["diffusion"]["resolution_shift"] == 2.0
    assert config["model"]["pos_embed_base_size"] == 8  # interpolated to the source grid by default
    low_state, high_state = load_checkpoint(latest_checkpoint(low)), load_checkpoint(latest_checkpoint(high))
    # same parameter shapes at both resolutions: DiT's positional table is recomputed, not stored
    assert {k: v.shape for k, v in low_state["model"].items()} == {k: v.shape for k, v in high_state["model"].items()}
    assert "initialised from the EMA weights" in (high / "log.txt").read_text()
    extrapolated = tmp_path / "extrapolated"   # paper 2's other arm: positions 0..G-1 on the new grid
    main([*TINY, "--run-dir", str(extrapolated), "--total-images", "16", "--image-size", "16", "--init-from", str(low),
          "--set", "model.pos_embed_base_size=null"])
    assert json.loads((extrapolated / "config.json").read_text())["model"]["pos_embed_base_size"] is None


def test_set_overrides(tmp_path):
    config, _, _ = parse_args([*TINY, "--run-dir", str(tmp_path), "--set", "training.adam_betas=[0.9, 0.95]",
                               "--set", "model.preset=DiT-tiny/2"])
    assert config["training"]["adam_betas"] == [0.9, 0.95] and config["model"]["preset"] == "DiT-tiny/2"
    with pytest.raises(ValueError, match="--set needs KEY=JSON"):
        parse_args([*TINY, "--run-dir", str(tmp_path), "--set", "model.depth"])
