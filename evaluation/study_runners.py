"""Running one (setting, seed) of a study plan, and the short calibrations --dry-run falls back on.

kind "gmm":   `runner(seed=k, progress=..., **(base | setting.kwargs)) -> {metric: value}` in this process
              (default runner gmm_theory.bridge:run).
kind "image": an ordinary run dir <runs-root>/<plan>/<setting>/seed<k>: `training.train` then `evaluation.evaluate`
              as subprocesses (torchrun when base.nproc > 1, one OpenMP thread per process); the run's metrics are
              `<metric>@<guidance scale>` from the evaluation records in its metrics.jsonl.
"""
import importlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from evaluation.study_plan import REFERENCE, Plan, PlanError, Run, is_number


class RunFailed(RuntimeError):
    """A training or evaluation job exited with an error; the message holds the command and its log's tail."""


#################################################################################
#                                    GMM                                        #
#################################################################################

def load_runner(plan: Plan):
    module, _, function = plan.runner.partition(":")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as error:
        raise PlanError("runner", f"cannot import {plan.runner!r} ({error})") from error


def gmm_kwargs(plan: Plan, setting: str) -> dict:
    return {**plan.base, **plan.settings[setting].get("kwargs", {})}


def run_gmm(plan: Plan, run: Run, progress: bool) -> dict:
    """The record fields of one gmm run: metrics, the call, wall time."""
    runner, kwargs = load_runner(plan), gmm_kwargs(plan, run.setting)
    start = time.perf_counter()
    metrics = runner(seed=run.seed, progress=progress, **kwargs)
    wall = time.perf_counter() - start
    if not isinstance(metrics, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                                for k, v in metrics.items()):
        raise TypeError(f"runner {plan.runner} must return dict[str, float], got {metrics!r:.200}")
    call = f"{plan.runner}(seed={run.seed}, " + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
    return {"metrics": {k: float(v) for k, v in metrics.items()}, "commands": [call], "wall_s": wall}


#################################################################################
#                                    Images                                     #
#################################################################################

def train_args(plan: Plan, setting: str) -> list[str]:
    return ["--preset", plan.base["preset"], *plan.base["args"], *plan.settings[setting].get("args", [])]


def image_config(plan: Plan, setting: str) -> dict:
    """The run config training.train will build for a setting (also validates the plan's training flags)."""
    from training.train import parse_args
    field = f"settings.{setting}.args" if plan.settings[setting].get("args") else "base.args"
    try:
        config, _, _ = parse_args([*train_args(plan, setting), "--run-dir", "unused"])
    except SystemExit as error:   # argparse printed why
        raise PlanError(field, "rejected by training.train (its message is above)") from error
    except ValueError as error:
        raise PlanError("base.preset" if "--preset" in str(error) else field, str(error)) from error
    return config


def check_evaluation_args(plan: Plan) -> None:
    from evaluation.evaluate import parser
    try:
        parser().parse_args(["--run-dir", "unused", *plan.evaluation["args"]])
    except SystemExit as error:
        raise PlanError("evaluation.args", "rejected by evaluation.evaluate (its message is above)") from error


def launcher(nproc: int, module: str) -> tuple[list[str], dict]:
    """(command prefix, environment) of one job: torchrun with one OpenMP thread per process, or one process."""
    if nproc == 1:
        return [sys.executable, "-m", module], dict(os.environ)
    return ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module],
            {**os.environ, "OMP_NUM_THREADS": "1"})


def evaluation_args(plan: Plan, num_samples: int, guidance: list | None = None) -> list[str]:
    """evaluation.evaluate's flags for the plan's evaluation (at other guidance scales when given)."""
    evaluation = plan.evaluation
    guidance = evaluation["guidance"] if guidance is None else guidance
    return ["--num-samples", str(num_samples), "--guidance", *[str(float(s)) for s in guidance],
            "--sampler", evaluation["sampler"], "--steps", str(evaluation["steps"]), *evaluation["args"],
            "--no-progress"]


def resolve(args: list[str], prerequisite_dirs: dict) -> list[str]:
    """Training flags with every "{name}" replaced by the run dir of prerequisite `name`."""
    return [REFERENCE.sub(lambda match: str(prerequisite_dirs[match.group(1)]), arg) for arg in args]


