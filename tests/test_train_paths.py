"""The other training paths, a few steps each: LDM on a trained autoencoder's cached latents, text conditioning with
caption swapping, the U-Net, the embedding baselines (IP, dropout, label smoothing, random flips), accumulation+bf16."""
import json

import numpy as np
import pytest
import torch

from models.autoencoder import load_autoencoder
from test_train import TINY, single_thread  # noqa: F401 (autouse fixture)
from training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_ema_model, load_ema_text_encoder
from training.train import main
from training.train_autoencoder import main as main_autoencoder

AUTOENCODER = ["--preset", "vq-f4-tiny", "--image-size", "16", "--batch-size", "16", "--total-images", "64",
               "--checkpoint-every-images", "32"]


def test_autoencoder_then_latent_diffusion(tmp_path):
    main_autoencoder([*AUTOENCODER, "--run-dir", str(tmp_path / "ae")])
    autoencoder, config = load_autoencoder(tmp_path / "ae" / "autoencoder.pt")
    assert config["preset"] == "vq-f4-tiny" and float(autoencoder.scale_factor) != 1.0
    assert (tmp_path / "ae" / "reconstructions.png").is_file()
    main_autoencoder([*AUTOENCODER, "--total-images", "96", "--run-dir", str(tmp_path / "ae")])  # resumes
    assert "resumed from" in (tmp_path / "ae" / "log.txt").read_text()

    run_dir = tmp_path / "ldm"
    main([*TINY, "--run-dir", str(run_dir), "--image-size", "16", "--autoencoder", str(tmp_path / "ae"),
          "--hflip", "--total-images", "32"])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["in_channels"] == 3 and config["model"]["input_size"] == 4  # 16 px / f4
    cache = torch.load(run_dir / "latents.pt", weights_only=True)
    assert cache["latents"].shape == (1797, 3, 4, 4) and cache["flipped"].shape == (1797, 3, 4, 4)
    assert not torch.equal(cache["latents"], cache["flipped"])
    assert (run_dir / "samples" / "samples-000000032.png").is_file()

    crops = tmp_path / "ldm-crops"    # paper 2's crop conditioning on latents: 18 px stored, 16 px crops
    main([*TINY, "--run-dir", str(crops), "--image-size", "16", "--autoencoder", str(tmp_path / "ae"), "--random-crop",
          "--set", "data.crop_margin=2", "--set", "model.control_dim=5", "--total-images", "32"])
    assert json.loads((crops / "config.json").read_text())["model"]["input_size"] == 4
    assert not (crops / "latents.pt").exists()   # crops are encoded per batch
    with pytest.raises(SystemExit, match="2"):   # python -m training.train: error: --autoencoder: ... does not exist
        main([*TINY, "--run-dir", str(tmp_path / "x"), "--autoencoder", str(tmp_path / "none")])


def test_random_crops_are_encoded_per_batch_with_their_control():
    from training.data import PixelSource, augment, load_dataset
    from training.latents import EncodedCropSource

    dataset = load_dataset("digits", image_size=6, crop_margin=2)
    autoencoder = torch.nn.Conv2d(1, 3, 2, stride=2)
    autoencoder.encode = autoencoder.forward
    source = EncodedCropSource(PixelSource(dataset, 6, hflip=True, random_crop=True), autoencoder, "cpu")
    indices = torch.arange(40)
    x, control = source.batch(indices, torch.Generator().manual_seed(3))
    pixels, expected = augment(dataset.images[indices], dataset.original_sizes[indices], 6, True, True,
                               torch.Generator().manual_seed(3))
    torch.testing.assert_close(control, expected)
    assert control[:, :2].unique(dim=0).shape[0] > 1 and control[:, 4].unique().numel() == 2  # crops and flips vary
    with torch.no_grad():
        torch.testing.assert_close(x, autoencoder(pixels))   # the latent of each crop, not a crop of a latent


def test_text_conditioning_with_caption_swap(tmp_path):
    run_dir = tmp_path / "text"
    main([*TINY, "--run-dir", str(run_dir), "--set", "data.condition=text", "--corruption", "caption-swap",
          "--corruption-ratio", "0.1", "--total-images", "32"])
    corruption = np.load(run_dir / "corruption.npz")
    assert sorted(corruption["clean_captions"]) == sorted(corruption["corrupted_captions"])
    swapped = np.nonzero(corruption["clean_captions"] != corruption["corrupted_captions"])[0]
    assert len(swapped) > 0 and set(swapped) <= set(corruption["corrupted_indices"])
    model, config = load_ema_model(run_dir)
    encoder = load_ema_text_encoder(run_dir)
    context, mask = encoder.encode(["a photo of a 3.", ""])
    assert config["model"]["context_dim"] == context.shape[-1]
    out = model(torch.zeros(2, 1, 8, 8), torch.tensor([10, 10]), context=context, context_mask=mask)
    assert out.shape == (2, 1, 8, 8)
    with pytest.raises(CheckpointError, match="text encoder"):
        load_ema_text_encoder(tmp_path)


def test_unet_with_cep_gaussian(tmp_path):
    main([*TINY, "--run-dir", str(tmp_path), "--set", "model.arch=unet", "--set", "model.preset=UNet-micro",
          "--cep", "gaussian", "--total-images", "32"])
    model, config = load_ema_model(tmp_path)
    assert config["model"]["image_size"] == 8 and model.cep.mode == "gaussian"


@pytest.mark.parametrize("flags", [
    ["--input-perturbation", "0.1"],
    ["--cond-dropout", "0.1", "--label-smoothing", "0.1", "--corruption", "random"],
    ["--grad-accum", "2", "--precision", "bf16", "--warmup-images", "32", "--hflip"],
    ["--precision", "fp16"],
    ["--set", "model.cond_mode=cross-attention", "--set", "model.control_dim=5", "--hflip"],
])
def test_baselines_and_precision(tmp_path, flags):
    main([*TINY, "--run-dir", str(tmp_path), "--total-images", "32", *flags])
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["images_seen"] == 32 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_image_folder_with_random_crops_and_control(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (12, 14, 3), dtype=np.uint8)).save(tmp_path / "data" / name / f"{i}.png")
    run_dir = tmp_path / "run"
    main([*TINY, "--run-dir", str(run_dir), "--dataset", str(tmp_path / "data"), "--set", "data.channels=3",
          "--random-crop", "--set", "data.crop_margin=2", "--hflip", "--set", "model.control_dim=5",
          "--corruption-ratio", "0.25", "--total-images", "32"])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data"]["class_names"] == ["a", "b"] and config["model"]["in_channels"] == 3
    assert len(np.load(run_dir / "corruption.npz")["corrupted_indices"]) == 2  # 25 % of 8


def test_label_smoothing_and_dropout_change_the_embedding():
    from models.conditioning import ClassEmbedder
    from training.regularizers import attach_embedding_regularizers

    torch.manual_seed(0)
    embedder = ClassEmbedder(4, 8, dropout_prob=0.0)
    labels = torch.tensor([0, 1, 4])  # 4 = null class
    clean = embedder(labels)
    attach_embedding_regularizers(embedder, label_smoothing=0.5)
    smoothed = embedder(labels)
    table = embedder.embedding_table.weight
    assert torch.allclose(smoothed[0], 0.5 * table[0] + 0.5 * table[:4].mean(0))
    assert torch.equal(smoothed[2], clean[2])  # the null class is not smoothed
    assert torch.equal(embedder.eval()(labels), clean)  # training only
    with pytest.raises(ValueError, match="cond_dropout"):
        attach_embedding_regularizers(embedder, dropout=1.0)
