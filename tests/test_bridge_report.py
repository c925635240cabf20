"""gmm_theory.bridge_report: verdicts beside the theory's predicted differences, on a constructed study."""
import json

import pytest

from gmm_theory import bridge_report


def metrics(entropy: float, predicted: float, ratio: float) -> dict:
    out = {"entropy": entropy, "w2_class": 0.1, "closer_to_exact": 0.0, "gamma_theory": 0.5,
           "noise_ratio_start": 2 * ratio, "noise_ratio_end": ratio}
    for target in ("exact", "paper", "labelled"):
        out[f"theory_entropy_{target}"] = predicted * (2 if target == "paper" else 1)
        out[f"theory_w2_{target}"] = 0.1
    return out


@pytest.fixture
def study(tmp_path):
    runs = tmp_path / "gmm" / "runs"
    runs.mkdir(parents=True)
    for seed, (clean, cep) in enumerate([(1.0, 1.3), (2.0, 2.5)]):
        for setting, value, predicted, ratio in (("clean", clean, 10.0, 0.0), ("cep", cep, 10.2 + seed, 0.4)):
            record = {"setting": setting, "seed": seed, "metrics": metrics(value, predicted, ratio)}
            (runs / f"{setting}-seed{seed}.json").write_text(json.dumps(record))
    claim = {"claim": "CEP raises entropy", "metric": "entropy", "direction": "higher", "a": "cep", "b": "clean",
             "difference": 0.4, "ci95": [0.1, 0.7], "verdict": "reproduced"}
    (tmp_path / "gmm" / "summary.json").write_text(json.dumps({"plan": "gmm", "claims": [claim]}))
    plan = {"plan": "gmm", "base": {"d": 8}, "baseline": "clean",
            "settings": {"clean": {"kwargs": {}}, "cep": {"kwargs": {"cep": "uniform", "gamma": 1.0}}}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    return tmp_path


def test_claims_sit_beside_the_predicted_paired_differences(study):
    bridge_report.main([str(study / "gmm"), "--plan", str(study / "plan.json")])
    text = (study / "gmm" / "bridge.md").read_text()
    # predicted paired differences: exact (0.2 + 1.2) / 2 = 0.7, paper twice that; measured mean (0.3 + 0.5) / 2
    assert "| CEP raises entropy | **reproduced** | 0.4 [0.1, 0.7] | 0.7 | 1.4 | 0.7 | 0.5 | 0.8 -> 0.4 |" in text
    assert "| cep | - | 8 | - | uniform | 1.0 | - | 0.5 | 0.4 | 0.4 | 0.7 | 1.4 | 0 | 0 | 0 | 0 |" in text


def test_missing_summary_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bridge_report.main([str(tmp_path)])
    assert "study_dir" in capsys.readouterr().err


def test_rates_fit_the_exponent_of_the_gain_along_gamma():
    plan = {"base": {}, "baseline": "clean", "settings": {"clean": {"kwargs": {}}}}
    runs = {"clean": {0: {"entropy": 0.0, "theory_entropy_exact": 0.0, "theory_entropy_paper": 0.0}}}
    for gamma in (0.1, 0.2, 0.4):
        name = f"cep-{gamma}"
        plan["settings"][name] = {"kwargs": {"cep": "gaussian", "gamma": gamma}}
        runs[name] = {0: {"entropy": 0.5 * gamma**2, "theory_entropy_exact": gamma**2,
                          "theory_entropy_paper": -gamma**2, "gamma_theory": gamma}}
    lines = bridge_report.rates_table(plan, runs)
    assert lines[2] == ("| gamma_theory | model=mlp, cep=gaussian, d=8, n_k=256 | 3 | 2 | 2 | n/a (a gain <= 0) |")