def image_commands(plan: Plan, run: Run, run_dir: Path, prerequisite_dirs: dict, total_images: int | None = None,
                   num_samples: int | None = None, guidance: list | None = None) -> list[tuple[list[str], dict]]:
    """[(argv, env)] of the training and the evaluation job; the overrides serve the calibration and the learning
    curves."""
    nproc = plan.base["nproc"]
    train = [*resolve(train_args(plan, run.setting), prerequisite_dirs), "--run-dir", str(run_dir),
             "--seed", str(run.seed), "--no-progress"]
    if total_images is not None:
        train += ["--total-images", str(total_images)]
    prefix, env = launcher(nproc, "training.train")
    evaluate_prefix, evaluate_env = launcher(nproc, "evaluation.evaluate")
    num_samples = num_samples or plan.evaluation["num_samples"]
    evaluate = ["--run-dir", str(run_dir), *evaluation_args(plan, num_samples, guidance)]
    return [(prefix + train, env), (evaluate_prefix + evaluate, evaluate_env)]


def shown(argv: list[str], env: dict) -> str:
    """A command line as a person would type it (python for this interpreter, the OpenMP setting in front)."""
    argv = ["python" if a == sys.executable else a for a in argv]
    prefix = "OMP_NUM_THREADS=1 " if env.get("OMP_NUM_THREADS") == "1" and "torch.distributed.run" in argv else ""
    return prefix + shlex.join(argv)


def execute(argv: list[str], env: dict, log: Path) -> float:
    """Runs a job with its output appended to `log`; returns its wall time. A failure raises with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "a") as handle:
        handle.write(f"$ {shown(argv, env)}\n")
        handle.flush()
        code = subprocess.call(argv, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise RunFailed(f"`{shown(argv, env)}` failed with exit code {code}; end of {log}:\n{tail}")
    return time.perf_counter() - start


def prerequisite_command(plan: Plan, name: str, run_dir: Path) -> tuple[list[str], dict]:
    prerequisite = plan.prerequisites[name]
    prefix, env = launcher(prerequisite["nproc"], prerequisite["module"])
    return prefix + [*prerequisite["args"], "--run-dir", str(run_dir), "--no-progress"], env


def make_prerequisite(plan: Plan, name: str, run_dir: Path) -> dict:
    """Train (or resume; a finished one costs a start-up) one prerequisite; its record fields."""
    argv, env = prerequisite_command(plan, name, run_dir)
    wall = execute(argv, env, run_dir / "study.log")
    stats = training_stats(run_dir)
    return {"command": shown(argv, env), "wall_s": wall, "final_stats": stats[-1] if stats else None,
            "run_dir": str(run_dir)}


def run_image(plan: Plan, run: Run, run_dir: Path, prerequisite_dirs: dict) -> dict:
    """Train (or resume: an already finished run costs a start-up) and evaluate one run; its record fields."""
    (train, train_env), (evaluate, evaluate_env) = image_commands(plan, run, run_dir, prerequisite_dirs)
    log = run_dir / "study.log"
    images_before = images_seen(run_dir)
    train_s = execute(train, train_env, log)
    images_trained = images_seen(run_dir) - images_before
    evaluate_s = execute(evaluate, evaluate_env, log)
    evaluations = newest_evaluations(plan, run_dir, plan.evaluation["num_samples"])
    config = json.loads((run_dir / "config.json").read_text())
    metrics = {f"{name}@{scale}": float(value) for scale, record in evaluations.items()
               for name, value in record["metrics"].items() if is_number(value)}
    return {"metrics": metrics | cep_strength(run_dir),
            "commands": [shown(train, train_env), shown(evaluate, evaluate_env)], "wall_s": train_s + evaluate_s,
            "train_s": train_s, "evaluate_s": evaluate_s, "images_trained": images_trained,
            "evaluate_per_sample_s": per_sample_seconds(evaluations),
            "images_per_second": images_per_second(run_dir), "total_images": config["training"]["total_images"],
            "num_samples": plan.evaluation["num_samples"], "run_dir": str(run_dir)}


def newest_evaluations(plan: Plan, run_dir: Path, num_samples: int, guidance: list | None = None) -> dict:
    """guidance scale -> the newest metrics.jsonl record with the plan's sampler and steps and N samples, for the
    plan's scales (or the given ones)."""
    evaluation, newest = plan.evaluation, {}
    guidance = evaluation["guidance"] if guidance is None else guidance
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if (record["sampler"], record["steps"], record["num_samples"]) == (
                evaluation["sampler"], evaluation["steps"], num_samples):
            newest[float(record["guidance"])] = record
    missing = [s for s in guidance if float(s) not in newest]
    if missing:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no record for guidance {missing}")
    return {float(s): newest[float(s)] for s in guidance}


