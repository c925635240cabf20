"""Run presets (configs/<name>.json) merged with command-line overrides into one plain-dict run config, the single
source of truth stored in config.json and in every checkpoint.

Config sections: "model" (the models.build_model config), "diffusion", "data", "latent", "corruption",
"training", "logging", plus "seed" and "init_from" (resolution transfer)."""
import copy
import difflib
import inspect
import json
from pathlib import Path

from models.diffusion import GaussianDiffusion, make_betas

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

DEFAULTS = {
    "seed": 0,
    "init_from": None,
    "model": {},
    "diffusion": {"schedule": "linear", "num_steps": 1000, "resolution_shift": 1.0},
    "data": {"dataset": "digits", "path": None, "split": "train", "image_size": 8, "channels": 1,
             "resize": "resize", "hflip": False, "random_crop": False, "crop_margin": 0,
             "condition": "class", "control": False, "stream": False, "num_workers": 2, "latents": None},
    "latent": None,
    "text_encoder": None,
    # Paper 1's main setting; nothing is corrupted while the ratio is 0, so --corruption-ratio alone turns it on.
    "corruption": {"kind": "symmetric", "ratio": 0.0, "classes": None},
    "training": {"batch_size": 64, "grad_accum": 1, "total_images": 64_000, "lr": 1e-4, "warmup_images": 0,
                 "weight_decay": 0.0, "adam_betas": [0.9, 0.999], "grad_clip": 1.0, "ema_decay": 0.9999,
                 "ema_warmup": True, "precision": "fp32", "compile": False, "input_perturbation": 0.0,
                 "cond_dropout": 0.0, "label_smoothing": 0.0, "cep_fixed_fraction": 0.0, "caption_dropout": 0.1,
                 "max_nonfinite": 10, "tf32": True, "grad_checkpointing": False},
    "logging": {"log_every_images": 6_400, "checkpoint_every_images": 32_000, "sample_every_images": 0,
                "keep_checkpoints": 3, "num_samples": 16, "sampler": "ddpm", "sample_steps": 100,
                "sample_guidance": 1.0},
}

# Changing these between a run and its resume would silently mix two experiments; logging and length may change.
RESUME_MUTABLE = ("logging", "training.total_images", "data.num_workers")


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_preset(name: str) -> dict:
    """DEFAULTS deep-merged with configs/<name>.json (or a path to a JSON file)."""
    path = Path(name) if name.endswith(".json") else CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"--preset {name!r} not found; known presets: {', '.join(preset_names())}")
    try:
        preset = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"--preset {path}: invalid JSON ({error})") from error
    preset.pop("description", None)
    return merge(DEFAULTS, preset)


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; `update` wins. Unknown top-level sections are rejected to catch typos."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key not in out and base is DEFAULTS:
            raise ValueError(f"unknown config section {key!r}; expected one of {sorted(DEFAULTS)}")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# Keys of the sections that are null by default.
OPEN_SECTIONS = {"latent": {"autoencoder": "", "posterior": "mean"},
                 "text_encoder": {"vocab_size": 0, "max_length": 0, "width": 0, "depth": 0, "num_heads": 0,
                                  "padding": ""}}


def config_keys(config: dict) -> dict:
    """Every dotted key holding a value in a config -> that value (null sections and empty dicts excluded)."""
    keys = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif not (value is None and f"{prefix}{key}" in OPEN_SECTIONS):
                keys[f"{prefix}{key}"] = value

    walk(config, "")
    return keys


def constructor_keys(section: str, constructor) -> dict:
    """"section.<argument>" -> default for a constructor's arguments (None when it has no default)."""
    parameters = inspect.signature(constructor).parameters.items()
    return {f"{section}.{name}": None if p.default is inspect.Parameter.empty else p.default
            for name, p in parameters if name != "self"}


def run_config_keys(config: dict) -> dict:
    """The settable keys of a training.train config: its values, the null sections' keys and the model's
    constructor arguments."""
    from models import architecture  # models imports torch; keep this module's import cheap

    keys = {f"{section}.{key}": value for section, defaults in OPEN_SECTIONS.items() for key, value in defaults.items()}
    if config["model"].get("arch") in ("dit", "unet"):
        keys |= constructor_keys("model", architecture(config["model"]["arch"])[0].__init__)
    return keys | config_keys(config)


def check_override(keys: dict, dotted: str, value, flag: str = "--set") -> None:
    """Rejects an unknown key (naming the nearest valid one of `keys`, dotted key -> current value) or a value whose
    type differs from the current value's."""
    if dotted not in keys:
        nearest = difflib.get_close_matches(dotted, list(keys), n=1, cutoff=0.0)
        raise ValueError(f"{flag} {dotted}: unknown config key" + (f"; did you mean {nearest[0]}?" if nearest else ""))
    expected = keys[dotted]
    if expected is None or value is None:
        return
    same_kind = (isinstance(value, bool) == isinstance(expected, bool)
                 and (isinstance(value, type(expected)) or isinstance(expected, float) and isinstance(value, int)
                      or isinstance(expected, (list, tuple)) and isinstance(value, list)))
    if not same_kind:
        raise ValueError(f"{flag} {dotted}: expected a {type(expected).__name__} (like {expected!r}), "
                         f"got {type(value).__name__} {value!r}")


def set_path(config: dict, dotted: str, value) -> None:
    """config["a"]["b"] = value for dotted = "a.b" (a null section such as "latent" becomes a dict)."""
    *sections, key = dotted.split(".")
    target = config
    for part in sections:
        if not isinstance(target.get(part), dict):
            target[part] = {}
        target = target[part]
    target[key] = value


def parse_override(item: str) -> tuple[str, object]:
    """"--set KEY=JSON" -> (key, value); a value that is not JSON is taken as a bare string."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--set needs KEY=JSON, got {item!r}")
    try:
        return key, json.loads(text)
    except json.JSONDecodeError:
        return key, text


def resume_differences(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two run configs, ignoring RESUME_MUTABLE."""
    differences = []

    def walk(a, b, prefix):
        if prefix in RESUME_MUTABLE:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif a != b:
            differences.append(prefix)

    walk(old, new, "")
    return differences


def build_diffusion(diffusion_config: dict) -> GaussianDiffusion:
    """The run's GaussianDiffusion: schedule, steps and paper 2's resolution shift (1.0 = none)."""
    diffusion = GaussianDiffusion(make_betas(diffusion_config["schedule"], int(diffusion_config["num_steps"])))
    shift = float(diffusion_config.get("resolution_shift", 1.0))
    return diffusion if shift == 1.0 else diffusion.shift_schedule(shift)
