"""A study's committed outputs in results/study/<plan>/: summary.json (schema in configs/studies/README.md),
report.md (settings x metrics with intervals, paired differences to the baseline, each image run's own numbers,
claims with verdicts and the rule, cost, machine, commands) and the PNG plots."""
import json
from pathlib import Path

from evaluation import study_plots
from evaluation.study_stats import (VERDICT_RULE, baseline_differences, metric_values, paired_difference,
                                    summarize_claims, summarize_settings)
from training.checkpoint import atomic_write

COLUMNS_PER_TABLE = 6


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temporary: Path(temporary).write_text(text))


def summarize(plan, records: list[dict], command: str) -> dict:
    machines = sorted({r["machine"] for r in records})
    return {"plan": plan.name, "command": command, "machine": "; ".join(machines),
            "wall_s": sum(r["wall_s"] for r in records),
            "settings": summarize_settings(plan, records), "claims": summarize_claims(plan, records)}


def plotted_metrics(plan) -> list[str]:
    """plan.plot_metrics, else the claims' metrics (in order, once each)."""
    return list(dict.fromkeys(plan.plot_metrics or [c["metric"] for c in plan.claims]))


def make_plots(plan, settings: list[dict], out_dir: Path) -> list[Path]:
    paths = []
    for metric in plotted_metrics(plan):
        paths += study_plots.plot_axes(plan, settings, metric, out_dir)
    if plan.kind == "image":
        for name in dict.fromkeys(m.rpartition("@")[0] or m for m in plotted_metrics(plan)):
            if (path := study_plots.plot_guidance(plan, settings, name, out_dir)) is not None:
                paths.append(path)
    return paths


