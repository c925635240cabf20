"""Command-line plumbing shared by every entry point: errors a user caused print one argparse-style line,
`<prog>: error: <flag>: <what>`, and exit 2; anything else keeps its traceback (an internal error)."""
import argparse
import re

from training import distributed
from training.checkpoint import CheckpointError
from training.data import DatasetError
from training.presets import check_override, parse_override, set_path

USER_ERRORS = (ValueError, OSError, CheckpointError)

# (flag, dotted config key, type, help) shared by every trainer; each flag overrides one config value.
RUN_FLAGS = (
    ("--dataset", "data.dataset", str, "digits | mnist | fashion-mnist | path to .npz, image folder or tar shards"),
    ("--data-path", "data.path", str, "folder holding mnist.npz / fashion_mnist.npz"),
    ("--image-size", "data.image_size", int, "model resolution in pixels"),
    ("--stream", "data.stream", bool, "stream an image folder (tar shards always stream): workers decode on the fly"),
    ("--num-workers", "data.num_workers", int, "decoding worker processes per rank for streamed images"),
    ("--batch-size", "training.batch_size", int, "global batch size (all processes and accumulation rounds)"),
    ("--total-images", "training.total_images", int, "training length in images"),
    ("--grad-clip", "training.grad_clip", float, "max gradient norm (0 = off)"),
    ("--seed", "seed", int, "run seed"),
    ("--log-every-images", "logging.log_every_images", int, "status line + stats.jsonl interval"),
    ("--checkpoint-every-images", "logging.checkpoint_every_images", int, "checkpoint interval"),
    ("--keep-checkpoints", "logging.keep_checkpoints", int, "keep the newest K checkpoints"),
)


def flag_message(message: str, parser: argparse.ArgumentParser) -> str | None:
    """"--flag what" / "dest: what" -> "--flag: what" when the message names one of the parser's flags, else None."""
    flags = {option for action in parser._actions for option in action.option_strings}
    flags |= {"--" + action.dest.replace("_", "-") for action in parser._actions}
    match = re.match(r"(--[a-z][a-z0-9-]*)[:\s]\s*(.*)|([a-z][a-z0-9_]*):\s*(.*)", message, re.DOTALL)
    if not match:
        return None
    flag, what = (match.group(1), match.group(2)) if match.group(1) else ("--" + match.group(3).replace("_", "-"),
                                                                           match.group(4))
    return f"{flag}: {what}" if flag in flags else None


def run(parser: argparse.ArgumentParser, entry, *args):
    """entry(*args) as an entry point's whole life in its process group: a user error that names a flag becomes
    `parser.error`'s one line and exit status 2; the group is left in every case (each entry ends at a barrier)."""
    try:
        return entry(*args)
    except USER_ERRORS as error:
        line = flag_message(str(error), parser)
        if line is None and isinstance(error, DatasetError):   # its message names the data set's path
            line = f"--dataset: {error}"
        if line is None:
            raise
        parser.exit(2, f"{parser.prog}: error: {line}\n")
    finally:
        distributed.shutdown()


def build_parser(prog: str, description: str, flags, **preset) -> argparse.ArgumentParser:
    """A trainer's parser: --preset (`preset` = its add_argument options) and add_config_flags(flags)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, **preset)
    add_config_flags(parser, flags)
    return parser


def add_config_flags(parser: argparse.ArgumentParser, flags) -> None:
    """--run-dir, --set, --no-progress and one flag per (flag, dotted config key, type, help) of `flags`."""
    parser.add_argument("--run-dir", required=True, help="output folder; re-running with it resumes")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override any config value by its dotted key, e.g. --set training.batch_size=32")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    for flag, _, kind, help_text in flags:
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=str if kind == "ints" else kind, default=None, help=help_text)


def apply_config_flags(args: argparse.Namespace, config: dict, flags, settable_keys) -> dict:
    """The flags given, then every --set KEY=JSON (checked against settable_keys(config)), written into config."""
    for flag, key, kind, _ in flags:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            if kind == "ints":
                try:
                    value = [int(v) for v in value.split(",")]
                except ValueError:
                    raise ValueError(f"{flag} must be comma-separated integers, got {value!r}") from None
            set_path(config, key, value)
    for item in args.set:
        key, value = parse_override(item)
        check_override(settable_keys(config), key, value)
        set_path(config, key, value)
    return config
