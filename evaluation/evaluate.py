"""Evaluate a training run: sample with each guidance scale, then paper 1's metric suite (FID, sFID, IS, KID,
precision/recall, TopP&R, top-1% RMD, memorisation ratio, top-5 L2, VQ sample entropy, CLIP-style score).
One JSON record per guidance scale is appended to run_dir/metrics.jsonl with every setting that affects the
numbers (extractor + its hash, N, sampler, steps, scale, seeds, library versions, timings).

Offline, the features come from a small classifier trained here on the run's data set (cached by data-set hash,
held-out accuracy recorded); pass --extractor PATH to use an exported Inception-v3 / CLIP image tower instead.

    python -m evaluation.evaluate --run-dir runs/x --num-samples 2000 --guidance 1.5 2.0
    torchrun --standalone --nproc_per_node=2 -m evaluation.evaluate --run-dir runs/x --guidance 1.5
"""
import argparse
import datetime
import importlib.metadata
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from evaluation import metrics
from evaluation.features import (DEFAULT_CACHE_DIR, ScriptedExtractor, TextTower, extract_features,
                                 extractor_fingerprint, load_or_train_classifier)
from evaluation.sample import Sampler, generate, load_samples, read_prompts
from models.diffusion import SAMPLERS
from training import cli, distributed
from training.data import DatasetError, centre_offset, crop, load_dataset

LIBRARIES = ("torch", "torchmetrics", "numpy", "scipy", "scikit-learn")


#################################################################################
#                           Reference data and features                         #
#################################################################################

def to_hwc(images: torch.Tensor) -> np.ndarray:
    """training.data's uint8 [N, C, S, S] -> uint8 [N, S, S, C] (the layout of samples read from PNG)."""
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def load_reference(config: dict) -> dict:
    """The run's data set without augmentation: train split (memorisation, the classifier) and the test split as
    FID reference when the data set has one (else the train split, e.g. sklearn digits). Runs trained on random
    crops get the centre crop of the same stored size, the view sampling asks for (data.sample_control), and
    their classifier's train split in random crops."""
    data = config["data"]
    size = data["image_size"]
    margin = data.get("crop_margin", 0) if data.get("random_crop") else 0
    offset = centre_offset(size + margin, size)

    def load(split):
        return load_dataset(data["dataset"], data.get("path"), split, size, data["channels"],
                            data.get("resize", "resize"), margin)

    def centre(images):
        return images[..., offset:offset + size, offset:offset + size]

    def classifier_view(images):
        # Label agreement measures semantics, so its classifier must not mistake layout for class: samples without
        # crop metadata come out at any crop, and a classifier trained on centre crops alone misreads real
        # corner crops of MNIST (held-out accuracy 0.72 at offset (0, 0) against 0.96 centred). It trains on one
        # seeded random crop per image instead.
        if not margin:
            return centre(images)
        offsets = torch.randint(0, margin + 1, (len(images), 2), generator=torch.Generator().manual_seed(0))
        return crop(images, offsets[:, 0], offsets[:, 1], size)

    train = load("train")
    try:
        test, reference_split = load("test"), "test"
    except DatasetError:
        test, reference_split = train, "train"
    return {"train_images": to_hwc(centre(train.images)), "train_labels": train.labels.numpy(),
            "classifier_images": to_hwc(classifier_view(train.images)),
            "reference_images": to_hwc(centre(test.images)), "reference_split": reference_split,
            "num_classes": train.num_classes}


def build_extractor(args, reference: dict):
    """(extractor module, info dict for metrics.jsonl)."""
    if args.extractor != "classifier":
        extractor = ScriptedExtractor(args.extractor, args.extractor_size, args.extractor_channels,
                                      args.extractor_range)
        return extractor, {"kind": "scripted", "path": str(args.extractor), "fingerprint": extractor.fingerprint,
                           "input_size": args.extractor_size, "value_range": args.extractor_range}
    # Seeded 80/20 split of the clean training labels: the held-out 20 % measure the classifier's accuracy.
    images, labels = reference["classifier_images"], reference["train_labels"]
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(0.8 * len(images))
    return load_or_train_classifier(images[order[:cut]], labels[order[:cut]], images[order[cut:]],
                                    labels[order[cut:]], reference["num_classes"], args.cache_dir,
                                    steps=args.classifier_steps)


