"""Model zoo: `build_model(config)` turns a plain-dict config {"arch", "preset", **constructor overrides} into a
denoiser. The dict is the single source of truth and is what checkpoints store."""
import copy
import inspect

ARCHS = ("dit", "unet")


def architecture(arch: str):
    """(model class, presets dict) of one architecture; imported lazily so `import models` stays cheap."""
    if arch == "dit":
        from models.dit import DIT_PRESETS, DiT
        return DiT, DIT_PRESETS
    if arch == "unet":
        from models.unet import UNET_PRESETS, UNetModel
        return UNetModel, UNET_PRESETS
    raise ValueError(f"config['arch'] must be one of {ARCHS}, got {arch!r}")


def build_model(config: dict):
    """Build a denoiser from {"arch": "dit"|"unet", "preset": name, **overrides}; overrides are constructor args."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    if "arch" not in config or "preset" not in config:
        raise ValueError(f"config needs 'arch' and 'preset' keys, got {sorted(config)}")
    model_class, presets = architecture(config["arch"])
    if config["preset"] not in presets:
        raise ValueError(f"config['preset'] must be one of {sorted(presets)}, got {config['preset']!r}")
    kwargs = {**presets[config["preset"]], **copy.deepcopy({k: v for k, v in config.items()
                                                             if k not in ("arch", "preset")})}
    unknown = sorted(set(kwargs) - set(inspect.signature(model_class.__init__).parameters))
    if unknown:
        raise ValueError(f"config has unknown {model_class.__name__} arguments: {unknown}")
    return model_class(**kwargs)
