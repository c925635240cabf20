r"""Pre-training of DiT / LDM denoisers with condition corruption and CEP (paper 1) and paper 2's conditioning.

    # CPU, 2 processes (gloo); re-running the same command resumes from the latest checkpoint:
    torchrun --standalone --nproc_per_node=2 -m training.train --preset dit-tiny-digits \
        --corruption-ratio 0.05 --cep uniform --cep-gamma 1.0 --run-dir runs/x
    # single process, no torchrun:
    python -m training.train --preset dit-tiny-digits --run-dir runs/x1
    # 8 GPUs (nccl), paper size: DiT-XL/2 on the latents of a kl-f8 autoencoder (train_autoencoder.py)
    torchrun --standalone --nproc_per_node=8 -m training.train --preset dit-xl2-in1k \
        --dataset /data/imagenet/train --autoencoder runs/kl-f8-in1k --corruption-ratio 0.025 --run-dir runs/dit-xl2

Progress is counted in images (edm2). Every random draw of a step (data order, t, noise, label dropout, CEP seeds,
augmentation) derives from (seed, rank, images seen, accumulation round), so a resumed run is bit-identical.
"""
import argparse
import contextlib
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from models import build_model
from models.cep import CEP
from models.text_encoder import TextEncoder
from training import cli, distributed
from training.checkpoint import CheckpointError, export_ema, load_checkpoint, resolve_checkpoint
from training.corruption import random_flip
from training.data import DataOrder, hash_seed, template_captions
from training.ema import EMA
from training.loading import LoadedRun
from training.prepare import prepare
from training.presets import build_diffusion, load_preset, run_config_keys
from training.regularizers import FixedCEP, attach_embedding_regularizers
from training.run import Run, Tick
from training.sources import step_indices
from training.stats import RunLogger, crossed, save_image_grid
from training.text import TextConditionedDenoiser, drop_captions, parts

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CEP_MODES = ("none", "uniform", "gaussian")

# (flag, dotted config key, type, help): each flag overrides one preset value.
FLAGS = (
    ("--hflip", "data.hflip", bool, "random horizontal flips (emitted as control metadata)"),
    ("--random-crop", "data.random_crop", bool, "random crops (emitted as control metadata)"),
    ("--corruption", "corruption.kind", str, "symmetric (default) | asymmetric | random | caption-swap | none"),
    ("--corruption-ratio", "corruption.ratio", float, "eta in [0, 1)"),
    ("--corruption-classes", "corruption.classes", "ints", "class subset for asymmetric flips, e.g. 1,3,5"),
    ("--cep", "model.cep_mode", str, "CEP noise: none | uniform | gaussian"),
    ("--cep-gamma", "model.cep_gamma", float, "CEP scale gamma (paper: 1.0)"),
    ("--cep-fixed-fraction", "training.cep_fixed_fraction", float,
     "fixed CEP (Table 7): this fraction of items keeps one CEP draw for all of training (0 = per-step CEP)"),
    ("--class-dropout", "model.class_dropout_prob", float, "CFG label dropout probability"),
    ("--input-perturbation", "training.input_perturbation", float, "IP baseline gamma_IP (0 = off)"),
    ("--cond-dropout", "training.cond_dropout", float, "dropout on the class embedding (baseline)"),
    ("--label-smoothing", "training.label_smoothing", float, "label smoothing of the class embedding (baseline)"),
    ("--grad-accum", "training.grad_accum", int, "gradient accumulation rounds per step"),
    ("--lr", "training.lr", float, "AdamW learning rate (constant after warm-up)"),
    ("--warmup-images", "training.warmup_images", int, "linear lr warm-up length in images"),
    ("--weight-decay", "training.weight_decay", float, "AdamW weight decay"),
    ("--ema-decay", "training.ema_decay", float, "EMA decay per step"),
    ("--precision", "training.precision", str, "fp32 | bf16 | fp16 autocast"),
    ("--compile", "training.compile", bool, "torch.compile the model"),
    ("--tf32", "training.tf32", bool, "TF32 matmuls and convolutions on CUDA (default on; no effect on CPU)"),
    ("--grad-checkpointing", "training.grad_checkpointing", bool,
     "recompute DiT / U-Net blocks in backward instead of storing activations (less memory, about a third more compute)"),
    ("--latents", "data.latents", str, "latent shards of training.encode_latents: train on them (memory-mapped)"),
    ("--max-nonfinite", "training.max_nonfinite", int, "abort after this many non-finite losses in a row"),
    ("--sample-every-images", "logging.sample_every_images", int, "EMA sample grid interval (0 = only at the end)"),
    ("--autoencoder", "latent.autoencoder", str, "trained autoencoder run dir: train on its latents (LDM path)"),
    ("--init-from", "init_from", str, "run dir or checkpoint to start from (resolution transfer)"),
    ("--resolution-shift", "diffusion.resolution_shift", float, "noise-schedule shift ratio (paper 2)"),
    *cli.RUN_FLAGS,
)


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser("python -m training.train", __doc__, FLAGS, help="configs/<name>.json or a JSON path")


