"""Run-directory checkpoints: atomic writes (temp file + fsync + rename), keep-last-K, resume from the latest,
corruption/truncation detected with a clear error, and the exported EMA weights (safetensors + JSON config).

Layout (consumed by evaluation):
    run_dir/config.json                     full run config (plain dict)
    run_dir/checkpoints/ckpt-<images:09d>.pt training state, loadable with torch.load(weights_only=True)
    run_dir/ema.safetensors + ema.json      exported EMA weights + the run config
"""
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CHECKPOINT_PATTERN = re.compile(r"^ckpt-(\d{9,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint or exported model that cannot be used; the message names the file."""


def checkpoint_path(run_dir, images_seen: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"ckpt-{images_seen:09d}.pt"


def list_checkpoints(run_dir) -> list[Path]:
    """Checkpoints of a run, oldest first (by images seen)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(source, flag: str = "--init-from") -> Path:
    """A checkpoint file, or the newest checkpoint of a run dir; errors name the flag."""
    path = Path(source)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{flag} {source}: the run dir has no checkpoints/ckpt-*.pt")
        return latest
    if not path.is_file():
        raise CheckpointError(f"{flag} {source} does not exist")
    return path


def atomic_write(path: Path, write) -> None:
    """`write(temporary_path)` then fsync and rename: a crash leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def save_checkpoint(run_dir, images_seen: int, state: dict, keep: int = 3) -> Path:
    """Writes checkpoints/ckpt-<images>.pt and deletes all but the newest `keep` (keep <= 0 keeps all)."""
    path = checkpoint_path(run_dir, images_seen)
    atomic_write(path, lambda temporary: torch.save(state, temporary))
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, bit rot, foreign pickle: all unusable
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt and cannot be loaded ({error})") from error
    if not isinstance(state, dict) or "config" not in state:
        raise CheckpointError(f"checkpoint {path} is not a cepdiff training checkpoint (no 'config' entry)")
    return state


def write_json(path, data: dict) -> None:
    atomic_write(Path(path), lambda temporary: Path(temporary).write_text(json.dumps(data, indent=2) + "\n"))


def check_run_dir(run_dir: Path, config: dict) -> None:
    """Refuses a run dir that holds a different run's config (every rank, before anything is written), so
    re-running a command resumes it but never mixes two experiments."""
    from training.presets import resume_differences

    config_file = Path(run_dir) / "config.json"
    if config_file.exists():
        differences = resume_differences(json.loads(config_file.read_text()), config)
        if differences:
            raise ValueError(f"--run-dir {run_dir} holds a run with a different config ({', '.join(differences)}); "
                             f"use a new --run-dir or the original flags")


class CheckpointIO:
    """The one checkpoint reader/writer of a training run (edm2's training_loop shape): resume from the newest
    loadable checkpoint, atomic save with keep-last-K. Writes happen on rank 0 only; every rank reads."""

    def __init__(self, run_dir, keep: int, log=print):
        self.run_dir, self.keep, self.log = Path(run_dir), keep, log

    def resume(self, map_location="cpu") -> dict | None:
        """The newest checkpoint that loads. A truncated or corrupt one (e.g. a crash mid-copy) is moved aside as
        <name>.corrupt (kept for inspection) with a warning, and the next older one is tried."""
        from training import distributed

        while True:
            latest = distributed.broadcast_object(str(latest_checkpoint(self.run_dir) or "")
                                                  if distributed.get_rank() == 0 else None)
            if not latest:
                return None
            try:
                state = load_checkpoint(latest, map_location)
            except CheckpointError as error:
                state = None
                self.log(f"warning: {error}")
            # Every rank agrees on the outcome before rank 0 renames anything.
            if distributed.all_reduce_mean(torch.tensor(float(state is None))) == 0:
                self.log(f"resumed from {latest} at {state['images_seen']} images")
                return state
            distributed.barrier()
            if distributed.get_rank() == 0:
                aside = Path(latest).with_name(Path(latest).name + ".corrupt")
                os.replace(latest, aside)
                self.log(f"warning: moved the unreadable checkpoint {latest} aside to {aside.name}")
            distributed.barrier()

    def save(self, images_seen: int, state: dict) -> Path:
        path = save_checkpoint(self.run_dir, images_seen, state, self.keep)
        self.log(f"saved {path.name}")
        return path


def export_ema(run_dir, ema_parts: dict, config: dict) -> None:
    """run_dir/ema.safetensors (denoiser weights) + run_dir/ema.json (the run config, to rebuild the model), and for
    text runs run_dir/text_encoder/ (the EMA text encoder, TextEncoder.save_pretrained layout)."""
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in ema_parts["model"].state_dict().items()}
    atomic_write(Path(run_dir) / "ema.safetensors", lambda temporary: save_file(tensors, str(temporary)))
    if "text_encoder" in ema_parts:
        ema_parts["text_encoder"].save_pretrained(Path(run_dir) / "text_encoder")
    write_json(Path(run_dir) / "ema.json", config)


def load_ema_text_encoder(run_dir, map_location="cpu"):
    """The EMA text encoder of a text-conditional run (eval mode): `encoder.encode(captions)` gives the
    (context, context_mask) its denoiser expects."""
    from models.text_encoder import TextEncoder

    try:
        return TextEncoder.from_pretrained(Path(run_dir) / "text_encoder").to(map_location).eval()
    except ValueError as error:
        raise CheckpointError(f"--run-dir {run_dir} has no exported text encoder ({error})") from error


def load_ema_model(run_dir, map_location="cpu"):
    """(EMA model in eval mode, run config). Uses the exported ema.safetensors, or else the newest checkpoint's EMA."""
    from models import build_model

    run_dir = Path(run_dir)
    weights, config_file = run_dir / "ema.safetensors", run_dir / "ema.json"
    if weights.is_file() and config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
            state_dict = load_file(str(weights), device=str(map_location))
        except (json.JSONDecodeError, SafetensorError, OSError) as error:
            raise CheckpointError(f"exported EMA in {run_dir} is corrupt ({error})") from error
    else:
        latest = latest_checkpoint(run_dir)
        if latest is None:
            raise CheckpointError(f"--run-dir {run_dir} has neither ema.safetensors nor checkpoints/ckpt-*.pt")
        state = load_checkpoint(latest, map_location)
        config, state_dict = state["config"], state["ema"]
    model = build_model(dict(config["model"]))
    model.load_state_dict(state_dict)
    return model.to(map_location).eval(), config
