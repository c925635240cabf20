"""Study harness: a plan (configs/studies/<plan>.json: settings x seeds x evaluation x claims) -> runs ->
evaluations -> mean and 95 % interval per setting, paired differences, verdicts -> results/study/<plan>/
(report.md, summary.json, PNG plots, one small JSON record per finished run).

    python -m evaluation.study configs/studies/demo-digits.json --dry-run     # every run, done or to do, and its cost
    python -m evaluation.study configs/studies/demo-digits.json               # run what is missing, then aggregate
    python -m evaluation.study configs/studies/gmm.json --shard 0/2           # half of the runs (and --shard 1/2)
    python -m evaluation.study configs/studies/gmm.json --aggregate-only      # report from the records only

A run with a record in results/study/<plan>/runs/ is done, even where its run dir is gone; a record whose run
definition (preset, flags, kwargs, evaluation) differs from the plan's is stale and runs again (a finished run dir
whose evaluation alone changed is re-evaluated and keeps its recorded training cost).
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from evaluation import study_runners as runners
from evaluation.study_plan import Plan, PlanError, Run, load_plan, select
from evaluation.study_report import write_outputs, write_text

REPO = Path(__file__).resolve().parents[1]


#################################################################################
#                                   Records                                     #
#################################################################################

def run_spec(plan: Plan, run: Run) -> dict:
    """What defines a run's numbers; a record made under another definition is stale. (nproc is left out: it is a
    resource choice.)"""
    if plan.kind == "gmm":
        return {"runner": plan.runner, "kwargs": runners.gmm_kwargs(plan, run.setting)}
    spec = {"train": runners.train_args(plan, run.setting), "evaluation": runners.evaluation_args(
        plan, plan.evaluation["num_samples"])}
    if names := plan.prerequisites_of(run.setting):   # a changed prerequisite makes the runs that use it stale
        spec["prerequisites"] = {name: prerequisite_spec(plan, name) for name in names}
    return spec


def prerequisite_spec(plan: Plan, name: str) -> dict:
    return {key: plan.prerequisites[name][key] for key in ("module", "args")}


def record_path(out: Path, plan: Plan, run: Run) -> Path:
    return out / plan.name / "runs" / f"{run.name}.json"


def load_records(plan: Plan, out: Path) -> dict:
    """Run -> its record, for the plan's runs that have one (stale ones included; see is_stale)."""
    records = {}
    for run in plan.runs():
        path = record_path(out, plan, run)
        if path.is_file():
            try:
                records[run] = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: not valid JSON ({error}); delete it to run again") from error
    return records


def without_evaluation(spec: dict) -> dict:
    return {key: value for key, value in spec.items() if key != "evaluation"}


def current_spec(plan: Plan, run: Run) -> dict:
    """run_spec as a record stores it (JSON: tuples become lists), so that it compares equal to a stored one."""
    return json.loads(json.dumps(run_spec(plan, run)))


def is_stale(plan: Plan, run: Run, record: dict) -> bool:
    return record.get("spec") != current_spec(plan, run)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=1) + "\n")


def machine() -> str:
    return (f"{platform.node()}: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
            f"python {platform.python_version()}, torch {torch.__version__}")


def git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_dir(args, plan: Plan, run: Run) -> Path:
    return Path(args.runs_root) / plan.name / run.setting / f"seed{run.seed}"


def prerequisite_dirs(args, plan: Plan) -> dict:
    """name -> run dir; "_" keeps them apart from the setting folders (setting names start with a letter or digit)."""
    return {name: Path(args.runs_root) / plan.name / "_prerequisites" / name for name in plan.prerequisites}


def prerequisite_record_path(out: Path, plan: Plan, name: str) -> Path:
    return out / plan.name / "prerequisites" / f"{name}.json"


WALL_CLOCK = ("seconds", "images_per_second", "time")  # fields of a stats tick that differ on every re-make


def outcome(stats: dict | None) -> dict:
    """A training's final stats without its wall-clock fields: what a deterministic re-make reproduces."""
    return {key: value for key, value in (stats or {}).items() if key not in WALL_CLOCK}


