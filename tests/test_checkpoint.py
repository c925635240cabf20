"""Atomic checkpoints, keep-last-K, truncation detection, EMA export and the EMA helper."""
import pytest
import torch
from torch import nn

from training.checkpoint import (CheckpointError, export_ema, latest_checkpoint, list_checkpoints, load_checkpoint,
                                 resolve_checkpoint, save_checkpoint)
from training.ema import EMA


def state(value: float) -> dict:
    return {"model": {"w": torch.full((3,), value)}, "images_seen": int(value), "config": {"seed": 0}}


def test_save_load_keep_last(tmp_path):
    for images in (64, 128, 192, 256):
        save_checkpoint(tmp_path, images, state(images), keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["ckpt-000000192.pt", "ckpt-000000256.pt"]
    loaded = load_checkpoint(latest_checkpoint(tmp_path))
    assert loaded["images_seen"] == 256 and torch.equal(loaded["model"]["w"], torch.full((3,), 256.0))
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))  # no temp files left behind


def test_truncated_checkpoint_is_detected(tmp_path):
    path = save_checkpoint(tmp_path, 10, state(1.0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ckpt-000000010\.pt.*truncated or corrupt"):
        load_checkpoint(path)


def test_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a cepdiff"):
        load_checkpoint(tmp_path / "foreign.pt")
    assert latest_checkpoint(tmp_path) is None


def test_resolve_checkpoint_names_the_flag(tmp_path):
    with pytest.raises(CheckpointError, match="--init-from .* has no checkpoints"):
        resolve_checkpoint(tmp_path)
    save_checkpoint(tmp_path, 5, state(1.0))
    assert resolve_checkpoint(tmp_path).name == "ckpt-000000005.pt"
    with pytest.raises(CheckpointError, match="--other .*nope does not exist"):
        resolve_checkpoint(tmp_path / "nope", "--other")


def test_interrupted_write_keeps_previous(tmp_path):
    save_checkpoint(tmp_path, 1, state(1.0))

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(Exception):
        save_checkpoint(tmp_path, 2, {"config": {}, "bad": Unsaveable()})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000000001.pt"]
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))


def test_export_ema_roundtrip(tmp_path):
    from safetensors.torch import load_file
    export_ema(tmp_path, {"model": nn.Linear(2, 2, bias=False)}, {"model": {"arch": "x"}})
    assert load_file(str(tmp_path / "ema.safetensors"))["weight"].shape == (2, 2)
    assert (tmp_path / "ema.json").read_text().strip().startswith("{")


def test_ema_update_and_decay_validation():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model.weight.add_(2.0)
    before = ema.model.weight.clone()
    ema.update(model)
    assert torch.allclose(ema.model.weight, 0.5 * before + 0.5 * model.weight)
    assert not ema.model.weight.requires_grad
    assert EMA(model, decay=0.9999).current_decay() == pytest.approx(0.1)  # warm-up: (1+0)/(10+0)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)