def vq_source(args, sampler: Sampler):
    """The VQ model whose codebook defines sample entropy: the run's own VQ autoencoder (latent runs) or one given
    by --vq-autoencoder (images are encoded with it). None: entropy is skipped."""
    from models.autoencoder import VQModel, load_autoencoder
    if args.vq_autoencoder:
        model = load_autoencoder(args.vq_autoencoder)[0]
        if not isinstance(model, VQModel):
            raise ValueError(f"vq_autoencoder: {args.vq_autoencoder} is not a VQ autoencoder")
        return model, "encode"
    if isinstance(sampler.decoder, VQModel):
        return sampler.decoder, "latents"
    return None, None


def entropy_temperature(text: str) -> float | str:
    """--entropy-temperature: a positive number, or 'quantization'."""
    if text == "quantization":
        return text
    try:
        tau = float(text)
    except ValueError:
        tau = math.nan
    if not tau > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'quantization', got {text!r}")
    return tau


def vq_temperature(choice: float | str, model, train_images: np.ndarray) -> float | None:
    """The entropy tau: the given number, or the VQ's median quantisation error on the first 2000 training images
    (metrics.quantization_temperature): one tau per autoencoder, whatever model is scored."""
    if model is None:
        return None
    if choice != "quantization":
        return choice
    latents = vq_latents(model, "encode", {"images": train_images[:2000]})
    return metrics.quantization_temperature(latents, model.codebook.detach())


