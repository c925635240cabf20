"""Learning curve of one (setting, seed) of an image study plan: train in stages to each image count of --at, evaluate
after each, and report when the model has learned its condition (label agreement at the plan's main scale). This is
how a plan's training length is chosen before its runs are launched.

    python -m evaluation.learning_curve configs/studies/mnist-ldm.json --at 100000 200000 400000
    python -m evaluation.learning_curve configs/studies/digits.json --setting clean --seed 0 --num-samples 500 \
        --guidance 1.0 --at 50000 100000 150000

The stages continue one run dir (<runs-root>/<plan>/_curves/<setting>/seed<k>; resumed, so a stage costs only its
extra images); training has no lr decay, so the weights at N images equal those of a run trained for N. The plan's
prerequisites are made first. Each finished stage is appended to results/study/<plan>/curves/<setting>-seed<k>.json
(with the plot beside it); a stage already there is not run again, and a record whose definition differs (training
flags, evaluation) starts over.

A candidate remedy is measured as a variant of a setting before the plan is changed: --variant NAME --variant-args
FLAGS appends training flags to the setting's and keeps its own record and run dir (setting "<setting>+<NAME>"):

    python -m evaluation.learning_curve configs/studies/paper2-control.json --setting no-metadata --at 100000 200000 \
        --variant lr2e-3 --variant-args "--lr 2e-3"
"""
import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from evaluation import study, study_runners as runners  # noqa: E402
from evaluation.study_plan import NAME, PlanError, Run, load_plan  # noqa: E402
from training.checkpoint import atomic_write  # noqa: E402

LEARNED = 0.9   # issue 12: a clean model has learned its condition at label agreement >= 0.9 at the main scale


def curve_spec(plan, run: Run, num_samples: int, guidance: list[float]) -> dict:
    return {**study.run_spec(plan, run), "evaluation": runners.evaluation_args(plan, num_samples, guidance)}


def with_variant(plan, setting: str, name: str, flags: list[str]):
    """The plan with one more setting, `setting` with `flags` appended to its training flags: (plan, its name)."""
    if not NAME.match(name):
        raise PlanError("--variant", f"must be a name of letters, digits, '.', '_', '+', '-', got {name!r}")
    if not flags:
        raise PlanError("--variant-args", "names no training flags")
    variant = f"{setting}+{name}"
    settings = plan.settings[setting]
    plan = dataclasses.replace(plan, settings={**plan.settings, variant: {**settings,
                                                                           "args": settings.get("args", []) + flags}})
    try:
        runners.image_config(plan, variant)
    except PlanError as error:
        raise PlanError("--variant-args", str(error).split(": ", 1)[1]) from error
    return plan, variant


def stage(plan, run: Run, run_dir: Path, images: int, num_samples: int, guidance: list[float], prerequisites: dict,
          ) -> dict:
    """Train the run dir on to `images` (resuming) and evaluate it; the stage's record."""
    (train, train_env), (evaluate, evaluate_env) = runners.image_commands(plan, run, run_dir, prerequisites, images,
                                                                          num_samples, guidance)
    log = run_dir / "curve.log"
    train_s = runners.execute(train, train_env, log)
    ticks = runners.training_stats(run_dir)
    if ticks[-1]["images_seen"] >= images + runners.image_config(plan, run.setting)["training"]["batch_size"]:
        raise PlanError("--at", f"{run_dir} is trained past {images} images ({ticks[-1]['images_seen']}); stages run "
                                "in increasing order: delete the run dir to measure an earlier one")
    evaluate_s = runners.execute(evaluate, evaluate_env, log)
    evaluations = runners.newest_evaluations(plan, run_dir, num_samples, guidance)
    return {"at": images, "images": ticks[-1]["images_seen"], "loss": ticks[-1].get("loss"),
            # the feature classifier's held-out accuracy: the label agreement real images would get (its ceiling)
            "classifier_accuracy": next(iter(evaluations.values()))["extractor"].get("test_accuracy"),
            "metrics": {f"{name}@{scale}": value for scale, record in evaluations.items()
                        for name, value in record["metrics"].items() if isinstance(value, (int, float))},
            "train_s": train_s, "evaluate_s": evaluate_s, "images_per_second": runners.images_per_second(run_dir),
            "commands": [runners.shown(train, train_env), runners.shown(evaluate, evaluate_env)]}


def learned_at(points: list[dict], scale: float) -> int | None:
    """The first image count whose label agreement at `scale` reaches LEARNED (None: not yet)."""
    for point in points:
        if point["metrics"].get(f"label_agreement@{scale}", -1.0) >= LEARNED:
            return point["images"]
    return None


