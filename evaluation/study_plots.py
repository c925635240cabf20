"""Study plots (matplotlib, files only): a metric against a setting axis such as eta or gamma, and against the
guidance scale (image plans), each point the mean over seeds with its 95 % interval as a band."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from training.checkpoint import atomic_write


def point(summary: dict, metric: str) -> tuple[float, float, float] | None:
    """(mean, lo, hi) of a setting's metric; lo = hi = mean without an interval; None without a mean."""
    entry = summary["metrics"].get(metric)
    if entry is None or entry["mean"] is None:
        return None
    lo, hi = entry["ci95"] or (entry["mean"], entry["mean"])
    return entry["mean"], lo, hi


def draw(ax, label: str, points: list[tuple[float, tuple]]) -> None:
    points = sorted(points)
    xs = [x for x, _ in points]
    line, = ax.plot(xs, [p[0] for _, p in points], marker="o", label=label)
    ax.fill_between(xs, [p[1] for _, p in points], [p[2] for _, p in points], color=line.get_color(), alpha=0.2)


def save(fig, ax, x_label: str, metric: str, path: Path) -> Path:
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"{metric} (mean, 95 % CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda temporary: fig.savefig(temporary, dpi=120, format="png"))
    plt.close(fig)
    return path


def plot_axes(plan, settings: list[dict], metric: str, out_dir: Path) -> list[Path]:
    """One plot per x axis (the key of the settings' "x"): a line per series (the setting's "series", else the
    axis), its baseline drawn at x = 0."""
    by_name = {s["name"]: s for s in settings}
    lines = {}    # axis -> series -> [(x, point)]
    for name, setting in plan.settings.items():
        for axis, x in setting.get("x", {}).items():
            if name in by_name and (p := point(by_name[name], metric)) is not None:
                series = lines.setdefault(axis, {}).setdefault(setting.get("series", axis), [])
                series.append((x, p))
                baseline = by_name.get(plan.baseline_of(name))
                if baseline is not None and (b := point(baseline, metric)) is not None and (0, b) not in series:
                    series.append((0, b))
    paths = []
    for axis, series in lines.items():
        fig, ax = plt.subplots(figsize=(4.8, 3.4))
        for label, points in sorted(series.items()):
            draw(ax, label, points)
        paths.append(save(fig, ax, axis, metric, out_dir / f"{file_name(metric)}_vs_{file_name(axis)}.png"))
    return paths


def plot_guidance(plan, settings: list[dict], metric: str, out_dir: Path) -> Path | None:
    """`metric@s` against s, a line per setting."""
    scales = [float(s) for s in plan.evaluation["guidance"]]
    if len(scales) < 2:
        return None
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    drawn = False
    for setting in settings:
        points = [(s, p) for s in scales if (p := point(setting, f"{metric}@{s}")) is not None]
        if points:
            draw(ax, setting["name"], points)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    return save(fig, ax, "guidance scale s", metric, out_dir / f"{file_name(metric)}_vs_guidance.png")


def file_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)