def make_prerequisites(args, plan: Plan, todo: list[Run], made: set) -> None:
    """Makes (or resumes, or finds finished) the prerequisites the runs to do name, once per invocation, and records
    each: the record keeps its final training stats (e.g. an autoencoder's reconstruction error) for the report. Run
    dirs do not travel between machines but records do, so a prerequisite is re-made on each machine. A re-make that
    reproduces the record keeps it (its wall time is the making cost, not a resume's seconds); one whose final stats
    differ from the record's (a nondeterministic re-make) is reported, not hidden."""
    for name in dict.fromkeys(name for run in todo for name in plan.prerequisites_of(run.setting)):
        if name in made:
            continue
        path = prerequisite_record_path(Path(args.out), plan, name)
        previous = json.loads(path.read_text()) if path.is_file() else None
        print(f"{plan.name}: prerequisite {name}", file=sys.stderr)
        record = {"plan": plan.name, "name": name, "spec": prerequisite_spec(plan, name),
                  **runners.make_prerequisite(plan, name, prerequisite_dirs(args, plan)[name]),
                  "machine": machine(), "git_commit": git_commit(), "finished": now()}
        same_spec = previous is not None and previous.get("spec") == record["spec"]
        reproduced = same_spec and outcome(previous["final_stats"]) == outcome(record["final_stats"])
        if same_spec and not reproduced:
            print(f"study: warning: prerequisite {name} was re-made with final stats {record['final_stats']}, not "
                  f"the recorded {previous['final_stats']}", file=sys.stderr)
            record["previous_final_stats"] = previous["final_stats"]
        if not reproduced:
            write_json(path, record)
        made.add(name)


def execute(args, plan: Plan, run: Run, previous: dict | None) -> dict:
    """Runs one (setting, seed) and writes its record atomically. `previous`: its stale record, if any."""
    started = now()
    if plan.kind == "gmm":
        fields = runners.run_gmm(plan, run, not args.no_progress)
    else:
        # a stale run's old samples are not reused: evaluate remakes samples of other weights
        fields = runners.run_image(plan, run, run_dir(args, plan, run), prerequisite_dirs(args, plan))
    record = {"plan": plan.name, "setting": run.setting, "seed": run.seed, "spec": current_spec(plan, run), **fields,
              "machine": machine(), "git_commit": git_commit(),
              "started": started, "finished": now()}
    if previous is not None and fields.get("images_trained") == 0 and previous.get("train_s") is not None and (
            without_evaluation(previous["spec"]) == without_evaluation(record["spec"])):
        # Only the evaluation changed and the finished run dir was resumed, not retrained: the record keeps the
        # training cost recorded before (as a prerequisite's resume keeps its making cost).
        record |= {"train_s": previous["train_s"], "wall_s": previous["train_s"] + fields["evaluate_s"],
                   "reevaluated": True}
    write_json(record_path(Path(args.out), plan, run), record)
    return record


#################################################################################
#                                 Cost estimate                                 #
#################################################################################

def estimate_gmm(plan: Plan, todo: list[Run], done: list[dict]) -> tuple[dict, str]:
    """Run -> seconds: the mean recorded wall time of its setting, else of all records, else one timed run."""
    walls = {}
    for record in done:
        walls.setdefault(record["setting"], []).append(record["wall_s"])
    if walls:
        every = [wall for values in walls.values() for wall in values]
        overall = sum(every) / len(every)
        return ({run: statistics.mean(walls.get(run.setting, [overall])) for run in todo},
                f"mean wall time of {len(every)} finished runs (of the same setting where it has some)")
    start = time.perf_counter()
    runners.run_gmm(plan, todo[0], progress=False)
    seconds = time.perf_counter() - start
    return ({run: seconds for run in todo},
            f"calibration: one timed run ({todo[0].name}, {seconds:.1f} s, not recorded), applied to every run")


def estimate_image(args, plan: Plan, todo: list[Run], done: list[dict]) -> tuple[dict, str]:
    """Run -> seconds from a cost model fitted to the plan's records, else existing run dirs, else a calibration."""
    model = runners.image_cost_model(done, [run_dir(args, plan, run) for run in plan.runs()])
    source = (f"{len(done)} finished runs of this plan" if done else
              "training images/s in existing run dirs' stats.jsonl; start-up and evaluation not included")
    if model is None:
        missing = [name for name in plan.prerequisites_of(plan.baseline)
                   if not (prerequisite_dirs(args, plan)[name] / "stats.jsonl").is_file()]
        if missing:
            return {run: None for run in todo}, f"none: calibrating needs prerequisite {missing[0]} made first"
        model = runners.calibrate_image(plan, not args.no_progress, prerequisite_dirs(args, plan))
        source = "calibration: 8 training steps of the baseline setting and a 20-image evaluation, measured now"
    source += (f" ({model['images_per_second']:.0f} training images/s, {model['train_overhead_s']:.0f} s start-up, "
               f"evaluation {model['evaluate_fixed_s']:.0f} s + {model['evaluate_per_sample_s'] * 1000:.1f} s "
               "per 1000 images)")
    total_images = {s: runners.image_config(plan, s)["training"]["total_images"] for s in {r.setting for r in todo}}
    return ({run: runners.image_seconds(model, total_images[run.setting], plan.evaluation["num_samples"])
             for run in todo}, source)


def pending(plan: Plan, selected: list[Run], records: dict) -> list[Run]:
    """The selected runs without a current record."""
    return [run for run in selected if run not in records or is_stale(plan, run, records[run])]