def parse_args(argv=None, parser=None) -> tuple[dict, Path, bool]:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    config = load_preset(args.preset)
    config["preset"] = args.preset
    config = cli.apply_config_flags(args, config, FLAGS, run_config_keys)
    return config, Path(args.run_dir), not args.no_progress


def check_config(config: dict, world_size: int) -> None:
    """Clear errors, naming the flag, before any work is done."""
    training, logging = config["training"], config["logging"]
    if not isinstance(config["seed"], int) or isinstance(config["seed"], bool) or config["seed"] < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {config['seed']!r}")
    for flag, value in (("--batch-size", training["batch_size"]), ("--grad-accum", training["grad_accum"]),
                        ("--total-images", training["total_images"]), ("--max-nonfinite", training["max_nonfinite"]),
                        ("--log-every-images", logging["log_every_images"]),
                        ("--checkpoint-every-images", logging["checkpoint_every_images"])):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    if training["batch_size"] % (world_size * training["grad_accum"]):
        raise ValueError(f"--batch-size {training['batch_size']} must be divisible by processes ({world_size}) x "
                         f"--grad-accum ({training['grad_accum']})")
    workers = config["data"]["num_workers"]
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ValueError(f"--num-workers must be an integer >= 0, got {workers!r}")
    if training["precision"] not in PRECISIONS:
        raise ValueError(f"--precision must be one of {sorted(PRECISIONS)}, got {training['precision']!r}")
    for flag, value in (("--lr", training["lr"]), ("--weight-decay", training["weight_decay"]),
                        ("--grad-clip", training["grad_clip"]), ("--warmup-images", training["warmup_images"]),
                        ("--input-perturbation", training["input_perturbation"])):
        if not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"{flag} must be a finite number >= 0, got {value!r}")
    if isinstance(config["corruption"]["ratio"], bool) or not isinstance(config["corruption"]["ratio"], (int, float)) \
            or not 0 <= config["corruption"]["ratio"] < 1:
        raise ValueError(f"--corruption-ratio must be a number in [0, 1), got {config['corruption']['ratio']!r}")
    if config["model"].get("cep_mode", "none") not in CEP_MODES:
        raise ValueError(f"--cep must be one of {CEP_MODES}, got {config['model']['cep_mode']!r}")
    gamma = config["model"].get("cep_gamma", 0.0)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma < math.inf:
        raise ValueError(f"--cep-gamma must be a finite number >= 0, got {gamma!r}")
    fixed = training["cep_fixed_fraction"]
    if isinstance(fixed, bool) or not isinstance(fixed, (int, float)) or not 0 <= fixed <= 1:
        raise ValueError(f"--cep-fixed-fraction must be a number in [0, 1], got {fixed!r}")
    if fixed > 0 and (config["model"].get("cep_mode", "none") == "none" or gamma == 0):
        raise ValueError("--cep-fixed-fraction needs --cep uniform|gaussian and --cep-gamma > 0 (the fixed draw's law)")
    if training["lr"] <= 0:
        raise ValueError(f"--lr must be > 0, got {training['lr']!r}")
    if not isinstance(training["ema_decay"], (int, float)) or not 0 <= training["ema_decay"] < 1:
        raise ValueError(f"--ema-decay must be in [0, 1), got {training['ema_decay']!r}")


def learning_rate(training: dict, images_seen: int) -> float:
    """Constant lr after an optional linear warm-up counted in images."""
    if training["warmup_images"] > 0:
        return training["lr"] * min(1.0, (images_seen + training["batch_size"]) / training["warmup_images"])
    return training["lr"]


