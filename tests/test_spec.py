"""Tests for autoprune.search.spec and autoprune.search.space: validation, overrides, sampling."""
from __future__ import annotations

import dataclasses
import glob
import math
import os
import textwrap

import optuna
import pytest

from autoprune.engine.allocate import AllocationConfig
from autoprune.errors import SpecError
from autoprune.methods import get_method
from autoprune.search.space import Range, suggest, to_prune_args
from autoprune.search.spec import SearchSpec, dump_spec, load_spec
from autoprune.search.validate import parse_time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINIMAL = "model: small_cnn\ndata: digits\nspace: {method: [l1, lrf]}\n"
FULL = """
study: demo
model: small_cnn
data: {name: digits, seed: 1}
constraints: {min_val_acc: 0.8}
budget: {max_trials: 7, time: 4m}
allocation: {min_ratio: 0.1}
space:
  method: [resrep, lrf, fsm, l1]
  target: {low: 0.2, high: 0.8}
  allocation: [uniform, global, searched]
  buckets: 3
  log_ratio: {low: -1, high: 1}
  residual: {low: -0.5, high: 1}
  epochs: {low: 1, high: 3}
  lr: {low: 0.005, high: 0.05, log: true}
  methods:
    resrep: {penalty: {low: 1.0e-5, high: 1e-3, log: true}, mask_interval: [10, 20]}
    lrf: {compensate: [true, false]}
    fsm: {compensation: [gaussian, measured]}
"""

optuna.logging.set_verbosity(optuna.logging.WARNING)