def number(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def with_interval(mean, interval) -> str:
    if mean is None:
        return "-"
    return number(mean) + (f" ± {number((interval[1] - interval[0]) / 2, 2)}" if interval else "")


def grid(rows: list[str], metrics: list[str], cell, label: str = "setting") -> list[str]:
    """Markdown tables of rows x metrics, at most COLUMNS_PER_TABLE metric columns each."""
    lines = []
    for start in range(0, len(metrics), COLUMNS_PER_TABLE):
        chunk = metrics[start:start + COLUMNS_PER_TABLE]
        lines += [f"| {label} | " + " | ".join(f"`{m}`" for m in chunk) + " |", "|---" * (len(chunk) + 1) + "|"]
        lines += ["| " + " | ".join([row] + [cell(row, m) for m in chunk]) + " |" for row in rows]
        lines.append("")
    return lines


def claims_table(plan, records: list[dict], claims: list[dict]) -> list[str]:
    lines = ["| claim | paper | metric | a | b | expects a | mean a - b (paired) | 95 % CI | resolvable | pairs "
             "| verdict |", "|---" * 11 + "|"]
    for claim in claims:
        pairs = paired_difference(metric_values(records, claim["a"], claim["metric"]),
                                  metric_values(records, claim["b"], claim["metric"]))["seeds"]
        interval = "-" if claim["ci95"] is None else f"[{number(claim['ci95'][0])}, {number(claim['ci95'][1])}]"
        lines.append(f"| {claim['claim']} | {claim['paper'] or '-'} | `{claim['metric']}` | {claim['a']} | "
                     f"{claim['b']} | {claim['direction']} | {number(claim['difference'])} | {interval} | "
                     f"{number(claim['resolvable'], 2)} | {len(pairs)} | **{claim['verdict']}** |")
    return lines


def report(plan, records: list[dict], summary: dict, plots: list[Path], planned_runs: int, out_dir: Path) -> str:
    settings = {s["name"]: s for s in summary["settings"]}
    metrics = sorted({m for s in summary["settings"] for m in s["metrics"]})
    done = {(r["setting"], r["seed"]) for r in records}
    missing = [run.name for run in plan.runs() if (run.setting, run.seed) not in done]
    commits = sorted({str(r.get("git_commit")) for r in records})
    lines = [f"# Study `{plan.name}`", "", plan.description, "",
             f"- command: `{summary['command']}`",
             f"- runs: {len(records)} of {planned_runs} finished" + (f" (missing: {', '.join(missing)})" if missing
                                                                     else ""),
             f"- wall time (sum over the runs' records): {summary['wall_s']:.0f} s ({summary['wall_s'] / 3600:.2f} h)",
             f"- machine: {summary['machine']}", f"- git commit(s): {', '.join(commits)}",
             f"- estimated cost: {dry_run_line(out_dir)}", "", "## Claims", ""]
    lines += claims_table(plan, records, summary["claims"]) if summary["claims"] else ["(the plan lists no claims)"]
    lines += ["", f"Verdict rule. {VERDICT_RULE}", "",
              "## Settings", "", "Mean ± half-width of the Student-t 95 % interval over seeds "
              f"(seeds: {', '.join(str(s) for s in plan.seeds)}"
              + "".join(f"; {name}: {', '.join(str(s) for s in setting['seeds'])}"
                        for name, setting in plan.settings.items() if "seeds" in setting)
              + "; a setting's seeds with a record are in summary.json).", ""]

    def cell(name, metric):
        entry = settings[name]["metrics"].get(metric)
        return "-" if entry is None else with_interval(entry["mean"], entry["ci95"])

    lines += grid(list(settings), metrics, cell)
    differences = baseline_differences(plan, records, metrics)
    if differences:
        lines += ["## Paired difference to the baseline", "",
                  "Mean over seeds of metric(setting) - metric(its baseline) at the same seed, ± the half-width of its "
                  "95 % interval; baselines: " + ", ".join(sorted({plan.baseline_of(s) for s in plan.settings})) + ".",
                  ""]
        rows = [name for name in settings if plan.baseline_of(name) != name]
        lines += grid(rows, metrics, lambda name, metric: with_interval(differences[name, metric]["difference"],
                                                                         differences[name, metric]["ci95"]))
    lines += runs_section(plan, records) + prerequisites_section(plan, out_dir) + curves_section(out_dir)
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    lines += ["## Commands", "", "One run per setting (the other seeds differ only in the seed):", ""]
    for name in settings:
        first = min((r for r in records if r["setting"] == name), key=lambda r: r["seed"], default=None)
        if first is not None:
            lines += [f"- {name}, seed {first['seed']}, {first['wall_s']:.1f} s:"] + [
                f"  `{command}`" for command in first["commands"]]
    return "\n".join(lines) + "\n"


def runs_section(plan, records: list[dict]) -> list[str]:
    """Image plans: one row per run (the plotted metrics, training and wall seconds), the values behind every
    interval above. GMM plans have hundreds of cheap runs; their values are in summary.json."""
    if plan.kind != "image" or not records:
        return []
    runs = {f"{r['setting']}, seed {r['seed']}": r for r in records}

    def cell(name, metric):
        record = runs[name]
        if metric in ("train_s", "wall_s"):
            return "-" if record.get(metric) is None else f"{record[metric]:.0f}"
        return number(record["metrics"].get(metric))

    return ["## Runs", "", "Each run's own values (seconds: training, and training plus evaluation).", "",
            *grid(list(runs), plotted_metrics(plan) + ["train_s", "wall_s"], cell, label="run")]


def prerequisites_section(plan, out_dir: Path) -> list[str]:
    """Each prerequisite's command, wall time and final training stats (e.g. an autoencoder's reconstruction)."""
    lines = []
    for name in plan.prerequisites:
        path = out_dir / "prerequisites" / f"{name}.json"
        if not path.is_file():
            lines.append(f"- {name}: not made yet")
            continue
        record = json.loads(path.read_text())
        stats = ", ".join(f"{key} {number(value)}" for key, value in (record["final_stats"] or {}).items())
        lines += [f"- {name} ({record['wall_s']:.0f} s, {record['machine']}): `{record['command']}`",
                  f"  - final training stats: {stats or 'none logged'}"]
        if "previous_final_stats" in record:
            lines.append(f"  - re-made with different final stats than before: {record['previous_final_stats']}")
    return ["## Prerequisites", "", *lines, ""] if lines else []


def curves_section(out_dir: Path) -> list[str]:
    """The learning curves (evaluation.learning_curve) that sized the plan: label agreement and FID per stage."""
    lines = []
    for path in sorted((out_dir / "curves").glob("*.json")):
        curve = json.loads(path.read_text())
        scales = sorted({m.rpartition("@")[2] for p in curve["points"] for m in p["metrics"]}, key=float)
        accuracy = curve["points"][-1].get("classifier_accuracy") if curve["points"] else None
        lines += [f"`{path.stem}` (label agreement >= 0.9 at s={curve.get('main_scale')}: "
                  f"{curve.get('learned_at') or 'not reached'}; "
                  + (f"real images score {accuracy:.3f}, the feature classifier's held-out accuracy; "
                     if accuracy is not None else "") +
                  f"![curve](curves/{path.stem}.png)):", "",
                  "| images | " + " | ".join(f"label agreement s={s} | FID s={s}" for s in scales) + " |",
                  "|---" * (1 + 2 * len(scales)) + "|"]
        lines += [f"| {p['images']} | " + " | ".join(
            f"{number(p['metrics'].get(f'label_agreement@{s}'), 3)} | {number(p['metrics'].get(f'fid@{s}'), 3)}"
            for s in scales) + " |" for p in curve["points"]] + [""]
    return ["## Learning curves", "", *lines] if lines else []


def dry_run_line(out_dir: Path) -> str:
    path = out_dir / "dry_run.json"
    if not path.is_file():
        return "no --dry-run was made before the runs"
    dry = json.loads(path.read_text())
    cost = "unknown" if dry["estimated_s"] is None else f"{dry['estimated_s']:.0f} s"
    return (f"{cost} for {dry['todo']} of {dry['runs']} runs (`--dry-run` at {dry['time']}, "
            f"{dry['source']})")


def write_outputs(plan, records: list[dict], out_dir: Path, command: str, planned_runs: int) -> Path:
    """summary.json, the plots and report.md from the records (in plan.runs() order); returns the summary's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(plan, records, command)
    plots = make_plots(plan, summary["settings"], out_dir)
    path = out_dir / "summary.json"
    write_text(path, json.dumps(summary, indent=1) + "\n")
    write_text(out_dir / "report.md", report(plan, records, summary, plots, planned_runs, out_dir))
    return path