@torch.no_grad()
def vq_latents(model, mode: str, samples: dict) -> torch.Tensor:
    """Pre-quantisation latents in the codebook's (unscaled) space, [N, D, h, w]."""
    if mode == "latents":
        latents = torch.from_numpy(samples["latents"])
    else:
        images = torch.from_numpy(samples["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = torch.cat([model.encode(images[i:i + 256]) for i in range(0, len(images), 256)])
    return latents / model.scale_factor


#################################################################################
#                                 One scale                                      #
#################################################################################

def score(samples: dict, fake: dict, real: dict, train: dict, reference_images: np.ndarray, args,
          prompts_embedding=None, vq=None) -> dict:
    """Every metric that the available features support, as a flat dict of floats. vq = (latents, codebook, tau);
    reference_images (uint8 [N, H, W, C]) anchor the centre-of-mass offset."""
    out = {"fid": metrics.frechet_distance(real["pool"], fake["pool"])}
    if "spatial" in fake and "spatial" in real:
        out["sfid"] = metrics.frechet_distance(real["spatial"], fake["spatial"])
    if "logits" in fake:
        out["is"], out["is_std"] = metrics.inception_score(fake["logits"], splits=args.is_splits)
    out["kid"], out["kid_std"] = metrics.kernel_inception_distance(real["pool"], fake["pool"],
                                                                   args.kid_subsets, args.kid_subset_size)
    out["precision"], out["recall"] = metrics.precision_recall(real["pool"], fake["pool"], k=args.pr_k)
    try:
        out.update(metrics.top_pr(real["pool"], fake["pool"]))
    except ValueError as error:       # too few samples for the balloon bandwidth: say so, keep the rest
        out["top_pr_skipped"] = str(error)
    if samples["labels"] is not None:
        labels = torch.as_tensor(samples["labels"])
        out.update(metrics.relative_mahalanobis(fake["pool"], labels, args.rmd_top_fraction))
        if args.extractor == "classifier":   # its logits are the run's own classes
            out["label_agreement"] = metrics.label_agreement(fake["logits"], labels)
    out["memorization_ratio"] = metrics.memorization_ratio(fake["pool"], train["pool"], args.memorization_threshold)
    out["top5_l2"] = metrics.mean_topk_distance(fake["pool"], train["pool"], k=5)
    out.update(metrics.com_offset(samples["images"], reference_images))
    if vq is not None:
        out["vq_entropy"] = metrics.vq_sample_entropy(*vq)
    if prompts_embedding is not None:
        out["clip_score"] = metrics.clip_score(fake["pool"], prompts_embedding)
    return out


def held_out_memorisation(real: dict, train: dict, reference_split: str, count: int, threshold: float) -> dict:
    """The memorisation ratio and top-5 L2 of `count` held-out real images: what a model that memorised nothing scores
    in these features (a threshold set for CLIP features may count most fresh MNIST images as "memorised"). Empty
    when the reference is the train split itself, whose distance to itself is 0."""
    if reference_split == "train":
        return {}
    held_out = real["pool"][:count]
    return {"memorization_ratio_held_out": metrics.memorization_ratio(held_out, train["pool"], threshold),
            "top5_l2_held_out": metrics.mean_topk_distance(held_out, train["pool"], k=5)}


def library_versions() -> dict:
    return {name: importlib.metadata.version(name) for name in LIBRARIES}


def evaluate(args) -> list[dict]:
    device = distributed.init()
    rank = distributed.get_rank()
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir: {run_dir} is not a directory")
    prompts = read_prompts(args.prompts) if args.prompts else None
    sampler = Sampler(run_dir, prompts, device)
    config = sampler.config
    seeds = list(range(args.seed_offset, args.seed_offset + args.num_samples))
    records = []
    if rank == 0:  # features and metrics are cheap next to sampling: rank 0 only
        start = time.perf_counter()
        reference = load_reference(config)
        extractor, extractor_info = build_extractor(args, reference)
        real = extract_features(extractor, reference["reference_images"])
        train = extract_features(extractor, reference["train_images"], keys=("pool",))
        vq_model, vq_mode = vq_source(args, sampler)
        tau = vq_temperature(args.entropy_temperature, vq_model, reference["train_images"])
        held_out = held_out_memorisation(real, train, reference["reference_split"], args.num_samples,
                                         args.memorization_threshold)
        text_tower = TextTower(args.text_tower) if args.text_tower else None
        reference_seconds = time.perf_counter() - start
    for guidance in args.guidance:
        out_dir = run_dir / "samples" / f"{args.sampler}-{args.steps}-g{guidance:g}-eta{args.eta:g}"
        start, started = time.perf_counter(), time.time()
        generate(sampler, out_dir, seeds, guidance, args.sampler, args.steps, args.eta, args.batch_size,
                 not args.no_progress, replace_other_weights=True)
        sample_seconds = time.perf_counter() - start
        generated = sum((out_dir / f"{s:06d}.png").stat().st_mtime >= started for s in seeds)  # others: reused
        reused = len(seeds) - generated
        if rank != 0:
            continue
        start = time.perf_counter()
        samples = load_samples(out_dir, seeds, sampler.conditioner.num_classes)
        fake = extract_features(extractor, samples["images"])
        vq = None if vq_model is None else (vq_latents(vq_model, vq_mode, samples), vq_model.codebook.detach(), tau)
        prompts_embedding = None
        if text_tower is not None and prompts is not None:
            prompts_embedding = text_tower([prompts[s % len(prompts)] for s in seeds])
        values = score(samples, fake, real, train, reference["reference_images"], args, prompts_embedding, vq)
        values |= held_out
        metric_seconds = time.perf_counter() - start
        record = {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "run_dir": str(run_dir), "samples_dir": str(out_dir), "guidance": guidance, "sampler": args.sampler,
            "steps": args.steps, "eta_ddim": args.eta, "num_samples": len(seeds),
            "seeds": f"{seeds[0]}-{seeds[-1]}", "world_size": distributed.get_world_size(),
            "reference": {"split": reference["reference_split"], "num": len(reference["reference_images"]),
                          "num_train": len(reference["train_images"]), "dataset": config["data"]["dataset"]},
            "extractor": extractor_info | {"fingerprint": extractor_fingerprint(extractor)},
            "settings": {"pr_k": args.pr_k, "kid_subsets": args.kid_subsets, "kid_subset_size": args.kid_subset_size,
                         "is_splits": args.is_splits, "rmd_top_fraction": args.rmd_top_fraction,
                         "memorization_threshold": args.memorization_threshold, "top_k": 5,
                         "entropy_temperature": tau, "vq_source": vq_mode,
                         "text_tower": args.text_tower, "top_pr": {"alpha": 0.1, "bootstrap": 10}},
            "run": {"corruption": config.get("corruption"), "cep_mode": config["model"].get("cep_mode"),
                    "cep_gamma": config["model"].get("cep_gamma"), "model": config["model"]},
            "metrics": values,
            "timing": {"sample_seconds": sample_seconds, "metric_seconds": metric_seconds,
                       "reference_seconds": reference_seconds, "samples_generated": generated,
                       "samples_reused": reused,
                       "sample_seconds_per_1000": 1000 * sample_seconds / generated if generated else None,
                       "metric_seconds_per_1000": 1000 * metric_seconds / len(seeds)},
            "versions": library_versions(),
        }
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        records.append(record)
        if not args.no_progress:
            print(json.dumps({"guidance": guidance, **{k: v for k, v in values.items() if not isinstance(v, str)}}))
    distributed.barrier()
    return records


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="training run directory (config.json, ema.safetensors)")
    p.add_argument("--num-samples", type=int, default=1000, help="images per guidance scale (paper: 50,000)")
    p.add_argument("--seed-offset", type=int, default=0, help="first image seed; seeds are offset..offset+N-1")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.5], help="CFG scales s (1 = no guidance)")
    p.add_argument("--sampler", choices=SAMPLERS, default="dpm++2m", help="paper 1: DPM-Solver, 50 steps")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--batch-size", type=int, default=64, help="sampling batch per rank")
    p.add_argument("--prompts", default=None, help="text runs: prompt file, one per line")
    p.add_argument("--extractor", default="classifier",
                   help="'classifier' (trained here per data set) or a TorchScript/.pt2 feature module path")
    p.add_argument("--extractor-size", type=int, default=None, help="resize images to this size for --extractor")
    p.add_argument("--extractor-channels", type=int, default=None, help="repeat gray images to this many channels")
    p.add_argument("--extractor-range", default="0,1", choices=ScriptedExtractor.VALUE_RANGES,
                   metavar="{0,1 | -1,1 | 0,255}", help="pixel range the --extractor module expects")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where the per-data-set classifier is cached")
    p.add_argument("--classifier-steps", type=int, default=600, help="training steps of that classifier")
    p.add_argument("--text-tower", default=None, help="TorchScript text tower (list[str] -> [B, D]) for CLIP score")
    p.add_argument("--vq-autoencoder", default=None, help="VQ autoencoder checkpoint for sample entropy")
    p.add_argument("--entropy-temperature", type=entropy_temperature, default=1.0,
                   help="tau of the VQ entropy softmax: a number, or 'quantization' for the VQ's median squared "
                        "quantisation error on training images (1 saturates at log K when code words lie closer than 1)")
    p.add_argument("--memorization-threshold", type=float, default=0.12, help="NN distance in normalised features")
    p.add_argument("--rmd-top-fraction", type=float, default=0.01)
    p.add_argument("--pr-k", type=int, default=3, help="k of the k-NN manifolds (precision/recall)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--is-splits", type=int, default=10)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.num_samples < 2:
        p.error("--num-samples: needs at least 2 images")
    cli.run(p, evaluate, args)


if __name__ == "__main__":
    main()
