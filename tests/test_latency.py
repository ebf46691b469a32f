"""The latency model as the allocator's objective, width rounding, the cache key, and bad latency input."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import model_input

import autoprune
from autoprune.cli import main
from autoprune.engine import latency_table
from autoprune.engine.allocate import AllocationConfig, allocate
from autoprune.engine.graph import build_width_cost, find_groups
from autoprune.engine.latency import LatencyModel, LayerTable, build_latency_model
from autoprune.engine.latency_table import LatencyConfig, cache_key, key_digest
from autoprune.engine.latency_validate import spearman
from autoprune.errors import AutopruneError
from autoprune.models.registry import create_model


def _synthetic(name: str, block: int = 1, multiple: int = 8, rest: float = 0.1):
    """A LatencyModel whose tables are a known function: latency of a layer = 1e-6 x blocked MACs + 0.01 ms,
    with widths rounded up to ``block`` (a step function, like oneDNN's channel blocks); the unpruned
    rest is ``rest`` of the base latency."""
    spec, shape = model_input(name)
    torch.manual_seed(0)
    model = create_model(spec).eval()
    groups = find_groups(model, shape, check=False)
    cost = build_width_cost(model, groups, shape)
    tables, layers = {}, {}
    for n, g in cost.layers.items():
        ins = tuple(sorted({1, g.in_ch}))
        outs = tuple(sorted({1, g.out_ch}))

        def f(ci: int, co: int, g=g) -> float:
            return 1e-6 * g.macs(ci, co) + 0.01

        tables[n] = LayerTable(ins, outs, tuple(tuple(f(ci, co) for co in outs) for ci in ins), block, g.depthwise)
        layers[n] = (n,)
    multiples = {g.name: min(g.channels, multiple) for g in groups if g.prunable}
    layer_sum = LatencyModel(cost, layers, tables, 1.0, 0.0, 1.0, {}, multiples).base
    const = layer_sum * rest / (1 - rest)
    lm = LatencyModel(cost, layers, tables, 1.0, const, 1.0, {"device_name": "synthetic"}, multiples)
    gen = torch.Generator().manual_seed(0)
    scores = {g.name: torch.rand(g.channels, generator=gen) for g in groups if g.prunable}
    return model, shape, groups, cost, lm, scores


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
@pytest.mark.parametrize("mode", ["uniform", "global", "searched"])
def test_allocator_hits_a_predicted_latency_target(name, mode):
    _, _, groups, cost, lm, scores = _synthetic(name, block=8)
    cfg = AllocationConfig(mode=mode, multipliers=(0.6, 1.0, 1.4))
    for target in (0.7, 0.5, 0.3):
        widths = allocate(groups, scores, lm, target, cfg)
        frac = lm.value(widths) / lm.base
        assert target - 0.02 <= frac <= target, (target, frac)
        # latency is not MACs: the constant and the blocks make them disagree
        assert abs(cost.macs_fraction(widths) - frac) > 0.02


@pytest.mark.parametrize("round_to", [8, 16, "auto"])
def test_round_to_never_exceeds_the_target_nor_drops_below_the_minimum(round_to):
    _, _, groups, _, lm, scores = _synthetic("resnet56", block=8, multiple=16)
    cfg = AllocationConfig(mode="global", round_to=round_to, min_ratio=0.2)
    for target in (0.85, 0.7, 0.55):  # round_to 16 leaves 16-channel groups whole: 0.505 is the floor
        widths = allocate(groups, scores, lm, target, cfg)
        assert lm.value(widths) <= target * lm.base
        for g in groups:
            if not g.prunable:
                continue
            step = min(g.channels, 16) if round_to == "auto" else round_to
            w = widths[g.name]
            assert w % step == 0 or w == g.channels, (g.name, w, step)
            assert w >= math.ceil(0.2 * g.channels)


def test_round_to_auto_needs_a_latency_model():
    _, _, groups, cost, _, scores = _synthetic("resnet20")
    with pytest.raises(AutopruneError, match="round_to auto needs a latency model"):
        allocate(groups, scores, cost, 0.5, AllocationConfig(round_to="auto"))


def test_every_method_gets_the_latency_objective():
    model, shape, groups, _, lm, _ = _synthetic("resnet20", block=8)
    res = autoprune.prune(model, "l1", 0.5, input_shape=shape, groups=groups, objective=lm, recalibrate_batches=0)
    assert 0.48 <= res.info["predicted_frac"] <= 0.5
    assert res.info["cost"] == "latency"
    assert abs(res.macs_fraction - 0.5) > 0.01  # aimed at latency, not MACs


def test_resrep_gets_the_latency_objective():
    from test_resrep import Data

    model, shape, groups, _, lm, _ = _synthetic("resnet20", block=8)
    data = Data(64, shape, classes=10)
    cfg = autoprune.train.TrainConfig(epochs=1, batch_size=32, lr=0.01)
    res = autoprune.prune(model, "resrep", 0.5, data=data, input_shape=shape, groups=groups, objective=lm,
                          train_cfg=cfg, recalibrate_batches=0, allocation={"round_to": "auto"})
    assert res.info["predicted_frac"] <= 0.5
    assert all(len(k) % 8 == 0 or len(k) == next(g.channels for g in groups if g.name == n)
               for n, k in res.plan.keep.items())


def test_a_latency_target_below_the_fastest_reachable_fraction_names_it():
    _, _, groups, _, lm, scores = _synthetic("resnet20", rest=0.5)  # the unpruned rest: half the latency
    with pytest.raises(AutopruneError, match=r"latency target 0\.100 is unreachable: the smallest reachable "
                                             r"fraction is 0\.\d+"):
        allocate(groups, scores, lm, 0.1, AllocationConfig())


def test_the_cache_key_changes_with_device_runtime_batch_and_threads():
    base = LatencyConfig(batch_size=1, threads=1)
    key = cache_key(base, (3, 32, 32), "s", device="cpu A @ host")
    variants = [cache_key(base, (3, 32, 32), "s", device="cpu B @ host"),
                cache_key(LatencyConfig(batch_size=32, threads=1), (3, 32, 32), "s", device="cpu A @ host"),
                cache_key(LatencyConfig(batch_size=1, threads=2), (3, 32, 32), "s", device="cpu A @ host"),
                cache_key(base, (3, 64, 64), "s", device="cpu A @ host"),
                cache_key(base, (3, 32, 32), "other model", device="cpu A @ host")]
    pytest.importorskip("onnxruntime")
    variants.append(cache_key(LatencyConfig(runtime="onnxruntime", batch_size=1, threads=1), (3, 32, 32), "s",
                              device="cpu A @ host"))
    digests = {key_digest(k) for k in [key, *variants]}
    assert len(digests) == len(variants) + 1


def test_a_cache_from_another_machine_is_not_used(tmp_path, monkeypatch):
    spec, shape = model_input("small_cnn")
    model = create_model(spec).eval()
    groups = find_groups(model, shape)
    cfg = LatencyConfig(threads=1, rounds=1, points=2, budget_s=0.001, cache_dir=str(tmp_path))
    lm = build_latency_model(model, groups, shape, cfg)
    assert not lm.info["from_cache"] and lm.base > 0
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    assert build_latency_model(model, groups, shape, cfg).info["from_cache"]
    # the same file, as if copied from another machine: its recorded key no longer matches
    data = json.loads(files[0].read_text())
    data["key"]["device_name"] = "another cpu @ elsewhere"
    files[0].write_text(json.dumps(data))
    assert not build_latency_model(model, groups, shape, cfg).info["from_cache"]
    monkeypatch.setattr(latency_table, "device_name", lambda device: "a third cpu @ host")
    assert not build_latency_model(model, groups, shape, cfg).info["from_cache"]


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_the_measured_model_predicts_the_base_and_is_monotone(tmp_path, runtime):
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime")
    spec, shape = model_input("small_cnn")
    model = create_model(spec).eval()
    groups = find_groups(model, shape)
    cfg = LatencyConfig(runtime=runtime, threads=1, rounds=2, points=3, budget_s=0.002, use_cache=False, clock="cpu")
    lm = build_latency_model(model, groups, shape, cfg)
    assert lm.base == pytest.approx(lm.measured_base_ms, rel=0.5)
    full = {g.name: g.channels for g in groups if g.prunable}
    half = {n: max(1, c // 2) for n, c in full.items()}
    assert lm.value(half) <= lm.value(full)
    assert set(lm.round_multiples()) == set(full)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("lat") / "base.pt"
    assert main(["train", "--model", "small_cnn", "--epochs", "1", "--out", str(path), "--threads", "1"]) == 0
    return path


@pytest.mark.parametrize("extra,message", [
    (["--runtime", "tensorrt"], "unknown latency runtime 'tensorrt'; use one of torch, onnxruntime"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    # timed (feedback is on by default), not refused on the latency model's word; without feedback it is
    (["--target", "0.01"], "latency target 0.010 is unreachable on this device: the smallest reachable fraction measured"),
    (["--target", "0.01", "--latency-feedback", "0"], "latency target 0.010 is unreachable: the smallest reachable fraction is"),
    (["--latency-feedback", "-1"], "--latency-feedback must be 0 (off) or a number of timed allocations, got -1"),
])
def test_bad_latency_input_is_one_line_and_exit_2(base_ckpt, tmp_path, capsys, extra, message):
    code = main(["prune", "--base", str(base_ckpt), "--cost", "latency", "--out", str(tmp_path / "p.pt"),
                 "--epochs", "0", "--threads", "1", "--latency-rounds", "1", "--latency-points", "2",
                 "--no-latency-cache", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len([line for line in err if line.startswith("error:")]) == 1 and message in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_onnxruntime_without_the_extra_names_it(base_ckpt, tmp_path, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name.startswith("onnxruntime"):
            raise ImportError("no onnxruntime")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    for cmd in (["prune", "--cost", "latency", "--out", str(tmp_path / "p.pt")], ["latency"]):
        code = main([*cmd, "--base", str(base_ckpt), "--runtime", "onnxruntime"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0
        assert "needs the 'export' extra: pip install 'autoprune[export]'" in err


def test_prune_with_a_latency_target_records_measured_and_predicted_latency(base_ckpt, tmp_path, capsys):
    out = tmp_path / "p.pt"
    # batch 32: compute, not per-call overhead, dominates this tiny model; the floor with round_to auto still
    # read 0.81 once on a loaded machine, so the target is 0.9
    assert main(["prune", "--base", str(base_ckpt), "--cost", "latency", "--target", "0.9", "--out", str(out),
                 "--epochs", "0", "--threads", "1", "--latency-rounds", "2", "--latency-points", "2",
                 "--no-latency-cache", "--round-to", "auto", "--batch-size", "32", "--latency-clock", "cpu"]) == 0
    m = json.loads((tmp_path / "p.metrics.json").read_text())
    for key in ("latency_ms", "base_latency_ms", "latency_frac", "predicted_latency_frac", "latency_batch_size",
                "latency_runtime", "latency_threads", "latency_device"):
        assert key in m, key
    fb = m["latency_feedback"]  # closed on measurement by default: its timed rounds are recorded, and the
    assert 1 <= len(fb["rounds"]) <= 3 and fb["aim"] in [r["aim"] for r in fb["rounds"]]  # model meets the aim
    assert m["predicted_latency_frac"] <= fb["aim"] + 1e-9 and m["latency_batch_size"] == 32
    assert m["latency_threads"] == 1 and m["latency_frac"] == pytest.approx(m["latency_ms"] / m["base_latency_ms"])
    assert "latency b32 (ms)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_search_with_a_latency_objective_aims_at_and_records_latency(base_ckpt, tmp_path, monkeypatch):
    import csv

    import yaml

    from autoprune.search.runner import run_search
    from autoprune.search.spec import load_spec

    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path / "cache"))
    spec = {"study": "t", "model": "small_cnn", "data": "digits", "base": str(base_ckpt), "device": "cpu",
            "objectives": ["val_acc", "latency"], "latency": {"batch_size": 32, "threads": 1, "rounds": 3, "points": 3, "clock": "cpu"},
            "budget": {"max_trials": 2}, "early_stop": {"enabled": False},
            "space": {"method": "l1", "target": {"low": 0.85, "high": 0.95}, "allocation": "global", "epochs": 1}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_search(load_spec(path), out, progress=False)
    finally:
        torch.set_num_threads(n)
    with open(out / "trials.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["state"] == "complete"]
    assert rows
    for r in rows:
        assert float(r["predicted_latency_frac"]) <= float(r["target"]) + 1e-9
        assert float(r["latency_frac"]) > 0 and float(r["latency_ms"]) > 0
    report = (out / "report.md").read_text()
    assert "batch 32, torch, 1 thread(s)" in report  # batch 32: at batch 2 the tiny model's floor read 0.93-1.09
    assert list((tmp_path / "cache").rglob("*.json"))  # measured once, cached


def test_a_spec_with_a_bad_latency_section_is_one_line(tmp_path):
    import yaml

    from autoprune.errors import SpecError
    from autoprune.search.spec import load_spec

    for latency, message in (({"runtime": "tvm"}, "latency.runtime: unknown latency runtime 'tvm'"),
                             ({"clock": "cpu", "threads": 2}, "clock 'cpu' measures one thread"),
                             ({"batch_size": 0}, "latency.batch_size"), ({"batchsize": 2}, "batchsize"),
                             ({"feedback": -1}, "latency.feedback: must be >= 0")):
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump({"model": "small_cnn", "data": "digits", "objectives": ["val_acc", "latency"],
                                        "latency": latency}))
        with pytest.raises(SpecError, match=message):
            load_spec(path)


def test_the_latency_command_runs_on_onnxruntime(base_ckpt, capsys):
    pytest.importorskip("onnxruntime")
    assert main(["latency", "--base", str(base_ckpt), "--runtime", "onnxruntime", "--validate", "3", "--targets", "0.8",
                 "--latency-rounds", "1", "--latency-points", "2", "--no-latency-cache", "--threads", "1",
                 "--latency-clock", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime on" in out and "batch 1, 1 thread(s)" in out
    assert "latency model error on 3 random held-out width assignments" in out
    assert "MACs, global" in out and "speed-up" in out


def test_a_width_off_the_multiple_of_8_pays_the_measured_misalignment_factor():
    from autoprune.engine.latency_layers import misaligned_factor

    # the probe's interleaved rounds: 31 channels about 1.2x slower than 32 (fewer MACs), on a machine whose
    # speed halves between rounds: the paired ratio does not move
    assert misaligned_factor({32: (1.0, 2.0, 1.0, 2.0, 1.0), 31: (1.2, 2.4, 1.2, 2.4, 1.2)}, 32) == pytest.approx(1.2)
    assert misaligned_factor({32: (1.0,) * 5, 31: (1.01,) * 5}, 32) == 1.0  # under 2 %: noise
    assert misaligned_factor({32: (1.0,) * 5, 31: (1.2, 1.2, 0.9, 0.9, 1.3)}, 32) == 1.0  # rounds disagree
    assert misaligned_factor({32: (1.0,) * 5, 31: (9.0,) * 5}, 32) == 1.5  # clamped
    assert misaligned_factor({24: (1.0,) * 5, 23: (1.3,) * 5}, 32) == 1.0  # 32 was not probed
    t = LayerTable((8, 64), (8, 64), ((1.0, 2.0), (2.0, 4.0)), block=8, misaligned_in=1.1, misaligned_out=1.2)
    aligned = t.at(32, 32)
    assert t.at(32, 31) == pytest.approx(aligned * 1.2)  # 31 rounds up to 32, then pays the factor
    assert t.at(31, 32) == pytest.approx(aligned * 1.1)
    assert t.at(31, 31) == pytest.approx(aligned * 1.1 * 1.2)
    assert LayerTable.from_dict(t.to_dict()) == t
    odd_full = LayerTable((8, 60), (8, 60), ((1.0, 2.0), (2.0, 4.0)), block=8, misaligned_out=1.2)
    assert odd_full.at(60, 59) == odd_full.at(60, 60)  # rounds up to the full width, measured as it is
    dw = LayerTable((8, 64), (8, 64), ((1.0, 2.0), (2.0, 4.0)), block=8, depthwise=True, misaligned_out=1.2)
    assert dw.at(31, 31) == pytest.approx(dw.at(32, 32) * 1.2)  # depthwise: one factor


def test_the_ablation_without_misalignment_drops_every_factor():
    from dataclasses import replace

    from autoprune.engine.latency import CALIBRATION_FRACTIONS, uniform_widths, without_misalignment

    _, _, groups, _, lm, _ = _synthetic("mobilenetv2", block=8)
    tables = {k: replace(t, misaligned_in=1.3, misaligned_out=1.3) for k, t in lm.tables.items()}
    # calibration timings that the factor-free tables explain exactly with scale 1.5 and const 0.2 ms
    calib = [1.5 * (lm.value(uniform_widths(groups, f)) - lm.const) + 0.2 for f in CALIBRATION_FRACTIONS]
    odd = LatencyModel(lm.cost, lm.layers, tables, 1.0, lm.const, 1.0, {"calibration_ms": calib}, lm.multiples)
    widths = {g.name: max(1, g.channels // 2 - 1) for g in groups if g.prunable}  # off the multiple of 8
    plain = without_misalignment(odd, groups)
    assert (plain.scale, plain.const) == (pytest.approx(1.5), pytest.approx(0.2))  # refitted, not copied
    assert all(t.misaligned_in == t.misaligned_out == 1.0 for t in plain.tables.values())
    assert plain.value(widths) == pytest.approx(1.5 * (lm.value(widths) - lm.const) + 0.2)
    assert odd.value(widths) > (plain.value(widths) - 0.2) / 1.5 + lm.const  # the factor costs time


@pytest.mark.parametrize("round_to", [1, 8, "auto"])
def test_the_floor_widths_are_what_the_allocator_reaches_at_the_lowest(round_to):
    from autoprune.engine.allocate import floor_widths

    _, _, groups, _, lm, scores = _synthetic("resnet20", block=8, multiple=8)
    cfg = AllocationConfig(mode="uniform", round_to=round_to)
    floor = lm.value(floor_widths(groups, cfg, lm)) / lm.base
    with pytest.raises(AutopruneError, match=f"smallest reachable fraction is {math.ceil(floor * 1000) / 1000:.3f}"):
        allocate(groups, scores, lm, floor - 0.01, cfg)
    allocate(groups, scores, lm, math.ceil(floor * 1000) / 1000, cfg)  # the fraction named is reachable
    widths = allocate(groups, scores, lm, floor + 0.005, cfg)
    assert lm.value(widths) / lm.base <= floor + 0.005


def test_a_depthwise_probe_narrows_the_layer_and_a_penalised_grid_stays_on_multiples_of_8(monkeypatch):
    from autoprune.engine import latency
    from autoprune.engine.latency_table import BlockGeom, Timing

    dw = BlockGeom("conv", 64, 64, 64, (3, 3), (1, 1), (1, 1), (1, 1), False, True, True, "ReLU", (64, 8, 8))
    built: list[tuple[int, int]] = []

    def fake_measure(points, cfg, name):  # 31 channels 1.3x slower than 32, otherwise proportional
        out = []
        for b, cin, cout in points:
            module, _ = b.build(cin, cout)
            built.append((module[0].in_channels, module[0].out_channels))
            ms = cout / 64 * (1.3 if cout % 8 else 1.0)
            out.append(Timing(ms, 0.0, (ms,) * 5))
        return out

    monkeypatch.setattr(latency, "_measure", fake_measure)
    tables = latency._tables({dw.key(): (dw, 4, 4)}, LatencyConfig(points=5))
    probes = built[:5]
    assert len({c for c, _ in probes}) == 5 and (63, 63) in probes  # the probe really times narrower convs
    t = tables[dw.key()]
    assert t.misaligned_out == pytest.approx(1.3 * 63 / 64) and t.depthwise
    assert all(w % 8 == 0 for w in t.out_pts)  # grid points off 8 would hold the slow path already
    assert t.at(31, 31) == pytest.approx(t.at(32, 32) * 1.3 * 63 / 64)


def test_models_are_timed_in_pairs_with_the_reference_and_drift_cancels(monkeypatch):
    """measure_models times the reference with each other model in its own interleaved rounds; each
    model's value is its per-round ratio to the reference (so a machine slowing down between rounds or
    pairs does not move it) times the reference's median over the pairs."""
    from torch import nn

    from autoprune.engine import latency_measure
    from autoprune.engine.latency_table import Timing

    ref, half, third = nn.Identity(), nn.Identity(), nn.Identity()
    slow = iter([1.0, 2.0])  # the machine runs at half speed during the second pair
    calls: list[int] = []

    def fake_time(runners, cfg, budget_s=None, on_round=None):
        calls.append(len(runners))
        k = next(slow)
        ratios = (0.5, 0.5, 0.9) if len(calls) == 1 else (1 / 3,) * 3  # one disturbed round in the first
        ref_rounds = tuple(k * r for r in (10.0, 14.0, 12.0))  # drift inside the pair too
        return [Timing(ms=k * 12.0, spread=0.3, rounds=ref_rounds),
                Timing(ms=0.0, spread=0.3, rounds=tuple(q * r for q, r in zip(ratios, ref_rounds)))]

    monkeypatch.setattr(latency_measure, "time_runners", fake_time)
    monkeypatch.setattr(latency_measure, "make_runner", lambda m, shape, cfg: m)
    base_ms, a, b = latency_measure.measure_models([ref, half, third], (3, 8, 8), LatencyConfig())
    assert calls == [2, 2]  # one pair per model, never all three together
    assert base_ms == pytest.approx(18.0)  # the median of the pairs' reference timings (12 and 24)
    # the median of per-round ratios (0.5), not the ratio of medians (7 / 12 = 0.583)
    assert (a / base_ms, b / base_ms) == (pytest.approx(0.5), pytest.approx(1 / 3))
    assert latency_measure.measure_models([], (3, 8, 8), LatencyConfig()) == []


