"""Statistics of a study: per setting and metric the mean over seeds with a Student-t 95 % interval, paired
differences a - b by seed with their interval, and the verdict rule for claims."""
import math

from scipy import stats

CONFIDENCE = 0.95
VERDICT_RULE = ("A claim compares setting a with setting b on one metric, paired by seed: d_k = metric(a, seed k) - "
                "metric(b, seed k) over the seeds both have. Its 95 % interval is mean(d) +- t(0.975, n-1) * sd(d) / "
                "sqrt(n). **reproduced**: the interval excludes 0 on the claimed side (direction 'lower': upper end < 0; "
                "'higher': lower end > 0); **contradicted**: it excludes 0 on the other side; **inconclusive**: it "
                "contains 0, or fewer than 2 pairs. **resolvable** = the interval's half-width: with the same spread, "
                "a true effect smaller than it would have been called inconclusive.")


def mean_interval(values) -> tuple[float | None, list[float] | None]:
    """(mean, [lo, hi]) of the Student-t 95 % interval for the mean; the interval is None below 2 values (and the
    mean too for none). Zero spread gives the degenerate interval [mean, mean]."""
    values = [float(v) for v in values]
    if not values:
        return None, None
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1) * sd / math.sqrt(len(values))
    return mean, [mean - half, mean + half]


def paired_difference(a: dict, b: dict) -> dict:
    """a, b: seed -> value (None = missing). Mean of a - b over the seeds both have, its interval and the pairs."""
    seeds = sorted(s for s in a if s in b and finite(a[s]) and finite(b[s]))
    difference, interval = mean_interval([a[s] - b[s] for s in seeds])
    return {"difference": difference, "ci95": interval, "seeds": seeds}


def verdict(direction: str, interval) -> str:
    """The rule of VERDICT_RULE; `interval` None (fewer than 2 pairs) is inconclusive."""
    if direction not in ("lower", "higher"):
        raise ValueError(f"direction: must be 'lower' or 'higher', got {direction!r}")
    if interval is None or interval[0] <= 0 <= interval[1]:
        return "inconclusive"
    below = interval[1] < 0
    return "reproduced" if below == (direction == "lower") else "contradicted"


def metric_values(records: list[dict], setting: str, metric: str) -> dict:
    """seed -> the metric of that setting's record (None where the record lacks it or it is not finite)."""
    out = {}
    for record in records:
        if record["setting"] == setting:
            value = record["metrics"].get(metric)
            out[record["seed"]] = float(value) if finite(value) else None
    return out


def summarize_settings(plan, records: list[dict]) -> list[dict]:
    """summary.json's "settings": per setting its seeds (those with a record) and per metric mean, ci95 and the
    values in seed order (null where missing; mean and interval over the others)."""
    out = []
    for name in plan.settings:
        own = sorted((r for r in records if r["setting"] == name), key=lambda r: r["seed"])
        metrics = {}
        for metric in sorted({m for r in own for m in r["metrics"]}):
            by_seed = metric_values(own, name, metric)
            values = [by_seed[r["seed"]] for r in own]
            mean, interval = mean_interval([v for v in values if v is not None])
            metrics[metric] = {"mean": mean, "ci95": interval, "values": values}
        out.append({"name": name, "seeds": [r["seed"] for r in own], "metrics": metrics})
    return out


def summarize_claims(plan, records: list[dict]) -> list[dict]:
    out = []
    for claim in plan.claims:
        paired = paired_difference(metric_values(records, claim["a"], claim["metric"]),
                                   metric_values(records, claim["b"], claim["metric"]))
        interval = paired["ci95"]
        out.append({**{key: claim[key] for key in ("claim", "metric", "direction", "a", "b")},
                    "paper": claim.get("paper", ""), "difference": paired["difference"], "ci95": interval,
                    "resolvable": None if interval is None else (interval[1] - interval[0]) / 2,
                    "verdict": verdict(claim["direction"], interval)})
    return out


def baseline_differences(plan, records: list[dict], metrics) -> dict:
    """(setting, metric) -> paired difference to the setting's baseline, for every non-baseline setting."""
    out = {}
    for name in plan.settings:
        baseline = plan.baseline_of(name)
        if baseline == name:
            continue
        for metric in metrics:
            out[name, metric] = paired_difference(metric_values(records, name, metric),
                                                  metric_values(records, baseline, metric))
    return out


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
