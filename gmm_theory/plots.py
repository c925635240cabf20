"""PNG figures for the theory report (matplotlib, Agg backend: no display needed)."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .closed_forms import VERSIONS  # noqa: E402
from .verdicts import log_linear_fit  # noqa: E402


def _scatter_by_d(ax, rows, x_key, y_key, error_key=None):
    for d in sorted({r["d"] for r in rows}):
        at = [r for r in rows if r["d"] == d]
        x = np.array([x_key(r) for r in at])
        y = np.array([r[y_key] for r in at])
        errors = np.array([2 * r[error_key] for r in at]) if error_key else None
        ax.errorbar(x, y, yerr=errors, fmt="o", ms=3, label=f"d={d}", alpha=0.8)


def _save(fig, path: Path, title: str) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _version_panels(records: list[dict]):
    """A figure with one panel per model version; yields (axis, rows of that version with gamma > 0)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    panels = [(ax, [r for r in records if r["version"] == version and r["gamma"] > 0])
              for ax, version in zip(axes, VERSIONS)]
    for ax, version in zip(axes, VERSIONS):
        ax.set_title(version)
        ax.grid(True, which="both", alpha=0.3)
    return fig, axes, panels


def theorem1_figure(records: list[dict], path: Path) -> None:
    """Delta-H vs gamma^2 d, log-log, one panel per version, with the fitted slope."""
    fig, axes, panels = _version_panels(records)
    for ax, rows in panels:
        _scatter_by_d(ax, rows, lambda r: r["gamma"] ** 2 * r["d"], "delta_h")
        x = np.array([r["gamma"] ** 2 * r["d"] for r in rows])
        y = np.array([r["delta_h"] for r in rows])
        slope = log_linear_fit([x], y)[1]
        ax.set(xscale="log", yscale="log", xlabel="gamma^2 d", title=f"{ax.get_title()}: fitted slope {slope:.2f}")
    axes[0].set_ylabel("Delta-H = H(corrupted) - H(clean)")
    axes[0].legend(fontsize=7)
    _save(fig, path, "Theorem 1: entropy gain (claim: Theta(gamma^2 d))")


def theorem2_figure(records: list[dict], path: Path) -> None:
    """E[Delta W2^2] vs gamma^2 d / n_k, symlog y (the gain turns negative for large gamma)."""
    fig, axes, panels = _version_panels(records)
    for ax, rows in panels:
        _scatter_by_d(ax, rows, lambda r: r["gamma"] ** 2 * r["d"] / r["n_k"], "delta_w2", "delta_w2_se")
        scale = np.array(sorted(r["gamma"] ** 2 * r["d"] / r["n_k"] for r in rows))
        ax.plot(scale, scale, "k--", lw=1, label="gamma^2 d / n_k")
        ax.set(xscale="log", xlabel="gamma^2 d / n_k")
        ax.set_yscale("symlog", linthresh=1e-6)
    axes[0].set_ylabel("E[W2^2(P,Q) - W2^2(P,Q^c)]  (+-2 s.e.)")
    axes[0].legend(fontsize=7)
    _save(fig, path, "Theorem 2: W2 gain (claim: Omega(gamma^2 d / n_k) for gamma = O(1/sqrt(n_k)))")


def simulation_figure(records: list[dict], path: Path) -> None:
    """ODE-simulation error of the covariance vs Euler steps, one line per (model, particles)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (model, particles) in sorted({(r["model"], r["particles"]) for r in records}):
        at = sorted((r for r in records if r["model"] == model and r["particles"] == particles),
                    key=lambda r: r["steps"])
        steps = [r["steps"] for r in at]
        axes[0].plot(steps, [r["cov_rel_error"] for r in at], "o-", label=f"{model}, {particles} particles")
        axes[1].plot(steps, [r["w2_error"] for r in at], "o-")
    axes[0].set(xscale="log", yscale="log", xlabel="Euler steps", ylabel="relative covariance error")
    axes[1].set(xscale="log", yscale="log", xlabel="Euler steps", ylabel="|W2^2 simulated - closed form|")
    axes[0].legend(fontsize=6)
    _save(fig, path, "Probability-flow ODE simulation vs closed forms (Lemmas 3, 4)")


def label_flip_figure(records: list[dict], path: Path) -> None:
    eta = [r["eta"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].errorbar(eta, [r["delta_h_gaussian"] for r in records],
                     yerr=[2 * r["delta_h_gaussian_se"] for r in records], fmt="o-", label="linear learner: Delta-H")
    axes[0].errorbar(eta, [r["mixture_entropy_gain"] for r in records],
                     yerr=[2 * r["mixture_entropy_se"] for r in records], fmt="s-", label="mixture: H - H(truth)")
    axes[0].set(xlabel="flip ratio eta", ylabel="entropy gain (nats)")
    axes[0].legend(fontsize=8)
    axes[1].errorbar(eta, [r["delta_w2_gaussian"] for r in records],
                     yerr=[2 * r["delta_w2_gaussian_se"] for r in records], fmt="o-",
                     label="linear learner: W2^2(clean) - W2^2(flipped)")
    axes[1].plot(eta, [r["mixture_w2_debiased"] for r in records], "s-", label="mixture: W2^2 to truth (OT, debiased)")
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].set(xlabel="flip ratio eta", ylabel="W2^2")
    axes[1].legend(fontsize=8)
    _save(fig, path, "Label flips (the experiments' corruption) in the Gaussian-mixture model")