def test_the_end_to_end_fit_never_predicts_a_narrow_model_near_zero():
    """Per-layer tables far slower than the layers run inside the model (MobileNetV2, batch 32, 2
    threads: the fitted scale left [0.5, 2]): the line is kept when it has a fixed part (const >= 0),
    else the fit falls back to a line through the origin, never to a large negative constant."""
    from autoprune.engine.latency import _fit

    sums = [900.0, 560.0, 280.0, 110.0]  # the tables' sums for 1.0 / 0.75 / 0.5 / 0.3 widths, ms
    e2e = [282.0, 190.0, 110.0, 60.0]  # measured: a third of the sums plus a fixed 30 ms
    scale, const = _fit(sums, e2e)
    assert scale == pytest.approx(0.28, abs=0.01) and const == pytest.approx(30.6, abs=0.5)
    assert all(abs(scale * x + const - y) / y < 0.05 for x, y in zip(sums, e2e))
    e2e = [282.0, 170.0, 80.0, 25.0]  # the line would cross zero above the narrowest width: through the origin
    scale, const = _fit(sums, e2e)
    assert const == 0.0 and scale == pytest.approx(0.31, abs=0.01)
    assert all(scale * x + const > 0.5 * y for x, y in zip(sums, e2e))  # scale 1 + mean gap: < 0 ms
    assert _fit([10.0, 7.0, 4.0, 2.0], [11.0, 8.0, 5.0, 3.0]) == (pytest.approx(1.0), pytest.approx(1.0))