def per_sample_seconds(evaluations: dict) -> float:
    """Sampling + metric seconds per image summed over the scales (the part of an evaluation that grows with N)."""
    return sum((r["timing"]["sample_seconds"] + r["timing"]["metric_seconds"]) / r["num_samples"]
               for r in evaluations.values())


def training_stats(run_dir: Path) -> list[dict]:
    """The status ticks of a run's stats.jsonl (empty before its first tick)."""
    path = Path(run_dir) / "stats.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def images_seen(run_dir: Path) -> int:
    """Training images seen by the run dir's last status tick (0 for a new run dir)."""
    stats = training_stats(run_dir)
    return stats[-1]["images_seen"] if stats else 0


def images_per_second(run_dir: Path) -> float | None:
    """Median training images/s over the status ticks of stats.jsonl (the first tick, with warm-up, dropped)."""
    rates = [tick["images_per_second"] for tick in training_stats(run_dir)]
    rates = rates[1:] if len(rates) > 1 else rates
    return statistics.median(rates) if rates else None


def cep_strength(run_dir: Path) -> dict:
    """CEP's relative strength |delta| / |c(y)| at the first and last status tick: the network can grow the embedding
    CEP perturbs, so a fixed gamma weakens over training (issue 10). Empty for runs without CEP."""
    ratios = [tick["cep_noise_ratio"] for tick in training_stats(run_dir) if "cep_noise_ratio" in tick]
    return {"cep_noise_ratio_first": ratios[0], "cep_noise_ratio_last": ratios[-1]} if ratios else {}


def calibrate_image(plan: Plan, progress: bool, prerequisite_dirs: dict) -> dict:
    """Eight training steps of the baseline setting and a 20-image evaluation in a temporary run dir, measured:
    the cost model of image_seconds."""
    config = image_config(plan, plan.baseline)
    images, samples = 8 * config["training"]["batch_size"], 20
    with tempfile.TemporaryDirectory(prefix="study-calibration-") as folder:
        run_dir = Path(folder) / "run"
        commands = image_commands(plan, Run(plan.baseline, plan.seeds[0]), run_dir, prerequisite_dirs, images, samples)
        (train, train_env), (evaluate, evaluate_env) = commands
        train += ["--log-every-images", str(images // 4)]   # four ticks: a rate without the first one's warm-up
        if progress:
            print(f"calibrating: {shown(train, train_env)}", file=sys.stderr)
        train_s = execute(train, train_env, Path(folder) / "log.txt")
        rate = images_per_second(run_dir)
        evaluate_s = execute(evaluate, evaluate_env, Path(folder) / "log.txt")
        per_sample = per_sample_seconds(newest_evaluations(plan, run_dir, samples))
    return {"images_per_second": rate, "train_overhead_s": max(train_s - images / rate, 0.0),
            "evaluate_fixed_s": max(evaluate_s - per_sample * samples, 0.0), "evaluate_per_sample_s": per_sample}


def image_cost_model(records: list[dict], run_dirs: list[Path]) -> dict | None:
    """The calibrate_image cost model from the plan's finished records, or (training speed only) from existing run
    dirs' stats.jsonl; None when nothing was measured yet."""
    if records:
        rate = statistics.median(r["images_per_second"] for r in records)
        return {"images_per_second": rate,
                "train_overhead_s": statistics.mean(max(r["train_s"] - r["total_images"] / rate, 0) for r in records),
                "evaluate_fixed_s": statistics.mean(
                    max(r["evaluate_s"] - r["evaluate_per_sample_s"] * r["num_samples"], 0) for r in records),
                "evaluate_per_sample_s": statistics.mean(r["evaluate_per_sample_s"] for r in records)}
    rates = [rate for d in run_dirs if (rate := images_per_second(d))]
    if not rates:
        return None
    return {"images_per_second": statistics.median(rates), "train_overhead_s": 0.0, "evaluate_fixed_s": 0.0,
            "evaluate_per_sample_s": 0.0}


def image_seconds(model: dict, total_images: int, num_samples: int) -> float:
    """Estimated wall time of one run under a cost model."""
    return (model["train_overhead_s"] + total_images / model["images_per_second"] + model["evaluate_fixed_s"]
            + model["evaluate_per_sample_s"] * num_samples)
