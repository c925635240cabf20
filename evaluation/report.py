"""Report for one or more evaluated runs: a markdown table, PNG plots (metric vs guidance scale per run, metric vs
corruption ratio eta across runs, as in paper 1 Figs. 2-4/11-14) and a sample grid per run and scale.

    python -m evaluation.report --runs runs/clean runs/eta05 --out results/eval
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from training.stats import save_image_grid

# (record key, column title, format); a column appears when any record has the metric.
COLUMNS = (("fid", "FID", ".2f"), ("sfid", "sFID", ".2f"), ("is", "IS", ".2f"), ("kid", "KID", ".4f"),
           ("precision", "Prec", ".3f"), ("recall", "Rec", ".3f"), ("top_f1", "TopP&R F1", ".3f"),
           ("rmd_top", "RMD top-1%", ".2f"), ("memorization_ratio", "Mem.", ".3f"), ("top5_l2", "top-5 L2", ".3f"),
           ("vq_entropy", "Entropy", ".3f"), ("clip_score", "CLIP", ".2f"), ("label_agreement", "Label acc.", ".3f"))
PLOTTED = ("fid", "is", "precision", "recall", "rmd_top", "memorization_ratio", "top5_l2", "vq_entropy")


def load_records(run_dirs) -> list[dict]:
    """The newest record per (run, sampler, steps, eta_ddim, N, scale, extractor) from each run's metrics.jsonl."""
    latest = {}
    for run_dir in run_dirs:
        path = Path(run_dir) / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"runs: {run_dir} has no metrics.jsonl (run evaluation.evaluate first)")
        for number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"runs: {path} line {number} is not JSON ({error})") from error
            key = (str(run_dir), record["sampler"], record["steps"], record["eta_ddim"], record["num_samples"],
                   record["guidance"], record["extractor"]["fingerprint"])
            latest[key] = record | {"run_name": Path(run_dir).name}
    return list(latest.values())


def corruption_ratio(record: dict) -> float:
    corruption = record["run"].get("corruption") or {}
    return float(corruption.get("ratio", 0.0)) if corruption.get("kind", "none") != "none" else 0.0


def markdown_table(records: list[dict]) -> str:
    columns = [c for c in COLUMNS if any(c[0] in r["metrics"] for r in records)]
    header = ["run", "corruption eta", "CEP", "sampler", "steps", "N", "s"] + [title for _, title, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(records, key=lambda r: (r["run_name"], r["guidance"])):
        cep = f"{r['run'].get('cep_mode') or 'none'}"
        if r["run"].get("cep_gamma"):
            cep += f" {r['run']['cep_gamma']:g}"
        cells = [r["run_name"], f"{corruption_ratio(r):g}", cep, r["sampler"], str(r["steps"]),
                 str(r["num_samples"]), f"{r['guidance']:g}"]
        cells += [format(r["metrics"][key], fmt) if key in r["metrics"] else "-" for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_metric(records: list[dict], metric: str, x_of, series_of, x_label: str, path: Path) -> Path | None:
    """One line per series (run or guidance scale) of `metric` against x; None when no record has the metric."""
    points = {}
    for r in records:
        if metric in r["metrics"]:
            points.setdefault(series_of(r), []).append((x_of(r), r["metrics"][metric]))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for series, values in sorted(points.items()):
        xs, ys = zip(*sorted(values))
        ax.plot(xs, ys, marker="o", label=str(series))
    ax.set_xlabel(x_label)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sample_grid(samples_dir, path: Path, count: int = 64) -> Path | None:
    """The first `count` PNGs of a sample folder as one grid."""
    files = sorted(Path(samples_dir).glob("[0-9]*.png"))[:count]
    if not files:
        return None
    images = np.stack([np.asarray(Image.open(f)) for f in files])
    images = images[..., None] if images.ndim == 3 else images
    images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    scale = max(1, 32 // images.shape[-1])  # 8x8 digits become visible 32x32 tiles (nearest: no new pixels)
    save_image_grid(torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest"), path)
    return path


def write_report(run_dirs, out_dir) -> Path:
    records = load_records(run_dirs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Evaluation report", "", markdown_table(records), ""]
    first = records[0]
    lines.append(f"Features: {first['extractor']['kind']} (fingerprint {first['extractor']['fingerprint']}"
                 + (f", held-out accuracy {first['extractor']['test_accuracy']:.3f}" if "test_accuracy"
                    in first["extractor"] else "") + f"); reference: {first['reference']['dataset']} "
                 f"{first['reference']['split']} split, {first['reference']['num']} images.")
    lines += ["", "## Plots", ""]
    for metric in PLOTTED:
        by_scale = plot_metric(records, metric, lambda r: r["guidance"], lambda r: r["run_name"],
                               "guidance scale s", out_dir / f"{metric}_vs_guidance.png")
        by_eta = plot_metric(records, metric, corruption_ratio, lambda r: f"s={r['guidance']:g}",
                             "corruption ratio eta", out_dir / f"{metric}_vs_eta.png")
        lines += [f"![{p.stem}]({p.name})" for p in (by_scale, by_eta) if p is not None]
    lines += ["", "## Samples", ""]
    for r in sorted(records, key=lambda r: (r["run_name"], r["guidance"])):
        grid = sample_grid(r["samples_dir"], out_dir / f"samples_{r['run_name']}_s{r['guidance']:g}.png")
        if grid is not None:
            lines.append(f"{r['run_name']}, s = {r['guidance']:g}: ![samples]({grid.name})")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m evaluation.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="evaluated run directories")
    parser.add_argument("--out", required=True, help="output folder for report.md and PNGs")
    args = parser.parse_args(argv)
    print(write_report(args.runs, args.out))


if __name__ == "__main__":
    main()