def model_inputs(data, config, indices, generator, device) -> tuple[torch.Tensor, dict]:
    """x0 and the model kwargs (y | context, control) for one micro-batch."""
    x0, control = data.source.batch(indices, generator)
    kwargs = {}
    if data.labels is not None:
        labels = data.labels[indices]
        if config["corruption"]["kind"] == "random" and config["corruption"]["ratio"] > 0:  # Table 7 baseline
            labels = random_flip(labels, config["corruption"]["ratio"], data.prior, generator)
        kwargs["y"] = labels.to(device)
    elif data.captions is not None:
        captions = [data.captions[i] for i in indices.tolist()]
        kwargs["captions"] = drop_captions(captions, config["training"]["caption_dropout"], generator)
    if config["model"].get("control_dim", 0):
        kwargs["control"] = control.to(device)
    return x0.to(device), kwargs


def init_from(model: torch.nn.Module, source: str, logger: RunLogger) -> None:
    """Resolution transfer (paper 2 §2.2): start from another run's EMA weights. The DiT positional embedding is not
    stored but recomputed from the config (interpolated when model.pos_embed_base_size is set), so a
    lower-resolution checkpoint loads as is; the noise-schedule shift is the diffusion.resolution_shift setting."""
    path = resolve_checkpoint(source)
    state = load_checkpoint(path)
    for name, module in parts(model).items():
        try:
            module.load_state_dict(state[ema_key(name)])
        except (KeyError, RuntimeError) as error:
            raise CheckpointError(f"--init-from {source}: its {name} weights do not fit this model ({error})") from error
    logger.log(f"initialised from the EMA weights of {path}")


@torch.no_grad()
def save_samples(ema_model, config, path, device) -> None:
    """A grid of EMA samples through evaluation's Sampler (the path `evaluate` takes): seeds 0..N-1, classes (or
    class-name captions) cycling."""
    from evaluation.sample import Sampler  # evaluation imports training: import at use

    ema_parts = parts(ema_model)
    run = LoadedRun.from_parts(config, ema_parts["model"], ema_parts.get("text_encoder"), device)
    prompts = None
    if config["data"]["condition"] == "text":
        classes = torch.arange(config["data"]["num_classes"])
        prompts = template_captions(classes, config["data"]["class_names"], torch.Generator())
    logging = config["logging"]
    images = Sampler(run, prompts, device)(list(range(logging["num_samples"])), logging["sample_guidance"],
                                           logging["sampler"], logging["sample_steps"])["images"]
    save_image_grid(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, path)


def build_net(config: dict) -> torch.nn.Module:
    """The trained module. With fixed CEP the model's per-step CEP is off: FixedCEP adds the noise instead."""
    model_config = config["model"]
    if config["training"]["cep_fixed_fraction"] > 0:
        model_config = {**model_config, "cep_mode": "none"}
    net = build_model(model_config)
    if config["data"]["condition"] == "text":
        net = TextConditionedDenoiser(net, TextEncoder(**config["text_encoder"]))
    return net


