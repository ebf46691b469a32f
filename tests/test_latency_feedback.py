"""Closing a latency allocation on measurement: the measured fraction lands in band where the model is off."""
from __future__ import annotations

import pytest
from test_latency import _synthetic

import autoprune
from autoprune.engine.latency_feedback import ABOVE, BELOW, FeedbackRound, LatencyFeedback
from autoprune.errors import AutopruneError, UnreachableTarget


def _device(lm, bias: float):
    """A 'device' whose measured fraction is the model's prediction times ``bias`` (capped at 1): a latency
    model that under-predicts (bias > 1) or over-predicts (< 1) by a fixed factor, with a call counter."""
    calls = []

    def measure(widths):
        calls.append(dict(widths))
        return min(1.0, bias * lm.value(widths) / lm.base)

    return measure, calls


@pytest.mark.parametrize("bias", [1.3, 0.8])
@pytest.mark.parametrize("method", ["l1", "lrf"])
def test_feedback_lands_the_measured_fraction_in_band_where_the_model_is_off(bias, method):
    model, shape, groups, _, lm, _ = _synthetic("resnet20", block=8)
    measure, calls = _device(lm, bias)
    target, params = 0.5, ({"fit": "weights"} if method == "lrf" else {})  # no data: LRF's weight fit
    plain = autoprune.prune(model, method, target, input_shape=shape, groups=groups, objective=lm,
                            recalibrate_batches=0, **params)
    assert not target - 0.05 <= min(1.0, bias * plain.info["predicted_frac"]) <= target + 0.03  # off without it
    res = autoprune.prune(model, method, target, input_shape=shape, groups=groups, objective=lm,
                          recalibrate_batches=0, feedback=LatencyFeedback(measure, rounds=3), **params)
    measured = min(1.0, bias * res.info["predicted_frac"])
    assert target - BELOW <= measured <= target + ABOVE, measured
    fb = res.info["latency_feedback"]
    assert fb["in_band"] and 2 <= len(fb["rounds"]) <= 3 and len(calls) == len(fb["rounds"])
    assert fb["rounds"][-1]["measured"] == pytest.approx(measured)  # the kept widths are the last measured ones


def test_feedback_steers_resreps_mask_schedule():
    from test_resrep import Data

    model, shape, groups, _, lm, _ = _synthetic("resnet20", block=8)
    measure, _ = _device(lm, 1.3)
    cfg = autoprune.train.TrainConfig(epochs=1, batch_size=32, lr=0.01)
    res = autoprune.prune(model, "resrep", 0.5, data=Data(64, shape, classes=10), input_shape=shape, groups=groups,
                          objective=lm, train_cfg=cfg, recalibrate_batches=0,
                          feedback=LatencyFeedback(measure, rounds=3))
    fb = res.info["latency_feedback"]
    assert fb["in_band"] and fb["aim"] < 0.45
    assert res.info["predicted_frac"] <= fb["aim"] + 1e-9  # the schedule met the aim, not the raw target


def test_the_loop_keeps_the_round_closest_to_the_band_and_stops_at_the_floor():
    seen = []

    def allocate(aim):  # the floor: nothing below 0.42 of the model is reachable
        if aim < 0.42:
            raise AutopruneError("latency target is unreachable")
        seen.append(aim)
        return {"g": aim}

    fb = LatencyFeedback(lambda w: 1.5 * w["g"], rounds=5)  # the model under-predicts by half
    with pytest.warns(UserWarning, match=r"none of 1 timed allocation\(s\) measured in \[0\.46, 0\.52\]"):
        aim, rounds = fb.aim(0.5, allocate)
    assert [r.aim for r in rounds] == seen and seen[0] == 0.5 and len(seen) == 1  # re-aim 0.33 is unreachable
    assert aim == 0.5
    with pytest.raises(AutopruneError, match="unreachable"):  # the first allocation's error is the user's
        fb.aim(0.3, allocate)