def plot(points: list[dict], guidance: list[float], title: str, path: Path) -> None:
    """Label agreement and FID against training images, one line per guidance scale."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.2))
    images = [p["images"] / 1000 for p in points]
    for scale in guidance:
        left.plot(images, [p["metrics"].get(f"label_agreement@{scale}") for p in points], "o-", label=f"s={scale:g}")
        right.plot(images, [p["metrics"].get(f"fid@{scale}") for p in points], "o-", label=f"s={scale:g}")
    left.axhline(LEARNED, color="grey", linestyle=":", label=f"learned ({LEARNED})")
    left.set(xlabel="training images (k)", ylabel="label agreement", ylim=(0, 1.02))
    right.set(xlabel="training images (k)", ylabel="FID", yscale="log")
    left.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda temporary: fig.savefig(temporary, format="png", dpi=110))
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation.learning_curve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan", help="configs/studies/<plan>.json (an image plan)")
    p.add_argument("--at", type=int, nargs="+", required=True, metavar="IMAGES",
                   help="training image counts to evaluate at, increasing")
    p.add_argument("--setting", default=None, help="default: the plan's baseline")
    p.add_argument("--seed", type=int, default=None, help="default: the plan's first seed")
    p.add_argument("--num-samples", type=int, default=500, help="samples per scale at each stage")
    p.add_argument("--guidance", type=float, nargs="+", default=None,
                   help="scales to evaluate (default: the plan's first)")
    p.add_argument("--main-scale", type=float, default=None,
                   help="the plan's main scale, where 'learned' is read (default: the first of --guidance)")
    p.add_argument("--variant", default=None, metavar="NAME",
                   help="measure the setting with --variant-args appended, as setting '<setting>+NAME'")
    p.add_argument("--variant-args", default=None, metavar="FLAGS",
                   help="training flags appended to the setting's, one string: \"--lr 2e-3 --set model.patch_size=4\" "
                        "(a single flag as --variant-args=--random-crop)")
    p.add_argument("--runs-root", default="runs/study")
    p.add_argument("--out", default="results/study")
    return p


def learning_curve(argv: list[str]) -> dict:
    args = parser().parse_args(argv)
    plan = load_plan(args.plan)
    if plan.kind != "image":
        raise PlanError("plan", f"{plan.name} is a {plan.kind} plan; learning curves are for image plans")
    setting = args.setting or plan.baseline
    if setting not in plan.settings:
        raise PlanError("--setting", f"{setting!r} is not a setting of {plan.name}; known: {list(plan.settings)}")
    if (args.variant is None) != (args.variant_args is None):
        raise PlanError("--variant", "--variant NAME and --variant-args FLAGS go together")
    if args.variant is not None:
        plan, setting = with_variant(plan, setting, args.variant, shlex.split(args.variant_args))
    if any(n <= 0 for n in args.at) or sorted(set(args.at)) != args.at:
        raise PlanError("--at", f"must be increasing positive image counts, got {args.at}")
    if args.num_samples < 2:
        raise PlanError("--num-samples", f"must be >= 2, got {args.num_samples}")
    runners.image_config(plan, setting)
    guidance = args.guidance or plan.evaluation["guidance"][:1]
    main_scale = guidance[0] if args.main_scale is None else args.main_scale
    if main_scale not in guidance:
        raise PlanError("--main-scale", f"must be one of the evaluated scales {guidance}, got {main_scale}")
    run = Run(setting, plan.seeds[0] if args.seed is None else args.seed)
    out = Path(args.out) / plan.name / "curves"
    path = out / f"{run.name}.json"
    spec = json.loads(json.dumps(curve_spec(plan, run, args.num_samples, guidance)))
    record = json.loads(path.read_text()) if path.is_file() else {}
    if record.get("spec") != spec:
        record = {"plan": plan.name, "setting": run.setting, "seed": run.seed, "spec": spec, "points": []}
    done = {p["at"] for p in record["points"]}
    todo = [n for n in args.at if n not in done]
    if todo:
        study.make_prerequisites(args, plan, [run], set())
    run_dir = Path(args.runs_root) / plan.name / "_curves" / run.setting / f"seed{run.seed}"
    for images in todo:
        print(f"{plan.name} {run.name}: training to {images} images, then {args.num_samples} samples at s={guidance}",
              file=sys.stderr)
        record["points"].append(stage(plan, run, run_dir, images, args.num_samples, guidance,
                                      study.prerequisite_dirs(args, plan)))
        record["points"].sort(key=lambda p: p["at"])
        record |= {"machine": study.machine(), "git_commit": study.git_commit(), "finished": study.now()}
        study.write_json(path, record)
    record["learned_at"], record["main_scale"] = learned_at(record["points"], main_scale), main_scale
    study.write_json(path, record)
    plot(record["points"], guidance, f"{plan.name} {run.name} ({args.num_samples} samples per point)",
         path.with_suffix(".png"))
    print(f"| images | " + " | ".join(f"label agreement s={s:g} | FID s={s:g}" for s in guidance) + " |")
    for point in record["points"]:
        print(f"| {point['images']} | " + " | ".join(
            f"{point['metrics'].get(f'label_agreement@{s}', float('nan')):.3f} | "
            f"{point['metrics'].get(f'fid@{s}', float('nan')):.3g}" for s in guidance) + " |")
    accuracy = record["points"][-1].get("classifier_accuracy") if record["points"] else None
    if accuracy is not None:
        print(f"feature classifier held-out accuracy (the label agreement of real images): {accuracy:.3f}")
    print(f"learned (label agreement >= {LEARNED} at s={main_scale:g}): "
          + (f"at {record['learned_at']} images" if record["learned_at"] else "not within the curve"))
    return record


def main(argv=None) -> None:
    study.run_command("learning_curve", learning_curve, argv)


if __name__ == "__main__":
    main()