def test_the_fit_through_the_base_predicts_the_measured_base_exactly():
    from autoprune.engine.latency import CALIBRATION_FRACTIONS, through_base, uniform_widths

    _, _, groups, _, lm, _ = _synthetic("mobilenetv2", block=8)
    unit = LatencyModel(lm.cost, lm.layers, lm.tables, 1.0, 0.0, 1.0, {}, lm.multiples)
    sums = [unit.value(uniform_widths(groups, f)) for f in CALIBRATION_FRACTIONS]  # the tables' sums
    # a base 5 % slower than the line through the narrower points (slope 2, a fixed part of half the
    # tables' base sum) says
    calib = [2.0 * x + 0.5 * sums[0] for x in sums]
    calib[0] *= 1.05
    timed = LatencyModel(lm.cost, lm.layers, lm.tables, 1.0, 0.0, calib[0], {"calibration_ms": calib}, lm.multiples)
    anchored = through_base(timed, groups)
    assert anchored.base == pytest.approx(calib[0])  # the denominator of every fraction is the measured base
    d = [x - sums[0] for x in sums[1:]]  # the slope: least squares through the base point
    slope = sum(a * (y - calib[0]) for a, y in zip(d, calib[1:])) / sum(a * a for a in d)
    assert anchored.scale == pytest.approx(slope) and anchored.const > 0
    assert through_base(unit, groups) is unit  # no calibration timings: unchanged