def test_a_target_below_the_models_floor_is_timed_on_the_device_before_it_is_refused():
    """The model's floor is its word only: the narrowest widths are timed; a device faster than the model
    reaches a target under the predicted floor (in band), a slower one is refused naming the measured floor."""
    model, shape, groups, _, lm, _ = _synthetic("resnet20", block=8)
    kw = {"input_shape": shape, "groups": groups, "objective": lm, "recalibrate_batches": 0,
          "allocation": {"mode": "uniform", "min_ratio": 0.5}}  # a floor near half the latency
    with pytest.raises(UnreachableTarget) as info:  # the allocator names the model's floor and its widths
        autoprune.prune(model, "l1", 0.05, **kw)
    floor, narrowest = info.value.floor, info.value.widths
    target = round(floor * 0.85, 3)  # below the model's floor, above 0.6 x it
    measure, calls = _device(lm, 0.6)  # the device runs 0.6 of what the model predicts
    res = autoprune.prune(model, "l1", target, feedback=LatencyFeedback(measure, rounds=3), **kw)
    measured = 0.6 * res.info["predicted_frac"]
    assert target - BELOW <= measured <= target + ABOVE and res.info["latency_feedback"]["in_band"]
    assert calls[0] == narrowest and len(calls) >= 2  # the first timing: the narrowest widths
    slow, calls = _device(lm, 1.1)
    with pytest.raises(AutopruneError, match=r"unreachable on this device: the smallest reachable fraction measured "
                                             r"0\.\d+ of the base's latency \(the narrowest allowed widths; the latency "
                                             r"model predicted"):
        autoprune.prune(model, "l1", target, feedback=LatencyFeedback(slow, rounds=3), **kw)
    assert len(calls) == 1
    for nonsense in (float("nan"), 0.0):  # a broken timer is not a fact about the device: the model's refusal stands
        with pytest.raises(UnreachableTarget):
            autoprune.prune(model, "l1", target, feedback=LatencyFeedback(lambda w, v=nonsense: v, rounds=3), **kw)
    import pickle

    again = pickle.loads(pickle.dumps(info.value))
    assert (str(again), again.floor, again.widths) == (str(info.value), floor, narrowest)


def test_one_round_measures_once_and_bad_rounds_are_refused():
    with pytest.warns(UserWarning, match="none of 1 timed allocation"):  # out of band: said, closest kept
        aim, rounds = LatencyFeedback(lambda w: 0.9, rounds=1).aim(0.5, lambda a: {"g": a})
    assert aim == 0.5 and rounds == [FeedbackRound(0.5, 0.9)]
    with pytest.raises(AutopruneError, match="rounds must be at least 1"):
        LatencyFeedback(lambda w: 0.5, rounds=0)


def test_feedback_without_a_latency_objective_is_refused():
    model, shape, groups, *_ = _synthetic("resnet20")
    with pytest.raises(AutopruneError, match="pass objective="):
        autoprune.prune(model, "l1", 0.5, input_shape=shape, groups=groups, recalibrate_batches=0,
                        feedback=LatencyFeedback(lambda w: 0.5))


def test_a_search_trials_feedback_times_with_the_other_workers_paused(tmp_path, monkeypatch):
    """The spec's latency.feedback gives each trial a LatencyFeedback whose timings hold the measure lock."""
    import fcntl
    from types import SimpleNamespace

    import autoprune.engine.latency as latency_mod
    from autoprune.engine.latency_table import LatencyConfig
    from autoprune.search import latency_objective

    held = []

    def timed(models, shape, cfg, name=""):  # another worker's shared lock would block while this runs
        with open(tmp_path / latency_objective.MEASURE_LOCK, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)
        return [2.0, 1.0]

    monkeypatch.setattr(latency_mod, "measure_models", timed)
    model, shape, groups, *_ = _synthetic("resnet20")
    worker = SimpleNamespace(model=model, groups=groups, input_shape=shape, out_dir=tmp_path,
                             latency_cfg=LatencyConfig(threads=1, rounds=1, clock="cpu", use_cache=False))
    assert latency_objective.feedback(SimpleNamespace(latency={"feedback": 0}, workers=1), worker) is None
    fb = latency_objective.feedback(SimpleNamespace(latency={"feedback": 2}, workers=1), worker)
    frac = fb.measure({g.name: g.channels // 2 for g in groups if g.prunable})
    assert fb.rounds == 2 and held == [True] and frac == 0.5