def train(config: dict, run_dir: Path, progress: bool = True) -> dict:
    """Runs (or resumes) one training job; returns the final stats record."""
    distributed.init()
    check_config(config, distributed.get_world_size())  # flag errors before the run dir is even created
    run = Run(run_dir, config["logging"]["keep_checkpoints"])
    device, rank, world_size = run.device, run.rank, run.world_size
    if device.type == "cuda":  # DiT: ~1.6x on A100; recorded in config.json as training.tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config["training"]["tf32"]
    config, data = prepare(config, run.run_dir, rank, device, check_run_dir=run.check)
    run.record_config(config)
    training, logging = config["training"], config["logging"]

    net = run.build(lambda: build_net(config), config["seed"])
    for module in net.modules():  # DiT / U-Net; the EMA copy is in eval mode under no_grad and never recomputes
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = training["grad_checkpointing"]
    attach_embedding_regularizers(net, training["cond_dropout"], training["label_smoothing"])
    fixed_cep = None
    if training["cep_fixed_fraction"] > 0:
        model_config = config["model"]
        fixed_cep = FixedCEP(data.num_items, training["cep_fixed_fraction"], model_config["cep_gamma"],
                             model_config["cep_mode"], config["seed"], model_config.get("cep_dim"))
        fixed_cep.attach(net)
    ema = EMA(net, training["ema_decay"], training["ema_warmup"])
    optimizer = torch.optim.AdamW(net.parameters(), lr=training["lr"], betas=tuple(training["adam_betas"]),
                                  weight_decay=training["weight_decay"])
    scaler = torch.amp.GradScaler(device.type, enabled=training["precision"] == "fp16")
    diffusion = build_diffusion(config["diffusion"])
    images_seen, nonfinite_total, nonfinite_streak = 0, 0, 0

    state = run.checkpoints.resume(map_location=device)
    if state is not None:
        images_seen, nonfinite_total, nonfinite_streak = load_training_state(state, net, ema, optimizer, scaler)
    elif config.get("init_from"):
        init_from(net, config["init_from"], run.logger)
        ema.model.load_state_dict(net.state_dict())
    model = run.wrap(net, training["compile"])
    cep_modules = track_cep_noise_ratio(net)
    run.logger.log(f"{world_size} process(es), {sum(p.numel() for p in net.parameters()):,} parameters, "
                   f"{data.num_items} training items, run dir {run.run_dir}")

    order = DataOrder(data.num_items, hash_seed(config["seed"], 0xDA7A))
    micro_batch = training["batch_size"] // (world_size * training["grad_accum"])
    if hasattr(data.source, "start"):  # streamed images: the workers decode the batches this rank will read
        data.source.start(step_indices(order, images_seen, training["total_images"], training["batch_size"],
                                       world_size, rank, training["grad_accum"]))
    autocast_dtype = PRECISIONS[training["precision"]]
    bar = tqdm(total=training["total_images"], initial=images_seen, unit="img", disable=rank != 0 or not progress)
    tick, tick_images = Tick(device), images_seen
    record, grad_norm = {}, None

    def save(final: bool = False) -> None:
        distributed.check_consistency(net)
        if rank == 0:
            state = training_state(config, net, ema, optimizer, scaler, images_seen, nonfinite_total, nonfinite_streak)
            run.checkpoints.save(images_seen, state)
            export_ema(run.run_dir, parts(ema.model), config)
        distributed.barrier()

    while images_seen < training["total_images"]:
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(training, images_seen)
        loss_sum = torch.zeros((), device=device)
        for accum_round in range(training["grad_accum"]):
            start = images_seen + (accum_round * world_size + rank) * micro_batch
            step_seed = run.step_seed(config["seed"], images_seen, accum_round)
            torch.manual_seed(step_seed)  # label dropout, CEP seeds and baselines draw from the global RNG
            generator = torch.Generator(device).manual_seed(hash_seed(step_seed, 1))
            indices = order.indices(start, micro_batch)
            x0, kwargs = model_inputs(data, config, indices, generator, device)
            last_round = accum_round == training["grad_accum"] - 1
            sync = contextlib.nullcontext() if last_round or world_size == 1 else net_no_sync(model)
            fixed = fixed_cep.batch(indices) if fixed_cep else contextlib.nullcontext()
            with sync, fixed, torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                      enabled=autocast_dtype is not None):
                loss = diffusion.training_losses(model, x0, kwargs, input_perturbation=training["input_perturbation"],
                                                 generator=generator).mean()
                scaler.scale(loss / training["grad_accum"]).backward()  # DDP all-reduces on the last round
            loss_sum += loss.detach().float()
        images_seen += training["batch_size"]
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), training["grad_clip"] or math.inf)
        # DDP gave every rank the same gradients, and a non-finite loss on any rank makes them non-finite: every
        # rank takes the same decision without a collective.
        if torch.isfinite(grad_norm):
            scaler.step(optimizer)
            scaler.update()
            ema.update(net)
            nonfinite_streak = 0
            tick.add(loss=loss_sum / training["grad_accum"], **cep_noise_ratio(cep_modules))
            tick.steps += 1
        else:
            nonfinite_total, nonfinite_streak = nonfinite_total + 1, nonfinite_streak + 1
            run.logger.log(f"non-finite loss at {images_seen} images: step skipped ({nonfinite_streak} in a row)")
            if nonfinite_streak >= training["max_nonfinite"]:
                raise RuntimeError(f"aborting: {nonfinite_streak} consecutive steps had a non-finite loss (up to "
                                   f"{images_seen} images); lower --lr, use --precision fp32 or check the data")
        optimizer.zero_grad(set_to_none=True)
        tick.seconds += time.perf_counter() - started
        bar.update(training["batch_size"])
        done = images_seen >= training["total_images"]
        if done or crossed(images_seen, training["batch_size"], logging["log_every_images"]):
            seconds = tick.seconds
            means = tick.read()
            record = {"images_seen": images_seen, "kimg": images_seen / 1000, "loss": means.get("loss", 0.0),
                      "lr": optimizer.param_groups[0]["lr"],
                      "images_per_second": (images_seen - tick_images) / max(seconds, 1e-9),
                      "nonfinite_total": nonfinite_total, "grad_norm": float(grad_norm),
                      "world_size": world_size, "time": time.time(),
                      **{k: v for k, v in means.items() if k != "loss"}}
            run.logger.stats(record)
            run.logger.log(f"kimg {record['kimg']:.1f} loss {record['loss']:.4f} "
                           f"img/s {record['images_per_second']:.1f}")
            tick_images = images_seen
        if done or crossed(images_seen, training["batch_size"], logging["checkpoint_every_images"]):
            save(final=done)
        sample_every = logging["sample_every_images"]
        if rank == 0 and sample_every and crossed(images_seen, training["batch_size"], sample_every):
            save_samples(ema.model, config, samples_path(run.run_dir, images_seen), device)
    bar.close()
    if rank == 0 and not samples_path(run.run_dir, images_seen).exists():  # also after a crash while sampling
        save_samples(ema.model, config, samples_path(run.run_dir, images_seen), device)
    distributed.barrier()
    return record