def dry_run(args, plan: Plan, selected: list[Run], records: dict) -> dict:
    """Prints every selected run with its status and estimate; returns the summary and, for the whole plan (a
    partial dry run must not replace the plan's cost in its report), stores it for report.md."""
    todo = pending(plan, selected, records)
    done = [record for run, record in records.items() if not is_stale(plan, run, record)]
    if not todo:
        seconds, source = {}, "nothing to do"
    elif plan.kind == "gmm":
        seconds, source = estimate_gmm(plan, todo, done)
    else:
        seconds, source = estimate_image(args, plan, todo, done)
    width = max((len(run.name) for run in selected), default=0)
    for name in dict.fromkeys(name for run in todo for name in plan.prerequisites_of(run.setting)):
        path = prerequisite_record_path(Path(args.out), plan, name)
        recorded = f"{json.loads(path.read_text())['wall_s']:.0f} s recorded" if path.is_file() else "never made"
        print(f"prerequisite {name}: made (or resumed) before the runs that name it ({recorded}; not in the total)")
    for run in selected:
        status = ("stale" if run in records else "to do") if run in seconds else "done"
        cost = (f"({records[run]['wall_s']:.1f} s recorded)" if run not in seconds else
                "~? s" if seconds[run] is None else f"~{seconds[run]:8.1f} s")
        print(f"{run.name:<{width}}  {status:<6} {cost}")
    # one run without an estimate (no prerequisite to calibrate on) makes the total unknown, not smaller
    total = None if None in seconds.values() else sum(seconds.values())
    cost = "cost unknown" if total is None else f"estimated {total:.0f} s ({total / 3600:.2f} h)"
    print(f"{len(todo)} of {len(selected)} runs to do, {cost} on this machine; estimate from {source}")
    summary = {"time": now(), "runs": len(selected), "todo": len(todo), "estimated_s": total, "source": source,
               "machine": machine(), "command": args.command}
    if args.only is None and args.shard is None:
        write_json(Path(args.out) / plan.name / "dry_run.json", summary)
    return summary


#################################################################################
#                                      CLI                                      #
#################################################################################

def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line(argv: list[str]) -> str:
    return shlex.join(["python", "-m", "evaluation.study", *argv])


def parse_shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be i/n with integers, got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"needs 0 <= i < n, got {text!r}")
    return index, count


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan", help="configs/studies/<plan>.json")
    p.add_argument("--dry-run", action="store_true", help="list every run (done / to do) and its estimated cost")
    p.add_argument("--only", type=lambda s: s.split(","), default=None, metavar="SETTING[,SETTING]",
                   help="run only these settings")
    p.add_argument("--shard", type=parse_shard, default=None, metavar="i/n",
                   help="run only runs i, i+n, i+2n, ... (0-based) of the plan's (setting, seed) list")
    p.add_argument("--runs-root", default="runs/study", help="image plans: run dirs go to <runs-root>/<plan>/")
    p.add_argument("--out", default="results/study", help="records and report go to <out>/<plan>/")
    p.add_argument("--aggregate-only", action="store_true", help="run nothing; aggregate the existing records")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def study(argv: list[str]) -> dict | None:
    """Runs the plan (or the selected part of it) and aggregates; returns the summary (None on --dry-run)."""
    args = parser().parse_args(argv)
    args.command = command_line(argv)
    plan = load_plan(args.plan)
    if plan.kind == "image":      # fail on bad flags now, not after hours of other runs
        for setting in plan.settings:
            runners.image_config(plan, setting)
        runners.check_evaluation_args(plan)
    else:
        runners.load_runner(plan)
    unknown = [s for s in args.only or [] if s not in plan.settings]
    if unknown:
        raise PlanError("--only", f"{unknown[0]!r} is not a setting of {plan.name}; known: {list(plan.settings)}")
    out = Path(args.out)
    selected = select(plan.runs(), args.only, args.shard)
    records = load_records(plan, out)
    if args.dry_run:
        dry_run(args, plan, selected, records)
        return None
    if not args.aggregate_only:
        todo, made = pending(plan, selected, records), set()
        for run in tqdm(todo, desc=plan.name, unit="run", disable=args.no_progress):
            make_prerequisites(args, plan, [run], made)
            records[run] = execute(args, plan, run, records.get(run))
    current = [records[run] for run in plan.runs() if run in records and not is_stale(plan, run, records[run])]
    if not current:
        print(f"{plan.name}: no finished runs yet; nothing to aggregate")
        return None
    summary_path = write_outputs(plan, current, out / plan.name, args.command, len(plan.runs()))
    print(summary_path.with_name("report.md"))
    return json.loads(summary_path.read_text())


def run_command(prog: str, command, argv=None) -> None:
    """The study commands' error contract: a bad plan or flag exits 2 with one line naming the field; a failed job
    exits 1 with its command and log tail (finished runs keep their records: re-running continues)."""
    try:
        command(sys.argv[1:] if argv is None else argv)
    except PlanError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except runners.RunFailed as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def main(argv=None) -> None:
    run_command("study", study, argv)


if __name__ == "__main__":
    main()