def write(tmp_path, text: str, name: str = "spec.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_minimal_spec_gets_defaults(tmp_path):
    spec = load_spec(write(tmp_path, MINIMAL, "mini.yaml"))
    assert spec.study == "mini" and spec.model == "small_cnn" and spec.data.name == "digits"
    assert spec.objectives == ("val_acc", "macs") and spec.sampler == "tpe" and spec.workers == 1
    assert spec.budget.max_trials == 20 and spec.budget.time_s is None  # a default budget so it terminates
    assert spec.space["method"] == ["l1", "lrf"]
    assert isinstance(spec.space["target"], Range) and 0 < spec.space["target"].low < spec.space["target"].high <= 1
    assert set(spec.method_space) == {"l1", "lrf"}
    lrf_fields = {f.name for f in dataclasses.fields(get_method("lrf").Params)}
    assert set(spec.method_space["lrf"]) == lrf_fields  # every default filled in
    assert spec.allocation == {f.name: getattr(AllocationConfig(), f.name) for f in dataclasses.fields(AllocationConfig)
                               if f.name not in ("mode", "multipliers", "residual_multiplier")}


def test_full_spec_parses_forms(tmp_path):
    spec = load_spec(write(tmp_path, FULL))
    assert spec.study == "demo" and spec.data.seed == 1 and spec.min_val_acc == 0.8
    assert spec.budget == dataclasses.replace(spec.budget, max_trials=7, time_s=240.0)
    assert spec.space["epochs"] == Range(1, 3, integer=True)
    assert spec.space["lr"] == Range(0.005, 0.05, log=True)
    assert spec.method_space["resrep"]["penalty"] == Range(1e-5, 1e-3, log=True)  # "1e-3" (a YAML string) accepted
    assert spec.method_space["resrep"]["mask_interval"] == [10, 20]
    assert spec.method_space["lrf"]["compensate"] == [True, False]
    assert spec.allocation["min_ratio"] == 0.1


def test_dump_then_load_is_identical(tmp_path):
    spec = load_spec(write(tmp_path, FULL))
    out = tmp_path / "results" / "spec.yaml"
    dump_spec(spec, out)
    again = load_spec(out)
    assert dataclasses.replace(again, source=spec.source) == spec
    assert isinstance(spec.to_dict()["space"]["target"], dict)


BAD = [  # (yaml appended to a valid spec, key path named in the error)
    ("space: {methods: {resrep: {penaltyy: 1}}}", "space.methods.resrep.penaltyy"),
    ("space: {methods: {l1: {anything: 1}}}", "space.methods.l1.anything"),
    ("space: {methods: {lrf: {compensate: 3}}}", "space.methods.lrf.compensate"),
    ("space: {methods: {fsm: {compensation: [gaussian, mesured]}}}", "space.methods.fsm.compensation[1]"),
    ("space: {methods: {resrep: {train_share: 1.5}}}", "space.methods.resrep.train_share"),
    ("space: {methods: {resrep: {penalty: {low: 0, high: 1.0e-3, log: true}}}}", "space.methods.resrep.penalty.low"),
    ("space: {methods: {resrepp: {}}}", "space.methods.resrepp"),
    ("space: {method: [resrepp]}", "space.method[0]"),
    ("space: {method: []}", "space.method"),
    ("space: {allocation: []}", "space.allocation"),
    ("space: {allocation: [global, global]}", "space.allocation"),
    ("space: {allocation: greedy}", "space.allocation"),
    ("space: {target: 1.5}", "space.target"),
    ("space: {target: 0}", "space.target"),
    ("space: {target: {low: 0.8, high: 0.2}}", "space.target"),
    ("space: {target: {low: 0.2, high: 1.2}}", "space.target.high"),
    ("space: {target: {low: 0.2}}", "space.target.high"),
    ("space: {target: {low: 0.2, high: 0.5, lgo: true}}", "space.target.lgo"),
    ("space: {epochs: 2.5}", "space.epochs"),
    ("space: {epochs: three}", "space.epochs"),
    ("space: {buckets: [2, 3]}", "space.buckets"),
    ("space: {multiplier: {low: 0.5, high: 1.5}}", "space.multiplier"),
    ("space: {log_ratio: {low: -9, high: 1}}", "space.log_ratio.low"),
    ("space: {lr: {low: 0.1, high: 0.2, log: true, step: 0.01}}", "space.lr.step"),
    ("space: {lrr: 0.1}", "space.lrr"),
    ("model: resnet21", "model"),
    ("model: torchvision:resnet5000", "model"),
    ("data: cifar11", "data.name"),
    ("data: {name: digits, sed: 1}", "data.sed"),
    ("data: {name: digits, val_fraction: 0.9, test_fraction: 0.5}", "data"),
    ("sampler: cmaes", "sampler"),
    ("objectives: [val_acc, flops]", "objectives"),
    ("objectives: [macs, val_acc]", "objectives"),
    ("budget: {time: 4x}", "budget.time"),
    ("budget: {max_trials: 0}", "budget.max_trials"),
    ("budget: {max_trial: 3}", "budget.max_trial"),
    ("constraints: {min_val_acc: 80}", "constraints.min_val_acc"),
    ("constraints: {max_flops: 0.5}", "constraints.max_flops"),
    ("early_stop: {margin: -0.1}", "early_stop.margin"),
    ("early_stop: {enabled: yes please}", "early_stop.enabled"),
    ("allocation: {min_ratio: 2}", "allocation.min_ratio"),
    ("allocation: {mode: global}", "allocation.mode"),
    ("workers: 0", "workers"),
    ("device: gpu", "device"),
    ("study: 'a/b'", "study"),
    ("base: no/such/base.pt", "base"),
    ("foo: 1", "foo"),
]


@pytest.mark.parametrize("extra, key", BAD, ids=[k for _, k in BAD])
def test_bad_spec_names_file_and_key(tmp_path, extra, key):
    base = {"model": "model: small_cnn", "data": "data: digits", "space": "space: {method: [l1]}"}
    top = extra.split(":")[0]
    lines = [v for k, v in base.items() if k != top] + [extra]
    path = write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: {key}: "), msg
    assert "\n" not in msg


def test_unknown_parameter_message_lists_the_method_params(tmp_path):
    path = write(tmp_path, "model: small_cnn\ndata: digits\nspace: {methods: {resrep: {penaltyy: 1}}}\n")
    with pytest.raises(SpecError, match=r"unknown parameter; did you mean 'penalty'\? resrep has: penalty, "):
        load_spec(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match=r"nope\.yaml: spec file not found"):
        load_spec(tmp_path / "nope.yaml")
    path = write(tmp_path, "model: [small_cnn\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)
    with pytest.raises(SpecError, match="model: missing"):
        load_spec(write(tmp_path, "data: digits\n"))


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400),
                                           ("1h 30m 15s", 5415), ("1.5h", 5400), ("1d", 86400), (45, 45),
                                           ("120", 120), (2.5, 2.5)])
def test_parse_time(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "4x", "1h30", "-5m", 0, True, "1 hour"])
def test_parse_time_rejects(text):
    with pytest.raises(ValueError):
        parse_time(text)


def test_overrides_replace_spec_values(tmp_path):
    path = write(tmp_path, FULL)
    spec = load_spec(path, {"max_trials": 8, "time_s": 60, "workers": 2, "seed": 5, "device": "cpu",
                            "early_stop": False, "sampler": "nsga2", "device_hours": None})
    assert spec.budget.max_trials == 8 and spec.budget.time_s == 60.0
    assert (spec.workers, spec.seed, spec.device, spec.sampler) == (2, 5, "cpu", "nsga2")
    assert spec.early_stop.enabled is False and spec.early_stop.margin is None
    assert load_spec(path, {"time": "1h30m"}).budget.time_s == 5400.0
    untouched = load_spec(path, {"max_trials": None, "workers": None})
    assert untouched.budget.max_trials == 7 and untouched.workers == 1