def track_cep_noise_ratio(net: torch.nn.Module) -> list[CEP]:
    """The active CEP modules of a model, set to record |delta| / |c(y)| (paper 1 Eq. 8) on the device."""
    modules = [m for m in net.modules() if isinstance(m, CEP) and m.mode != "none" and m.gamma > 0]
    for module in modules:
        module.record_noise_ratio = True
    return modules


def cep_noise_ratio(modules: list[CEP]) -> dict:
    """{"cep_noise_ratio": batch-mean |delta| / |c(y)| of this step} (a device tensor), or {} without CEP."""
    ratios = [m.pop_noise_ratio() for m in modules]
    ratios = [r for r in ratios if r is not None]
    return {"cep_noise_ratio": torch.stack(ratios).mean()} if ratios else {}


def training_state(config, net, ema, optimizer, scaler, images_seen, nonfinite_total, nonfinite_streak) -> dict:
    """Everything an exact resume needs, as tensors and plain Python values (torch.load(weights_only=True))."""
    return {"config": config, "images_seen": images_seen, "ema_num_updates": int(ema.num_updates),
            **{name: module.state_dict() for name, module in parts(net).items()},
            **{ema_key(name): module.state_dict() for name, module in parts(ema.model).items()},
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "nonfinite_total": nonfinite_total, "nonfinite_streak": nonfinite_streak,
            # The data order and every random draw derive from (seed, rank, images_seen): nothing else to store.
            "rng": {"seed": config["seed"], "scheme": "hash(seed, rank, images_seen, accumulation round)"}}


def load_training_state(state, net, ema, optimizer, scaler) -> tuple[int, int, int]:
    """Inverse of training_state; returns (images seen, non-finite steps in total, in a row)."""
    for name, module in parts(net).items():
        module.load_state_dict(state[name])
    for name, module in parts(ema.model).items():
        module.load_state_dict(state[ema_key(name)])
    ema.num_updates.fill_(state["ema_num_updates"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    return state["images_seen"], state["nonfinite_total"], state["nonfinite_streak"]


def samples_path(run_dir: Path, images_seen: int) -> Path:
    return run_dir / "samples" / f"samples-{images_seen:09d}.png"


def ema_key(part: str) -> str:
    """Checkpoint entry of a part's EMA: "ema" for the denoiser (what load_ema_model reads), "ema_<part>" else."""
    return "ema" if part == "model" else f"ema_{part}"


def net_no_sync(model):
    """DDP's no_sync (skip the gradient all-reduce on non-final accumulation rounds), through torch.compile."""
    return getattr(model, "_orig_mod", model).no_sync()


def main(argv=None) -> None:
    parser = build_parser()
    cli.run(parser, lambda: train(*parse_args(argv, parser)))


if __name__ == "__main__":
    main()
