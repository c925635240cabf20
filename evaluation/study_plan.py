"""Study plans (configs/studies/<plan>.json, format in configs/studies/README.md): loading, validation with errors
that name the field, and the deterministic list of (setting, seed) runs that --only and --shard split."""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from models.diffusion import SAMPLERS

KINDS = ("image", "gmm")
DIRECTIONS = ("lower", "higher")
DEFAULT_RUNNERS = {"gmm": "gmm_theory.bridge:run"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")    # plan and setting names become file names
PLAN_KEYS = {"plan", "kind", "description", "base", "settings", "baseline", "seeds", "evaluation", "claims",
             "plot_metrics", "runner", "prerequisites"}
SETTING_KEYS = {"image": {"args", "x", "series", "baseline", "description", "seeds"},
                "gmm": {"kwargs", "x", "series", "baseline", "description", "seeds"}}
RESERVED_FLAGS = ("--preset", "--run-dir", "--seed", "--no-progress")  # the harness sets these per run
EVALUATION_FLAGS = ("--run-dir", "--num-samples", "--guidance", "--sampler", "--steps", "--no-progress")
PREREQUISITE_MODULES = ("training.train", "training.train_autoencoder")
PREREQUISITE_FLAGS = ("--run-dir", "--no-progress")
REFERENCE = re.compile(r"\{([^{}]*)\}")    # "{name}" in a training flag = the run dir of prerequisite `name`


class PlanError(ValueError):
    """A plan that cannot run; str() is "<field>: <what is wrong>"."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Run:
    setting: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.setting}-seed{self.seed}"


@dataclass
class Plan:
    """A validated plan; the fields are the JSON fields ("plan" is `name`)."""
    path: Path
    name: str
    kind: str
    base: dict
    settings: dict
    baseline: str
    seeds: list
    claims: list
    runner: str | None = None
    evaluation: dict | None = None
    plot_metrics: list | None = None
    description: str = ""
    prerequisites: dict = field(default_factory=dict)

    def runs(self) -> list[Run]:
        """Every (setting, seed), settings in plan order, then seeds: the order shards and tables use."""
        return [Run(setting, seed) for setting in self.settings for seed in self.seeds_of(setting)]

    def seeds_of(self, setting: str) -> list:
        """The plan's seeds, or the setting's own (e.g. more seeds where a small effect needs a narrower interval;
        claims pair the seeds both settings have)."""
        return self.settings[setting].get("seeds", self.seeds)

    def baseline_of(self, setting: str) -> str:
        return self.settings[setting].get("baseline", self.baseline)

    def prerequisites_of(self, setting: str) -> list[str]:
        """The prerequisites a setting's training flags name, in plan order."""
        args = self.base.get("args", []) + self.settings[setting].get("args", [])
        named = {name for arg in args for name in REFERENCE.findall(arg)}
        return [name for name in self.prerequisites if name in named]


def load_plan(path) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise PlanError("plan", f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PlanError("plan", f"{path} is not valid JSON ({error})") from error
    validate(data)
    data["name"] = data.pop("plan")
    return Plan(path, **data)


def validate(data: dict) -> None:
    """Raises PlanError naming the first bad field; fills in defaults (runner, base.args, base.nproc)."""
    expect(isinstance(data, dict), "plan", "must be a JSON object")
    known_fields("", data, PLAN_KEYS)
    for key in ("plan", "kind", "base", "settings", "baseline", "seeds"):
        expect(key in data, key, "is required")
    expect(isinstance(data["plan"], str) and NAME.match(data["plan"]), "plan",
           f"must be a name of letters, digits, '.', '_', '+', '-', got {data['plan']!r}")
    expect(data["kind"] in KINDS, "kind", f"must be one of {KINDS}, got {data['kind']!r}")
    kind = data["kind"]
    expect(isinstance(data.get("description", ""), str), "description", "must be a string")
    expect(isinstance(data["base"], dict), "base", "must be an object")
    runner = data.setdefault("runner", DEFAULT_RUNNERS.get(kind))
    expect(runner is None or (isinstance(runner, str) and re.match(r"^[\w.]+:\w+$", runner)), "runner",
           f"must be 'module:function', got {runner!r}")
    expect(kind == "gmm" or runner is None, "runner", "image plans always run training.train + evaluation.evaluate")
    expect(isinstance(data["settings"], dict) and data["settings"], "settings", "must be a non-empty object")
    for name, setting in data["settings"].items():
        validate_setting(name, setting, kind, data["settings"])
    expect(data["baseline"] in data["settings"], "baseline", f"{data['baseline']!r} is not a setting")
    validate_seeds("seeds", data["seeds"])
    if kind == "image":
        validate_image_base(data["base"])
        validate_evaluation(data.get("evaluation"))
        validate_prerequisites(data.setdefault("prerequisites", {}))
        for where, args in [("base.args", data["base"]["args"])] + [
                (f"settings.{name}.args", setting.get("args", [])) for name, setting in data["settings"].items()]:
            for reference in {name for arg in args for name in REFERENCE.findall(arg)}:
                expect(reference in data["prerequisites"], where,
                       f"{{{reference}}} names no prerequisite; known: {sorted(data['prerequisites'])}")
    else:
        expect("evaluation" not in data, "evaluation", "only image plans have one (a gmm runner measures itself)")
        expect("prerequisites" not in data, "prerequisites", "only image plans have them")
    guidance = data["evaluation"]["guidance"] if kind == "image" else None
    claims = data.setdefault("claims", [])
    expect(isinstance(claims, list), "claims", "must be a list")
    for i, claim in enumerate(claims):
        validate_claim(f"claims.{i}", claim, data["settings"], guidance)
    plot_metrics = data.get("plot_metrics", [])
    expect(isinstance(plot_metrics, list) and all(isinstance(m, str) and m for m in plot_metrics), "plot_metrics",
           "must be a list of metric names")


def validate_seeds(field: str, seeds) -> None:
    expect(isinstance(seeds, list) and seeds and all(is_int(s) and s >= 0 for s in seeds), field,
           f"must be a non-empty list of integers >= 0, got {seeds!r}")
    expect(len(set(seeds)) == len(seeds), field, "must not repeat a seed")


def validate_setting(name, setting, kind: str, settings: dict) -> None:
    field = f"settings.{name}"
    expect(isinstance(name, str) and NAME.match(name), field,
           "a setting name must be letters, digits, '.', '_', '+', '-' (it names files)")
    expect(isinstance(setting, dict), field, "must be an object")
    known_fields(f"{field}.", setting, SETTING_KEYS[kind])
    if kind == "image":
        check_args(f"{field}.args", setting.get("args", []), RESERVED_FLAGS)
    else:
        expect(isinstance(setting.get("kwargs", {}), dict), f"{field}.kwargs", "must be an object")
    x = setting.get("x", {})
    expect(isinstance(x, dict) and len(x) <= 1 and all(is_number(v) for v in x.values()), f"{field}.x",
           f'must be one {{"<axis>": <number>}}, e.g. {{"eta": 0.05}}, got {x!r}')
    expect(isinstance(setting.get("series", ""), str), f"{field}.series", "must be a string")
    if "baseline" in setting:
        expect(setting["baseline"] in settings, f"{field}.baseline", f"{setting['baseline']!r} is not a setting")
    if "seeds" in setting:
        validate_seeds(f"{field}.seeds", setting["seeds"])


def validate_image_base(base: dict) -> None:
    known_fields("base.", base, {"preset", "args", "nproc"})
    expect(isinstance(base.get("preset"), str) and base["preset"], "base.preset", "must name a preset (configs/)")
    check_args("base.args", base.setdefault("args", []), RESERVED_FLAGS)
    nproc = base.setdefault("nproc", 1)
    expect(is_int(nproc) and nproc >= 1, "base.nproc", f"must be an integer >= 1, got {nproc!r}")


def validate_prerequisites(prerequisites) -> None:
    """name -> {module, args, nproc}: runs made once per machine before the plan's runs that name them."""
    expect(isinstance(prerequisites, dict), "prerequisites", "must be an object: name -> {module, args, nproc}")
    for name, prerequisite in prerequisites.items():
        field_ = f"prerequisites.{name}"
        expect(NAME.match(name), field_, "a prerequisite name must be letters, digits, '.', '_', '+', '-'")
        expect(isinstance(prerequisite, dict), field_, "must be an object")
        known_fields(f"{field_}.", prerequisite, {"module", "args", "nproc", "description"})
        expect(prerequisite.get("module") in PREREQUISITE_MODULES, f"{field_}.module",
               f"must be one of {PREREQUISITE_MODULES}, got {prerequisite.get('module')!r}")
        check_args(f"{field_}.args", prerequisite.setdefault("args", []), PREREQUISITE_FLAGS)
        nproc = prerequisite.setdefault("nproc", 1)
        expect(is_int(nproc) and nproc >= 1, f"{field_}.nproc", f"must be an integer >= 1, got {nproc!r}")


def validate_evaluation(evaluation) -> None:
    expect(isinstance(evaluation, dict), "evaluation", "image plans need {sampler, steps, guidance, num_samples}")
    known_fields("evaluation.", evaluation, {"sampler", "steps", "guidance", "num_samples", "args"})
    for key in ("sampler", "steps", "guidance", "num_samples"):
        expect(key in evaluation, f"evaluation.{key}", "is required")
    expect(evaluation["sampler"] in SAMPLERS, "evaluation.sampler", f"must be one of {SAMPLERS}")
    expect(is_int(evaluation["steps"]) and evaluation["steps"] >= 1, "evaluation.steps", "must be an integer >= 1")
    guidance = evaluation["guidance"]
    expect(isinstance(guidance, list) and guidance and all(is_number(s) and s >= 0 for s in guidance)
           and len(set(guidance)) == len(guidance), "evaluation.guidance",
           f"must be a non-empty list of distinct scales >= 0, got {guidance!r}")
    expect(is_int(evaluation["num_samples"]) and evaluation["num_samples"] >= 2, "evaluation.num_samples",
           "must be an integer >= 2")
    check_args("evaluation.args", evaluation.setdefault("args", []), EVALUATION_FLAGS)


def validate_claim(field: str, claim, settings: dict, guidance) -> None:
    expect(isinstance(claim, dict), field, "must be an object")
    for key in ("claim", "metric", "direction", "a", "b"):
        expect(isinstance(claim.get(key), str) and claim[key], f"{field}.{key}", "is required (a string)")
    known_fields(f"{field}.", claim, {"claim", "metric", "direction", "a", "b", "paper"})
    expect(isinstance(claim.get("paper", ""), str), f"{field}.paper", "must be a string (the paper's numbers)")
    expect(claim["direction"] in DIRECTIONS, f"{field}.direction", f"must be one of {DIRECTIONS}")
    for key in ("a", "b"):
        expect(claim[key] in settings, f"{field}.{key}", f"{claim[key]!r} is not a setting")
    expect(claim["a"] != claim["b"], f"{field}.b", "must differ from a")
    if guidance is not None:
        _, at, scale = claim["metric"].rpartition("@")
        expect(at and is_float(scale) and float(scale) in [float(s) for s in guidance], f"{field}.metric",
               f"image metrics are '<metric>@<scale>' with a scale of evaluation.guidance, got {claim['metric']!r}")


def check_args(field: str, args, reserved) -> None:
    expect(isinstance(args, list) and all(isinstance(a, str) for a in args), field, "must be a list of strings")
    for flag in reserved:
        expect(not any(a == flag or a.startswith(flag + "=") for a in args), field,
               f"{flag} is set by the study itself")


def select(runs: list[Run], only=None, shard=None) -> list[Run]:
    """Shard (i, n) keeps every n-th run starting at i (0-based) of the full plan list, so a run's shard does not
    depend on --only; --only then keeps the named settings."""
    if shard is not None:
        index, count = shard
        runs = [run for position, run in enumerate(runs) if position % count == index]
    if only:
        runs = [run for run in runs if run.setting in only]
    return runs


def known_fields(prefix: str, given: dict, allowed: set) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise PlanError(prefix + unknown[0], f"unknown field; expected one of {sorted(allowed)}")


def expect(condition, field: str, message: str) -> None:
    if not condition:
        raise PlanError(field, message)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
