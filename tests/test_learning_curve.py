"""evaluation.learning_curve: staged training + evaluation of one plan run, resumable from its record, with weights at
each stage equal to a run trained straight to that many images."""
import json

import pytest
from safetensors.torch import load_file

from evaluation import learning_curve, study_runners
from evaluation.study_plan import load_plan
from test_study import image_plan, write_plan
from training.train import parse_args, train


def curve(tmp_path, plan: dict, *flags) -> dict:
    return learning_curve.learning_curve([str(write_plan(tmp_path, plan)), "--out", str(tmp_path / "out"),
                                          "--runs-root", str(tmp_path / "runs"), "--num-samples", "20", *flags])


@pytest.mark.slow
def test_stages_resume_and_match_a_straight_run(tmp_path, monkeypatch, capsys):
    plan = image_plan()
    plan["evaluation"]["args"] += ["--cache-dir", str(tmp_path / "cache")]
    record = curve(tmp_path, plan, "--at", "32", "64", "--guidance", "1.0", "3.0")   # not the plan's [1, 2]
    assert [p["images"] for p in record["points"]] == [32, 64] == [p["at"] for p in record["points"]]
    assert all(0 <= p["metrics"]["label_agreement@1.0"] <= 1 and "fid@3.0" in p["metrics"] for p in record["points"])
    assert "--total-images 64" in record["points"][1]["commands"][0]
    saved = json.loads((tmp_path / "out/tiny/curves/clean-seed0.json").read_text())
    assert saved["points"] == record["points"] and (tmp_path / "out/tiny/curves/clean-seed0.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| 64 |" in printed and all(0 < p["classifier_accuracy"] <= 1 for p in record["points"])
    assert f"held-out accuracy (the label agreement of real images): {record['points'][-1]['classifier_accuracy']:.3f}" \
        in printed

    straight = tmp_path / "straight"     # the same run trained to 64 images at once
    config, _, _ = parse_args([*study_runners.train_args(load_plan(write_plan(tmp_path, plan)), "clean"), "--run-dir",
                               str(straight), "--seed", "0", "--no-progress", "--total-images", "64"])
    train(config, straight, progress=False)
    staged, direct = load_file(tmp_path / "runs/tiny/_curves/clean/seed0/ema.safetensors"), load_file(
        straight / "ema.safetensors")
    assert staged.keys() == direct.keys() and all((staged[k] == direct[k]).all() for k in staged)

    with pytest.raises(learning_curve.PlanError, match="--at: .* trained past 16 images"):
        curve(tmp_path, plan, "--at", "16", "32", "64", "--guidance", "1.0", "3.0")
    monkeypatch.setattr(study_runners, "execute", lambda *a: pytest.fail("a finished stage ran again"))
    again = curve(tmp_path, plan, "--at", "32", "64", "--guidance", "1.0", "3.0")
    assert again["points"] == record["points"]


@pytest.mark.parametrize("flags, field", [(["--at", "64", "32"], "--at"), (["--at", "0"], "--at"),
                                          (["--at", "32", "--setting", "nope"], "--setting"),
                                          (["--at", "32", "--main-scale", "3.0"], "--main-scale"),
                                          (["--at", "32", "--variant", "lr"], "--variant"),
                                          (["--at", "32", "--variant", "a/b", "--variant-args", "--lr 2"], "--variant"),
                                          (["--at", "32", "--variant", "lr", "--variant-args", " "], "--variant-args"),
                                          (["--at", "32", "--variant", "lr", "--variant-args", "--lr x"],
                                           "--variant-args")])
def test_bad_arguments_name_the_flag(tmp_path, capsys, flags, field):
    with pytest.raises(SystemExit) as exit_:
        learning_curve.main([str(write_plan(tmp_path, image_plan())), "--out", str(tmp_path / "out"), *flags])
    assert exit_.value.code == 2 and f"learning_curve: error: {field}: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_learned_at_is_the_first_stage_over_the_bar():
    points = [{"images": n, "metrics": {"label_agreement@1.0": a}} for n, a in [(1, 0.2), (2, 0.91), (3, 0.89)]]
    assert learning_curve.learned_at(points, 1.0) == 2 and learning_curve.learned_at(points[:1], 1.0) is None


def test_the_plan_report_shows_its_curves(tmp_path):
    from evaluation import study
    from evaluation.study_report import curves_section
    point = {"images": 64, "classifier_accuracy": 0.962, "metrics": {"label_agreement@1.0": 0.93, "fid@1.0": 2.5}}
    study.write_json(tmp_path / "curves/clean-seed0.json", {"points": [point], "learned_at": 64, "main_scale": 1.0})
    section = "\n".join(curves_section(tmp_path))
    assert "| 64 | 0.93 | 2.5 |" in section and "real images score 0.962" in section


def test_a_variant_has_its_own_flags_record_and_run_dir(tmp_path, monkeypatch):
    seen = []

    def stage(plan, run, run_dir, images, *rest):
        seen.append((run, run_dir, study_runners.train_args(plan, run.setting)))
        return {"at": images, "images": images, "metrics": {"label_agreement@1.0": 0.5}}
    monkeypatch.setattr(learning_curve, "stage", stage)
    record = curve(tmp_path, image_plan(), "--at", "32", "--variant", "lr2", "--variant-args",
                   "--lr 2e-3 --set model.depth=1")
    (run, run_dir, args), = seen
    assert run.setting == record["setting"] == "clean+lr2" and run_dir == tmp_path / "runs/tiny/_curves/clean+lr2/seed0"
    assert args[-4:] == ["--lr", "2e-3", "--set", "model.depth=1"] and record["spec"]["train"] == args
    assert (tmp_path / "out/tiny/curves/clean+lr2-seed0.json").is_file()
    assert not (tmp_path / "out/tiny/curves/clean-seed0.json").exists()
