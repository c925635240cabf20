"""Sample N images from a run's EMA weights: one seed per image, class-balanced labels (or prompts from a file),
DDPM / DDIM / DPM-Solver++ with classifier-free guidance, split over torchrun ranks, resumable.

Image `seed` always gets the same noise (its own torch.Generator, EDM2's per-seed generation), the same label
(seed % num_classes) and the same prompt (prompts[seed % len(prompts)]), so results do not depend on the batch size
or the number of ranks, and a re-run skips seeds already written.

    torchrun --standalone --nproc_per_node=2 -m evaluation.sample --run-dir runs/x --out runs/x/samples/g2 \
        --num-samples 1000 --sampler dpm++2m --steps 50 --guidance 2.0
"""
import argparse
import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from models.diffusion import SAMPLERS, sample
from training import cli, distributed
from training.loading import LoadedRun, load_run
from training.text import NULL_CAPTION


#################################################################################
#                        Conditions for one batch of seeds                      #
#################################################################################

def read_prompts(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts: no prompt file at {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts: {path} holds no non-empty line")
    return prompts


class Conditioner:
    """Seeds -> (model_kwargs, null_kwargs, labels, prompts) for the run's condition type."""

    def __init__(self, run: LoadedRun, prompts: list[str] | None = None, device="cpu"):
        model, data = run.config["model"], run.config["data"]
        self.num_classes = model.get("num_classes", 0)
        self.prompts, self.device, self.text_encoder = prompts, device, None
        if prompts is not None:
            if data.get("condition") != "text":
                raise ValueError(f"prompts: the run is not text-conditional (data.condition = "
                                 f"{data.get('condition')!r})")
            self.text_encoder = run.text_encoder
        elif data.get("condition") == "text":
            raise ValueError("prompts: the run is text-conditional; pass a prompt file")
        # Paper 2's control metadata at sampling time: training.data.sampling_control, an in-distribution vector
        # (centre crop, the data's most common original size, no flip) recorded in the config by training.
        self.control = None
        if model.get("control_dim", 0):
            self.control = torch.tensor(data["sample_control"], device=device)

    def __call__(self, seeds: list[int]):
        count = len(seeds)
        kwargs, null_kwargs, labels, prompts = {}, {}, None, None
        if self.text_encoder is not None:
            prompts = [self.prompts[s % len(self.prompts)] for s in seeds]
            kwargs["context"], kwargs["context_mask"] = self.text_encoder.encode(prompts)
            null_kwargs["context"], null_kwargs["context_mask"] = self.text_encoder.encode([NULL_CAPTION] * count)
        elif self.num_classes:
            labels = torch.tensor(seeds, device=self.device) % self.num_classes
            kwargs["y"] = labels
            null_kwargs["y"] = torch.full_like(labels, self.num_classes)   # row num_classes = the CFG null class
        if self.control is not None:
            kwargs["control"] = null_kwargs["control"] = self.control.expand(count, -1)
        return kwargs, null_kwargs, labels, prompts


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float [N, C, H, W] -> uint8 [N, H, W, C] (the rounding of training/stats.save_image_grid)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


#################################################################################
#                                    Sampling                                   #
#################################################################################

class Sampler:
    """A run's EMA model + schedule + condition/decoder, ready to turn seed lists into uint8 images."""

    def __init__(self, run, prompts: list[str] | None = None, device="cpu"):
        """run: a run dir, or a training.loading.LoadedRun (training's EMA sample grids)."""
        run = run if isinstance(run, LoadedRun) else load_run(run, device)
        self.model, self.config, self.diffusion, self.decoder = run.model, run.config, run.diffusion, run.decoder
        self.conditioner = Conditioner(run, prompts, device)
        self.text_encoder = run.text_encoder
        self.shape = run.shape
        self.device = device

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of every weight that shapes the images (denoiser, text encoder, decoder): a sample folder made by
        other weights (a run trained further, a re-made autoencoder) must not be reused as if it were this run's."""
        digest = hashlib.sha256()
        for module in (self.model, self.text_encoder, self.decoder):
            for name, tensor in (module.state_dict() if module is not None else {}).items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def __call__(self, seeds: list[int], guidance: float, sampler: str = "dpm++2m", steps: int = 50,
                 eta: float = 0.0) -> dict:
        """{"images": uint8 [N, H, W, C], "labels", "prompts", "latents" (latent runs) or None}."""
        kwargs, null_kwargs, labels, prompts = self.conditioner(seeds)
        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        x = sample(self.model, self.diffusion, (len(seeds), *self.shape), kwargs, null_kwargs, sampler, steps,
                   guidance, generators, eta, device=self.device)
        latents = None
        if self.decoder is not None:
            latents, x = x, self.decoder.decode(x)
        return {"images": to_uint8(x), "labels": labels, "prompts": prompts, "latents": latents}


def sample_settings(sampler: str, steps: int, guidance: float, eta: float, prompts: list[str] | None,
                    weights: str) -> dict:
    return {"sampler": sampler, "steps": steps, "guidance": float(guidance), "eta": float(eta),
            "prompts": prompts, "weights": weights}


def check_settings(out_dir: Path, settings: dict, replace_other_weights: bool = False) -> None:
    """Refuse to resume into a folder written with other settings (mixing them would corrupt every metric). With
    replace_other_weights, samples that differ only in the weights that made them are deleted and made again: the
    folders evaluation.evaluate keeps inside a run dir belong to the run's current weights."""
    path = out_dir / "settings.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = sorted(k for k in settings if previous.get(k) != settings[k])
        if changed == ["weights"] and replace_other_weights:
            print(f"{out_dir}: samples of other weights (sha256 {str(previous.get('weights'))[:12]}), made again")
            for old in [*out_dir.glob("*.png"), *out_dir.glob("*.npy"), *out_dir.glob("samples.npz")]:
                old.unlink()
        elif changed:
            raise ValueError(f"out_dir: {out_dir} holds samples made with different {changed}; use another folder")
        else:
            return
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


def write_png(path: Path, image: np.ndarray) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")   # atomic: a killed rank never leaves half a PNG behind
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp)
    tmp.replace(path)


def generate(sampler: Sampler, out_dir, seeds: list[int], guidance: float, method: str = "dpm++2m",
             steps: int = 50, eta: float = 0.0, batch_size: int = 64, progress: bool = True,
             replace_other_weights: bool = False) -> None:
    """Writes out_dir/{seed:06d}.png (+ .npy latents for latent runs) for this rank's share of `seeds`;
    replace_other_weights: see check_settings."""
    if method not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {method!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError("seeds: expected a non-empty list of non-negative ints")
    out_dir = Path(out_dir)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    if rank == 0:
        check_settings(out_dir, sample_settings(method, steps, guidance, eta, sampler.conditioner.prompts,
                                                sampler.fingerprint), replace_other_weights)
    distributed.barrier()
    todo = [s for s in seeds[rank::world] if not (out_dir / f"{s:06d}.png").is_file()]
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    for batch in tqdm(batches, disable=not progress or rank != 0, desc=f"sampling s={guidance:g}", unit="batch"):
        out = sampler(batch, guidance, method, steps, eta)
        for i, seed in enumerate(batch):
            if out["latents"] is not None:
                np.save(out_dir / f"{seed:06d}.npy", out["latents"][i].float().cpu().numpy())
            write_png(out_dir / f"{seed:06d}.png", out["images"][i])
    distributed.barrier()


def load_samples(out_dir, seeds: list[int], num_classes: int = 0) -> dict:
    """Read back the PNGs (+ latents) of `seeds`: {"images" uint8 [N, H, W, C], "labels", "seeds", "latents"}."""
    out_dir = Path(out_dir)
    missing = [s for s in seeds if not (out_dir / f"{s:06d}.png").is_file()]
    if missing:
        raise FileNotFoundError(f"out_dir: {len(missing)} samples missing in {out_dir}, e.g. seed {missing[0]}")
    images = np.stack([np.asarray(Image.open(out_dir / f"{s:06d}.png")) for s in seeds])
    if images.ndim == 3:
        images = images[..., None]
    latent_files = [out_dir / f"{s:06d}.npy" for s in seeds]
    latents = np.stack([np.load(p) for p in latent_files]) if all(p.is_file() for p in latent_files) else None
    labels = np.asarray(seeds) % num_classes if num_classes else None
    return {"images": images, "labels": labels, "seeds": np.asarray(seeds), "latents": latents}


def pack_npz(out_dir, seeds: list[int], num_classes: int = 0) -> Path:
    """All samples in one out_dir/samples.npz (arr_0 = images, as the ADM evaluator reads, plus labels/seeds)."""
    samples = load_samples(out_dir, seeds, num_classes)
    path = Path(out_dir) / "samples.npz"
    arrays = {"arr_0": samples["images"], "seeds": samples["seeds"]}
    if samples["labels"] is not None:
        arrays["labels"] = samples["labels"]
    np.savez(path, **arrays)
    return path


#################################################################################
#                                      CLI                                      #
#################################################################################

def parse_seeds(text: str) -> list[int]:
    """"0-999" or "1,5,7" or a mix ("0-9,20")."""
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            seeds.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
        except ValueError:
            raise ValueError(f"seeds: cannot parse {part!r} in {text!r}") from None
    return seeds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m evaluation.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="training run directory (ema.safetensors or checkpoints)")
    parser.add_argument("--out", required=True, help="output folder; one sub-folder per guidance scale")
    parser.add_argument("--num-samples", type=int, default=1000, help="seeds 0..N-1 (ignored with --seeds)")
    parser.add_argument("--seeds", type=str, default=None, help="explicit seeds, e.g. 0-999 or 3,7,11")
    parser.add_argument("--sampler", choices=SAMPLERS, default="dpm++2m")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.5], help="one or more CFG scales")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    parser.add_argument("--prompts", type=str, default=None, help="text file, one prompt per line (text runs)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--npz", action="store_true", help="also pack all samples into samples.npz")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cli.run(parser, sample_all, args)


def sample_all(args) -> None:
    seeds = parse_seeds(args.seeds) if args.seeds else list(range(args.num_samples))
    device = distributed.init()
    prompts = read_prompts(args.prompts) if args.prompts else None
    sampler = Sampler(args.run_dir, prompts, device)
    for guidance in args.guidance:
        out_dir = Path(args.out) / f"{args.sampler}-{args.steps}-g{guidance:g}-eta{args.eta:g}"
        generate(sampler, out_dir, seeds, guidance, args.sampler, args.steps, args.eta, args.batch_size,
                 not args.no_progress)
        if args.npz and distributed.get_rank() == 0:
            print(pack_npz(out_dir, seeds, sampler.conditioner.num_classes))


if __name__ == "__main__":
    main()
