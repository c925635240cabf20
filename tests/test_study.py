"""evaluation.study: plan validation, dry-run cost, resume/skip, sharding, interval maths against scipy, the verdict
rule, summary.json, and one tiny image plan end to end. Plans of kind "gmm" run this module's fake runner."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from evaluation import study, study_report, study_runners
from evaluation.study_plan import PlanError, load_plan, select
from evaluation.study_stats import mean_interval, paired_difference, verdict

CALLS = []


def fake_runner(seed: int, progress: bool = False, gamma: float = 0.0, d: int = 2) -> dict:
    """Entropy grows with gamma, w2 does not depend on it; seed noise is shared across settings (paired)."""
    CALLS.append((seed, gamma))
    noise = np.random.default_rng(seed).standard_normal(2)
    return {"entropy": 1.0 + gamma + 0.01 * noise[0], "w2": 0.5 + 0.01 * noise[1]}


def bad_runner(seed: int, progress: bool = False, **kwargs):
    return [seed]


def gmm_plan(**changes) -> dict:
    plan = {"plan": "fake", "kind": "gmm", "runner": "test_study:fake_runner", "base": {"d": 2},
            "settings": {"clean": {}, "cep-0.5": {"kwargs": {"gamma": 0.5}, "x": {"gamma": 0.5}, "series": "CEP-U"},
                         "cep-1": {"kwargs": {"gamma": 1.0}, "x": {"gamma": 1.0}, "series": "CEP-U"}},
            "baseline": "clean", "seeds": [0, 1, 2],
            "claims": [{"claim": "CEP raises entropy", "metric": "entropy", "direction": "higher",
                        "a": "cep-1", "b": "clean"}]}
    return plan | changes


def image_plan(**changes) -> dict:
    plan = {"plan": "tiny", "kind": "image",
            "base": {"preset": "dit-tiny-digits", "args": ["--set", "model.preset=DiT-micro/2", "--batch-size", "16",
                                                           "--total-images", "32", "--set", "logging.num_samples=2",
                                                           "--set", "logging.sample_steps=2"]},
            "settings": {"clean": {}, "cep-u": {"args": ["--cep", "uniform", "--cep-gamma", "1.0"],
                                                "x": {"gamma": 1.0}}},
            "baseline": "clean", "seeds": [0],
            "evaluation": {"sampler": "ddim", "steps": 2, "guidance": [1.0, 2.0], "num_samples": 20,
                           "args": ["--classifier-steps", "100", "--kid-subsets", "5", "--kid-subset-size", "20",
                                    "--is-splits", "2", "--batch-size", "20"]},
            "claims": [{"claim": "CEP-U lowers FID at s=2", "metric": "fid@2.0", "direction": "lower",
                        "a": "cep-u", "b": "clean"}]}
    return plan | changes


def write_plan(tmp_path, plan: dict):
    path = tmp_path / f"{plan['plan']}.json"
    path.write_text(json.dumps(plan))
    return path


def run_study(tmp_path, plan: dict, *flags) -> dict | None:
    argv = [str(write_plan(tmp_path, plan)), "--out", str(tmp_path / "out"), "--runs-root", str(tmp_path / "runs"),
            "--no-progress", *flags]
    return study.study(argv)


@pytest.fixture(autouse=True)
def fresh_calls():
    CALLS.clear()


#################################################################################
#                                  Plans                                        #
#################################################################################

@pytest.mark.parametrize("change, field", [
    ({"kind": "video"}, "kind"),
    ({"seeds": []}, "seeds"),
    ({"seeds": [0, 0]}, "seeds"),
    ({"settings": {"clean": {"seeds": [1, 1]}}}, "settings.clean.seeds"),
    ({"baseline": "nope"}, "baseline"),
    ({"settings": {"clean": {}, "bad/name": {}}}, "settings.bad/name"),
    ({"settings": {"clean": {"kwarg": {}}}}, "settings.clean.kwarg"),
    ({"settings": {"clean": {"x": {"eta": "high"}}}}, "settings.clean.x"),
    ({"claims": [{"claim": "c", "metric": "m", "direction": "down", "a": "clean", "b": "cep-1"}]},
     "claims.0.direction"),
    ({"claims": [{"claim": "c", "metric": "m", "direction": "lower", "a": "clean", "b": "nope"}]}, "claims.0.b"),
    ({"evaluation": {}}, "evaluation"),
    ({"extra": 1}, "extra"),
])
def test_bad_gmm_plans_name_the_field(tmp_path, change, field):
    with pytest.raises(PlanError) as error:
        load_plan(write_plan(tmp_path, gmm_plan(**change)))
    assert error.value.field == field and str(error.value).startswith(f"{field}: ")


@pytest.mark.parametrize("change, field", [
    ({"settings": {"clean": {}, "cep-u": {}, "eta0.05": {"args": ["--corruption-ratio", "x"]}}},
     "settings.eta0.05.args"),
    ({"settings": {"clean": {"args": ["--seed", "3"]}, "cep-u": {}}}, "settings.clean.args"),
    ({"base": {"preset": "no-such-preset"}}, "base.preset"),
    ({"base": {"preset": "dit-tiny-digits", "nproc": 0}}, "base.nproc"),
    ({"evaluation": {"sampler": "euler", "steps": 2, "guidance": [1.0], "num_samples": 20}}, "evaluation.sampler"),
    ({"evaluation": {"sampler": "ddim", "steps": 2, "guidance": [1.0, 2.0], "num_samples": 20, "args": ["--bogus"]}},
     "evaluation.args"),
    ({"claims": [{"claim": "c", "metric": "fid@3.0", "direction": "lower", "a": "cep-u", "b": "clean"}]},
     "claims.0.metric"),
    ({"settings": {"clean": {}, "cep-u": {"args": ["--init-from", "{pre}"]}}}, "settings.cep-u.args"),
    ({"prerequisites": {"pre": {"module": "os"}}}, "prerequisites.pre.module"),
    ({"prerequisites": {"pre": {"module": "training.train", "args": ["--run-dir", "x"]}}}, "prerequisites.pre.args"),
])
def test_bad_image_plans_fail_before_running(tmp_path, capsys, change, field):
    with pytest.raises(SystemExit) as exit_:
        study.main([str(write_plan(tmp_path, image_plan(**change))), "--out", str(tmp_path / "out"), "--dry-run"])
    assert exit_.value.code == 2
    assert f"study: error: {field}: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_shards_cover_the_plan_disjointly_and_only_filters(tmp_path):
    runs = load_plan(write_plan(tmp_path, gmm_plan(seeds=list(range(7))))).runs()
    for count in (1, 2, 3, 5):
        shards = [select(runs, shard=(i, count)) for i in range(count)]
        assert sorted(map(str, sum(shards, []))) == sorted(map(str, runs))
        assert sum(map(len, shards)) == len(runs)
    assert {r.setting for r in select(runs, only=["cep-1"], shard=(1, 2))} == {"cep-1"}
    assert select(runs, only=["cep-1"], shard=(1, 2)) == [r for r in select(runs, shard=(1, 2)) if r.setting == "cep-1"]


#################################################################################
#                               Statistics                                      #
#################################################################################

def test_mean_interval_matches_scipy():
    values = np.random.default_rng(0).normal(3.0, 2.0, size=7)
    mean, interval = mean_interval(values)
    expected = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert mean == pytest.approx(values.mean()) and interval == pytest.approx(expected)
    assert mean_interval([2.5]) == (2.5, None) and mean_interval([]) == (None, None)


def test_paired_difference_matches_ttest_rel_on_shared_seeds():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=6), rng.normal(size=6)
    by_seed_a = dict(enumerate(a)) | {9: 100.0}          # seed 9 has no partner: left out
    by_seed_b = dict(enumerate(b)) | {3: None}           # seed 3 is missing in b: left out
    paired = paired_difference(by_seed_a, by_seed_b)
    keep = [0, 1, 2, 4, 5]
    expected = stats.ttest_rel(a[keep], b[keep]).confidence_interval(0.95)
    assert paired["seeds"] == keep
    assert paired["difference"] == pytest.approx((a[keep] - b[keep]).mean())
    assert paired["ci95"] == pytest.approx([expected.low, expected.high])


@pytest.mark.parametrize("interval, direction, expected", [
    ([-2.0, -0.5], "lower", "reproduced"), ([0.5, 2.0], "lower", "contradicted"), ([-1.0, 1.0], "lower", "inconclusive"),
    ([0.5, 2.0], "higher", "reproduced"), ([-2.0, -0.5], "higher", "contradicted"), ([0.0, 1.0], "higher", "inconclusive"),
    (None, "lower", "inconclusive"),
])
def test_verdict_rule(interval, direction, expected):
    assert verdict(direction, interval) == expected


def test_verdicts_on_constructed_runs(tmp_path):
    """Entropy rises with gamma (reproduced when claimed higher, contradicted when claimed lower); w2 does not move
    beyond seed noise (inconclusive); one pair only is inconclusive too."""
    claims = [{"claim": "up", "metric": "entropy", "direction": "higher", "a": "cep-1", "b": "clean",
               "paper": "Thm 1: +0.2 nats"},
              {"claim": "down", "metric": "entropy", "direction": "lower", "a": "cep-1", "b": "clean"},
              {"claim": "w2", "metric": "w2", "direction": "lower", "a": "cep-1", "b": "clean"}]
    summary = run_study(tmp_path, gmm_plan(claims=claims, seeds=[0, 1, 2, 3]))
    assert [c["verdict"] for c in summary["claims"]] == ["reproduced", "contradicted", "inconclusive"]
    assert summary["claims"][0]["difference"] == pytest.approx(1.0)
    assert "| up | Thm 1: +0.2 nats | `entropy` |" in (tmp_path / "out/fake/report.md").read_text()
    one_pair = run_study(tmp_path, gmm_plan(plan="one", claims=claims[:1], seeds=[0]))
    assert one_pair["claims"][0]["verdict"] == "inconclusive" and one_pair["claims"][0]["ci95"] is None


def test_a_setting_with_its_own_seeds_runs_them_and_pairs_the_shared_ones(tmp_path):
    plan = gmm_plan(seeds=[0, 1])
    plan["settings"]["cep-1"]["seeds"] = [0, 1, 2, 3]    # more seeds where the effect is small
    assert [run.name for run in load_plan(write_plan(tmp_path, plan)).runs()] == [
        "clean-seed0", "clean-seed1", "cep-0.5-seed0", "cep-0.5-seed1",
        "cep-1-seed0", "cep-1-seed1", "cep-1-seed2", "cep-1-seed3"]
    plan["settings"]["clean"]["seeds"] = [0, 1, 2]
    summary = run_study(tmp_path, plan)
    assert [setting["seeds"] for setting in summary["settings"]] == [[0, 1, 2], [0, 1], [0, 1, 2, 3]]
    assert len(summary["settings"][2]["metrics"]["entropy"]["values"]) == 4
    report = (tmp_path / "out/fake/report.md").read_text()
    assert "(seeds: 0, 1; clean: 0, 1, 2; cep-1: 0, 1, 2, 3;" in report


def test_summary_json_schema(tmp_path):
    summary = run_study(tmp_path, gmm_plan())
    assert summary == json.loads((tmp_path / "out/fake/summary.json").read_text())
    assert set(summary) == {"plan", "command", "machine", "wall_s", "settings", "claims"}
    assert summary["plan"] == "fake" and summary["command"].startswith(f"python -m evaluation.study {tmp_path}")
    records = [json.loads(p.read_text()) for p in (tmp_path / "out/fake/runs").glob("*.json")]
    assert summary["wall_s"] == pytest.approx(sum(r["wall_s"] for r in records))
    assert [s["name"] for s in summary["settings"]] == ["clean", "cep-0.5", "cep-1"]
    for setting in summary["settings"]:
        assert set(setting) == {"name", "seeds", "metrics"} and setting["seeds"] == [0, 1, 2]
        for entry in setting["metrics"].values():
            assert set(entry) == {"mean", "ci95", "values"} and len(entry["values"]) == 3
            assert entry["mean"] == pytest.approx(np.mean(entry["values"]))
            assert entry["ci95"][0] < entry["mean"] < entry["ci95"][1]
    for claim in summary["claims"]:
        assert set(claim) == {"claim", "metric", "direction", "a", "b", "paper", "difference", "ci95", "resolvable",
                              "verdict"}
        assert claim["resolvable"] == pytest.approx((claim["ci95"][1] - claim["ci95"][0]) / 2)
    report = (tmp_path / "out/fake/report.md").read_text()
    assert "Verdict rule" in report and "**reproduced**" in report and "entropy_vs_gamma.png" in report
    assert (tmp_path / "out/fake/entropy_vs_gamma.png").stat().st_size > 1000


#################################################################################
#                          Resume, skip, dry-run cost                           #
#################################################################################

def test_finished_runs_are_skipped_and_stale_ones_rerun(tmp_path):
    run_study(tmp_path, gmm_plan())
    assert len(CALLS) == 9
    run_study(tmp_path, gmm_plan())
    assert len(CALLS) == 9                               # a finished plan only re-aggregates
    (tmp_path / "out/fake/runs/cep-1-seed2.json").unlink()
    run_study(tmp_path, gmm_plan(), "--aggregate-only")
    assert len(CALLS) == 9
    summary = run_study(tmp_path, gmm_plan())
    assert CALLS[9:] == [(2, 1.0)]
    assert summary["settings"][2]["seeds"] == [0, 1, 2]
    changed = gmm_plan()
    changed["settings"]["cep-0.5"]["kwargs"]["gamma"] = 0.4   # its records no longer describe the setting
    run_study(tmp_path, changed)
    assert sorted(CALLS[10:]) == [(0, 0.4), (1, 0.4), (2, 0.4)]


def test_shards_and_only_run_their_part(tmp_path):
    run_study(tmp_path, gmm_plan(), "--shard", "1/2")
    assert len(CALLS) == 4
    run_study(tmp_path, gmm_plan(), "--only", "clean")
    assert sorted(CALLS[4:]) == [(0, 0.0), (2, 0.0)]   # clean seed 1 was in shard 1/2 already


def test_image_records_count_as_done_without_run_dirs(tmp_path, monkeypatch):
    """Records made elsewhere (no run dir here) are done: nothing is trained, the report is written from them."""
    plan = load_plan(write_plan(tmp_path, image_plan(seeds=[0, 1])))
    for index, run in enumerate(plan.runs()):
        record = {"setting": run.setting, "seed": run.seed, "spec": study.run_spec(plan, run),
                  "metrics": {"fid@1.0": 10.0 + index, "fid@2.0": 9.0 - (run.setting == "cep-u") - 0.1 * run.seed},
                  "wall_s": 100.0, "machine": "elsewhere", "commands": ["..."]}
        study.write_json(tmp_path / "out/tiny/runs" / f"{run.name}.json", record)
    monkeypatch.setattr(study_runners, "run_image", lambda *a: pytest.fail("a finished run was run again"))
    summary = run_study(tmp_path, image_plan(seeds=[0, 1]))
    assert not (tmp_path / "runs").exists() and summary["wall_s"] == 400.0 and summary["machine"] == "elsewhere"
    assert summary["claims"][0]["difference"] == pytest.approx(-1.0)
    assert (tmp_path / "out/tiny/fid_vs_guidance.png").is_file()
    report = (tmp_path / "out/tiny/report.md").read_text()   # each run's own values, in the plan's order
    runs = report[report.index("## Runs"):report.index("## Plots")]
    assert "| run | `fid@2.0` | `train_s` | `wall_s` |" in runs
    assert runs.index("| clean, seed 1 | 8.9 | - | 100 |") < runs.index("| cep-u, seed 0 | 8 | - | 100 |")


def test_stale_image_runs_run_again(tmp_path, monkeypatch):
    """A longer training makes the records stale: the runs go again (evaluate then remakes samples of the old
    weights, tests/test_sample.py)."""
    plan = load_plan(write_plan(tmp_path, image_plan()))
    for run in plan.runs():
        study.write_json(tmp_path / "out/tiny/runs" / f"{run.name}.json",
                         {"setting": run.setting, "seed": run.seed, "spec": study.run_spec(plan, run)})
    fake = {"metrics": {"fid@2.0": 1.0}, "commands": [], "wall_s": 1.0}
    ran = []
    monkeypatch.setattr(study_runners, "run_image", lambda plan, run, directory, _: ran.append(run.name) or fake)
    longer = image_plan()
    longer["base"]["args"] += ["--total-images", "64"]
    run_study(tmp_path, longer)
    assert ran == ["clean-seed0", "cep-u-seed0"]


def prerequisite_plan(**changes) -> dict:
    """image_plan with a micro pre-training `pre` that cep-u continues from (--init-from {pre})."""
    plan = image_plan(**changes)
    plan["prerequisites"] = {"pre": {"module": "training.train", "args": plan["base"]["args"] + [
        "--preset", "dit-tiny-digits", "--seed", "7"]}}
    plan["settings"]["cep-u"]["args"] = plan["settings"]["cep-u"]["args"] + ["--init-from", "{pre}"]
    return plan


def test_prerequisites_are_made_once_before_the_runs_that_name_them(tmp_path, monkeypatch, capsys):
    made, trained = [], []
    stats = {"loss": 0.5, "seconds": 1.0}
    monkeypatch.setattr(study_runners, "make_prerequisite", lambda plan, name, directory: made.append(
        (name, directory)) or {"command": "make", "wall_s": 2 * stats["seconds"], "final_stats": dict(stats), "run_dir": str(directory)})
    monkeypatch.setattr(study_runners, "run_image", lambda plan, run, directory, prerequisites: trained.append(
        (run.name, prerequisites)) or {"metrics": {"fid@2.0": 1.0}, "commands": [], "wall_s": 1.0})
    run_study(tmp_path, prerequisite_plan(seeds=[0, 1]), "--only", "clean")
    assert made == [] and len(trained) == 2                    # clean does not name `pre`
    run_study(tmp_path, prerequisite_plan(seeds=[0, 1]))
    directory = tmp_path / "runs/tiny/_prerequisites/pre"
    assert made == [("pre", directory)] and [name for name, _ in trained[2:]] == ["cep-u-seed0", "cep-u-seed1"]
    assert trained[-1][1] == {"pre": directory}
    record = json.loads((tmp_path / "out/tiny/runs/cep-u-seed0.json").read_text())
    assert record["spec"]["prerequisites"]["pre"]["args"][-1] == "7" and "{pre}" in record["spec"]["train"]
    assert "prerequisites" not in json.loads((tmp_path / "out/tiny/runs/clean-seed0.json").read_text())["spec"]
    assert "pre (2 s" in (tmp_path / "out/tiny/report.md").read_text()
    run_study(tmp_path, prerequisite_plan(seeds=[0, 1]))       # all done: nothing is made or trained again
    assert len(made) == 1 and len(trained) == 4
    changed = prerequisite_plan(seeds=[0, 1])
    changed["prerequisites"]["pre"]["args"][-1] = "8"          # a new prerequisite: the runs naming it are stale
    run_study(tmp_path, changed)
    assert len(made) == 2 and [name for name, _ in trained[4:]] == ["cep-u-seed0", "cep-u-seed1"]
    assert "warning" not in capsys.readouterr().err           # a changed spec is no re-make
    stats["seconds"] = 3.0                                     # a re-make (or resume) that differs in its wall time only
    run_study(tmp_path, changed | {"seeds": [0, 1, 2]})
    assert len(made) == 3 and "warning" not in capsys.readouterr().err
    assert json.loads((tmp_path / "out/tiny/prerequisites/pre.json").read_text())["wall_s"] == 2.0  # the making cost
    stats["loss"] = 0.6                                        # a re-make (another machine) that came out different
    run_study(tmp_path, changed | {"seeds": [0, 1, 2, 3]})
    assert "warning: prerequisite pre was re-made" in capsys.readouterr().err
    record = json.loads((tmp_path / "out/tiny/prerequisites/pre.json").read_text())
    assert record["previous_final_stats"] == {"loss": 0.5, "seconds": 1.0} and record["final_stats"]["loss"] == 0.6


def test_dry_run_cost_from_gmm_records(tmp_path, capsys):
    plan = load_plan(write_plan(tmp_path, gmm_plan()))
    walls = {"clean": [2.0, 4.0], "cep-0.5": [10.0]}
    for setting, values in walls.items():
        for seed, wall in enumerate(values):
            record = {"setting": setting, "seed": seed, "spec": study.run_spec(plan, study.Run(setting, seed)),
                      "metrics": {}, "wall_s": wall}
            study.write_json(tmp_path / "out/fake/runs" / f"{setting}-seed{seed}.json", record)
    assert run_study(tmp_path, gmm_plan(), "--dry-run") is None and CALLS == []
    out = capsys.readouterr().out
    # to do: clean seed 2 at its setting's mean 3 s, cep-0.5 seeds 1-2 at 10 s, cep-1 x 3 at the overall mean 16/3 s
    total = 3.0 + 2 * 10.0 + 3 * 16 / 3
    assert "clean-seed0    done" in out and f"6 of 9 runs to do, estimated {total:.0f} s" in out
    assert json.loads((tmp_path / "out/fake/dry_run.json").read_text())["estimated_s"] == pytest.approx(total)
    for part in (["--only", "clean"], ["--shard", "0/2"]):         # a part of the plan keeps the plan's cost
        run_study(tmp_path, gmm_plan(), "--dry-run", *part)
        assert json.loads((tmp_path / "out/fake/dry_run.json").read_text())["estimated_s"] == pytest.approx(total)


def test_dry_run_calibrates_gmm_with_one_unrecorded_run(tmp_path, capsys):
    run_study(tmp_path, gmm_plan(), "--dry-run")
    assert CALLS == [(0, 0.0)] and not (tmp_path / "out/fake/runs").exists()
    assert "calibration: one timed run (clean-seed0" in capsys.readouterr().out


def test_dry_run_cost_from_image_records(tmp_path, capsys):
    plan = load_plan(write_plan(tmp_path, image_plan(seeds=[0, 1])))
    record = {"setting": "clean", "seed": 0, "spec": study.run_spec(plan, study.Run("clean", 0)), "metrics": {},
              "wall_s": 30.0, "images_per_second": 4.0, "total_images": 32, "train_s": 10.0, "evaluate_s": 20.0,
              "evaluate_per_sample_s": 0.5, "num_samples": 20}
    study.write_json(tmp_path / "out/tiny/runs/clean-seed0.json", record)
    run_study(tmp_path, image_plan(seeds=[0, 1]), "--dry-run")
    # start-up 10 - 32/4 = 2 s, training 32/4 = 8 s, evaluation fixed 20 - 0.5*20 = 10 s + 0.5 s x 20 images
    assert "3 of 4 runs to do, estimated 90 s" in capsys.readouterr().out


def test_dry_run_cost_is_unknown_before_the_baselines_prerequisite_is_made(tmp_path, capsys):
    plan = prerequisite_plan() | {"baseline": "cep-u", "claims": []}      # calibrating needs `pre`, never made
    run_study(tmp_path, plan, "--dry-run")
    out = capsys.readouterr().out
    assert "2 of 2 runs to do, cost unknown" in out and "calibrating needs prerequisite pre" in out
    assert json.loads((tmp_path / "out/tiny/dry_run.json").read_text())["estimated_s"] is None
    assert study_report.dry_run_line(tmp_path / "out/tiny").startswith("unknown for 2 of 2 runs")


def test_failures_name_the_job_and_write_no_record(tmp_path):
    with pytest.raises(TypeError, match="test_study:bad_runner must return dict"):
        run_study(tmp_path, gmm_plan(runner="test_study:bad_runner"))
    log = tmp_path / "job.log"
    job = [sys.executable, "-c", "import sys; print('out of data'); sys.exit(3)"]
    with pytest.raises(study_runners.RunFailed, match="(?s)failed with exit code 3.*out of data"):
        study_runners.execute(job, {}, log)
    assert not (tmp_path / "out/fake/runs").exists() and log.read_text().startswith("$ python -c")


#################################################################################
#                               Image plan, end to end                          #
#################################################################################

@pytest.mark.slow
def test_tiny_image_plan_end_to_end(tmp_path):
    """One micro DiT run (32 training images, CEP-U) continued from a micro prerequisite, evaluated with 20 samples at
    two scales, through the CLI."""
    plan = prerequisite_plan()
    plan |= {"settings": {"cep-u": plan["settings"]["cep-u"]}, "baseline": "cep-u", "claims": []}
    plan["evaluation"]["args"] += ["--cache-dir", str(tmp_path / "cache")]
    summary = run_study(tmp_path, plan)
    record = json.loads((tmp_path / "out/tiny/runs/cep-u-seed0.json").read_text())
    assert record["commands"][0].startswith("python -m training.train --preset dit-tiny-digits")
    assert "--cep uniform" in record["commands"][0] and "--seed 0" in record["commands"][0]
    assert f"--init-from {tmp_path}/runs/tiny/_prerequisites/pre " in record["commands"][0]
    prerequisite = json.loads((tmp_path / "out/tiny/prerequisites/pre.json").read_text())
    assert prerequisite["final_stats"]["images_seen"] == 32 and "--seed 7" in prerequisite["command"]
    assert record["commands"][1].startswith("python -m evaluation.evaluate --run-dir")
    assert math.isfinite(record["metrics"]["fid@2.0"]) and 0 <= record["metrics"]["label_agreement@1.0"] <= 1
    assert record["images_per_second"] > 0 and record["total_images"] == 32
    ticks = [json.loads(line) for line in (tmp_path / "runs/tiny/cep-u/seed0/stats.jsonl").read_text().splitlines()]
    assert record["metrics"]["cep_noise_ratio_last"] == ticks[-1]["cep_noise_ratio"] > 0   # CEP's relative strength
    assert record["wall_s"] == pytest.approx(record["train_s"] + record["evaluate_s"])
    run_dir = tmp_path / "runs/tiny/cep-u/seed0"
    assert (run_dir / "ema.safetensors").is_file() and len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert summary["settings"][0]["metrics"]["fid@1.0"]["values"] == [record["metrics"]["fid@1.0"]]
    assert (tmp_path / "out/tiny/report.md").is_file()
    # A new evaluation spec makes the record stale; the finished run dir is resumed, not retrained, so the record
    # keeps the training cost recorded before and adds the new evaluation's.
    plan["evaluation"]["args"] += ["--entropy-temperature", "2"]
    run_study(tmp_path, plan)
    again = json.loads((tmp_path / "out/tiny/runs/cep-u-seed0.json").read_text())
    assert record["images_trained"] == 32 and again["images_trained"] == 0 and again["reevaluated"]
    assert again["train_s"] == record["train_s"] and again["evaluate_s"] != record["evaluate_s"]
    assert again["wall_s"] == pytest.approx(record["train_s"] + again["evaluate_s"])
    assert "--entropy-temperature 2" in again["commands"][1]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("configs/studies/*.json")),
                         ids=lambda path: path.stem)
def test_every_shipped_plan_loads_and_builds_each_setting(path):
    plan = load_plan(path)
    if plan.kind == "image":   # a training config per setting: presets, flags and --set keys all resolve
        configs = {setting: study_runners.image_config(plan, setting) for setting in plan.settings}
        assert len({json.dumps(config, sort_keys=True) for config in configs.values()}) == len(configs)