def test_bad_override_is_named(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(SpecError, match=r"^override workers \(workers\): must be >= 1"):
        load_spec(path, {"workers": 0})
    with pytest.raises(SpecError, match=r"override time_s \(budget.time\)"):
        load_spec(path, {"time_s": "soon"})
    with pytest.raises(SpecError, match="override 'flops' is unknown"):
        load_spec(path, {"flops": 1})


def test_paths_are_relative_to_the_spec_file(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "base.pt").write_bytes(b"x")
    sub = tmp_path / "specs"
    sub.mkdir()
    path = write(sub, MINIMAL + "base: ../ckpt/base.pt\n")
    spec = load_spec(path)
    assert spec.base == str(tmp_path / "ckpt" / "base.pt")
    spec = load_spec(write(sub, MINIMAL.replace("data: digits", "data: imagefolder:../imgs")))
    assert spec.data.name == "imagefolder:" + str(tmp_path / "imgs")


SHIPPED = sorted(glob.glob(os.path.join(REPO, "search_spaces", "*.yaml")))


def test_all_shipped_specs_are_there():
    names = {os.path.basename(p) for p in SHIPPED}
    assert {"digits_demo.yaml", "smoke.yaml", "resnet56_cifar10.yaml", "resnet20_cifar10.yaml",
            "mobilenetv2_cifar10.yaml", "resnet50_imagenet.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[os.path.basename(p) for p in SHIPPED])
def test_shipped_spec_loads(path, tmp_path):
    spec = load_spec(path)
    assert spec.study == os.path.splitext(os.path.basename(path))[0]
    dump_spec(spec, tmp_path / "spec.yaml")
    assert dataclasses.replace(load_spec(tmp_path / "spec.yaml"), source=spec.source) == spec


def test_demo_spec_searches_every_method():
    spec = load_spec(os.path.join(REPO, "search_spaces", "digits_demo.yaml"))
    assert set(spec.methods) == {"resrep", "lrf", "fsm", "l1"}
    assert spec.model == "small_cnn" and spec.data.name == "digits"


# --------------------------------------------------------------------------- suggest / to_prune_args


def _in(value, space) -> bool:
    if isinstance(space, Range):
        return space.low <= value <= space.high and (not space.integer or isinstance(value, int))
    if isinstance(space, list):
        return value in space
    return value == space


def _sample(spec: SearchSpec, n: int, seed: int = 0) -> list[tuple[dict, dict]]:
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        params = suggest(trial, spec)
        out.append((params, dict(trial.params)))
        study.tell(trial, [0.5, 0.5])
    return out


def test_suggest_stays_in_the_space_and_is_conditional(tmp_path):
    spec = load_spec(write(tmp_path, FULL))
    seen_methods, seen_alloc = set(), set()
    for params, optuna_params in _sample(spec, 40):
        method = params["method"]
        seen_methods.add(method)
        seen_alloc.add(params["allocation"])
        for key in ("method", "target", "allocation", "epochs", "lr", "batch_size"):
            assert _in(params[key], spec.space[key]), key
        mults = sorted(k for k in params if k.startswith("shape_"))
        if params["allocation"] == "searched":  # K-1 free log-ratios and the residual multiplier
            assert mults == ["shape_1", "shape_2", "shape_residual"]
            assert _in(params["shape_1"], spec.space["log_ratio"]) and _in(params["shape_2"], spec.space["log_ratio"])
            assert _in(params["shape_residual"], spec.space["residual"])
        else:
            assert mults == []
        own = set(spec.method_space[method])
        extra = set(params) - {"method", "target", "allocation", "epochs", "lr", "batch_size", *mults}
        assert extra == own  # exactly the chosen method's params, fixed ones included
        assert all(_in(params[p], spec.method_space[method][p]) for p in own)
        # Optuna sees only sampled values, method params under "<method>.<param>"
        assert {k for k in optuna_params if "." in k} <= {f"{method}.{p}" for p in own}
        assert "batch_size" not in optuna_params and "buckets" not in optuna_params
        if method == "resrep":
            assert "resrep.penalty" in optuna_params and "resrep.growth" not in optuna_params
    assert seen_methods == {"resrep", "lrf", "fsm", "l1"} and seen_alloc == {"uniform", "global", "searched"}


def test_suggest_is_deterministic_with_a_seeded_sampler(tmp_path):
    spec = load_spec(write(tmp_path, FULL))
    assert _sample(spec, 8, seed=3) == _sample(spec, 8, seed=3)
    assert _sample(spec, 8, seed=3) != _sample(spec, 8, seed=4)


def test_suggest_with_fixed_trial(tmp_path):
    spec = load_spec(write(tmp_path, FULL))
    fixed = {"method": "lrf", "target": 0.5, "allocation": "searched", "shape_1": -0.5, "shape_2": 0.5,
             "shape_residual": 1.0, "epochs": 2, "lr": 0.01, "lrf.compensate": False}
    params = suggest(optuna.trial.FixedTrial(fixed), spec)
    assert params["compensate"] is False and params["shape_1"] == -0.5 and params["eps"] == 1e-3
    alloc = to_prune_args(params, spec.allocation)[2]
    assert alloc.multipliers == pytest.approx((1.0, 2 ** -0.5, 2 ** 0.5)) and alloc.residual_multiplier == 2.0


def test_to_prune_args_from_suggest_and_from_a_csv_row(tmp_path):
    spec = load_spec(write(tmp_path, FULL))
    params = {"method": "resrep", "target": 0.4, "allocation": "searched", "mult_0": 0.5, "mult_1": 1.0,
              "mult_2": 1.5, "epochs": 3, "lr": 0.02, "batch_size": 128, "penalty": 1e-4, "mask_interval": 10}
    # (an older study's trial: one multiplier per bucket, still readable)
    method, target, alloc, mparams, epochs, lr = to_prune_args(params, spec.allocation)
    assert (method, target, epochs, lr) == ("resrep", 0.4, 3, 0.02)
    assert alloc.mode == "searched" and alloc.multipliers == (0.5, 1.0, 1.5) and alloc.min_ratio == 0.1
    assert mparams == {"penalty": 1e-4, "mask_interval": 10}
    row = {"number": 4, "state": "complete", "method": "lrf", "target": 0.3, "allocation": "global", "epochs": 2.0,
           "lr": 0.01, "param_batch_size": 64, "param_penalty": math.nan, "param_compensate": "False",
           "param_eps": 0.002, "param_mult_0": math.nan, "val_acc": 0.9, "macs": 1000, "feasible": True}
    method, target, alloc, mparams, epochs, lr = to_prune_args(row)
    assert method == "lrf" and epochs == 2 and isinstance(epochs, int)
    assert alloc == AllocationConfig(mode="global")
    assert mparams == {"compensate": False, "eps": 0.002}
    row = {**row, "allocation": "searched", "param_shape_1": 1.0, "param_shape_2": 0.0, "param_shape_residual": -1.0}
    alloc = to_prune_args(row)[2]
    assert alloc.multipliers == (1.0, 2.0, 1.0) and alloc.residual_multiplier == 0.5


# ----------------------------------------------------------------------------- JSON Schema


@pytest.fixture(scope="module")
def schema_validator():
    jsonschema = pytest.importorskip("jsonschema")
    from autoprune.search.schema import build_schema

    schema = build_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_spec_validates_against_the_schema(path, schema_validator):
    import yaml

    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in schema_validator.iter_errors(raw)]
    assert errors == []


def test_the_schema_knows_every_key_the_checker_knows(schema_validator):
    from autoprune.methods import list_methods
    from autoprune.search.spec import TOP_KEYS

    props = schema_validator.schema["properties"]
    assert set(props) == set(TOP_KEYS)
    space = props["space"]["properties"]
    assert set(space["methods"]["properties"]) == set(list_methods())
    for name in list_methods():
        fields = {f.name for f in dataclasses.fields(get_method(name).Params)}
        assert set(space["methods"]["properties"][name]["properties"]) == fields


@pytest.mark.parametrize("extra", [
    "modle: small_cnn",
    "space: {methods: {resrep: {penaltyy: 1.0e-4}}}",
    "space: {target: {low: 0.2}}",
    "space: {method: [resrep, pruneall]}",
    "budget: {max_trials: 0}",
    "budget: {time: soon}",
    "objectives: [macs, val_acc]",
    "early_stop: {margin: 2}",
])
def test_the_schema_rejects_what_load_spec_rejects(extra, schema_validator, tmp_path):
    import yaml

    raw = yaml.safe_load(f"model: small_cnn\ndata: digits\n{extra}\n")
    assert list(schema_validator.iter_errors(raw)), extra
    with pytest.raises(SpecError):
        load_spec(write(tmp_path, f"model: small_cnn\ndata: digits\n{extra}\n"))


def test_cli_schema_prints_the_schema(tmp_path, capsys):
    import json

    from autoprune.cli import main
    from autoprune.search.schema import build_schema

    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == build_schema()
    out = tmp_path / "spec.schema.json"
    assert main(["schema", "--out", str(out)]) == 0 and json.loads(out.read_text()) == build_schema()
