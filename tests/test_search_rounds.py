"""Issue 25's search pieces: the screening round, trials on a training subset, distillation in trials.

small_cnn on digits from the module's base checkpoint, 1-epoch trials.
"""
from __future__ import annotations

import csv
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from autoprune.data.datasets import subset_split
from autoprune.search import rounds
from autoprune.search import trial as trial_mod
from autoprune.search.runner import run_search
from autoprune.search.spec import load_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def write_spec(folder: Path, base: Path, **changes) -> Path:
    spec = {
        "study": "t", "model": "small_cnn", "data": "digits", "base": str(base), "device": "cpu", "seed": 0,
        "budget": {"max_trials": 3}, "early_stop": {"enabled": False},
        "space": {"method": "l1", "target": {"low": 0.3, "high": 0.8}, "allocation": ["uniform", "global"],
                  "epochs": 1, "lr": {"low": 0.005, "high": 0.02}},
    }
    for key, value in changes.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    return folder / "spec.yaml"


def rows_of(out: Path) -> list[dict[str, str]]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_round_targets_follow_the_target_space(base_ckpt, tmp_path):
    spec = load_spec(write_spec(tmp_path, base_ckpt, space={"target": {"low": 0.2, "high": 0.5, "step": 0.1}}))
    assert rounds.round_targets(spec) == pytest.approx([0.2, 0.3, 0.4, 0.5])
    spec = load_spec(write_spec(tmp_path, base_ckpt, space={"target": [0.3, 0.6]}))
    assert rounds.round_targets(spec) == [0.3, 0.6]
    assert rounds.is_one_shot("lrf", 3) and not rounds.is_one_shot("resrep", 3)


def test_winners_are_the_best_and_those_within_the_margin():
    pts = [{"fidelity": f, "method": m} for f, m in ((0.80, "a"), (0.795, "b"), (0.60, "c"))]
    assert [p["method"] for p in rounds.winners(pts, 3000, 1.0)] == ["a", "b"]  # 0.5 points: within 1 SE
    assert [p["method"] for p in rounds.winners(pts, 3000, 0.0)] == ["a"]


def test_the_round_measures_every_one_shot_method_and_queues_the_winners_first(base_ckpt, tmp_path):
    # the spec lists the higher target first: the queue still starts at the lowest window
    spec = load_spec(write_spec(tmp_path, base_ckpt, budget={"max_trials": 3}, screen={"min_peers": 1},
                                space={"method": ["l1", "lrf", "resrep"], "target": [0.6, 0.4],
                                       "allocation": ["uniform", "global"]}))
    assert spec.screen.round
    result = run_search(spec, tmp_path / "out", progress=False)
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    points = study.user_attrs["round"]
    assert sorted((p["method"], p["target"]) for p in points) == [("l1", 0.4), ("l1", 0.6), ("lrf", 0.4),
                                                                   ("lrf", 0.6)]
    assert study.user_attrs["round_work_s"] > 0
    best = {t: max((p for p in points if p["target"] == t), key=lambda p: p["fidelity"])["method"] for t in (0.4, 0.6)}
    rows = sorted(result.rows, key=lambda r: int(r["number"]))
    # the first trials are the round's winners with global allocation (the queue's order)
    assert rows[0]["method"] == best[0.4] and float(rows[0]["target"]) == 0.4 and rows[0]["allocation"] == "global"
    assert rows[0]["stopped_at"] != "screen"  # never screened against its own round measurement
    # every window's best before anything else; then the training-time method at the lowest window
    assert (rows[1]["method"], float(rows[1]["target"])) == (best[0.6], 0.6)
    assert (rows[2]["method"], float(rows[2]["target"])) == ("resrep", 0.4)
    queued = [t for t in study.trials if t.user_attrs.get("round")]
    assert len(queued) >= 3 and {"resrep"} <= {(t.params or t.system_attrs.get("fixed_params", {})).get("method") for t in queued}
    # resumed: the round is not run again
    again = run_search(load_spec(write_spec(tmp_path, base_ckpt, budget={"max_trials": 4}, screen={"min_peers": 1},
                                            space={"method": ["l1", "lrf", "resrep"], "target": [0.6, 0.4],
                                                   "allocation": ["uniform", "global"]})),
                       tmp_path / "out", resume=True, progress=False)
    assert len(again.rows) == 4
    assert optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}"
                             ).user_attrs["round"] == points


def test_trials_train_on_the_spec_subset(base_ckpt, tmp_path):
    spec = load_spec(write_spec(tmp_path, base_ckpt, train_subset=100))
    assert spec.train_subset == 100 and spec.to_dict()["train_subset"] == 100
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "base.pt").write_bytes(Path(base_ckpt).read_bytes())
    worker = trial_mod.Worker.load(spec, tmp_path / "w", torch.device("cpu"))
    assert len(worker.data.train) == 100 and len(worker.data.val) > 100
    sub = subset_split(worker.data.train, 30, seed=1)
    assert len(sub) == 30 and torch.equal(sub.indices, subset_split(worker.data.train, 30, seed=1).indices)


def test_distillation_from_the_base_model_is_searched(base_ckpt, tmp_path, monkeypatch):
    seen = []
    real = trial_mod.fit

    def spy(model, train, val, cfg, device, callbacks=None, teacher=None, **kw):
        seen.append((cfg.distill_alpha, cfg.distill_temperature, teacher is not None, cfg.distill_until))
        return real(model, train, val, cfg, device, callbacks, teacher=teacher, **kw)

    monkeypatch.setattr(trial_mod, "fit", spy)
    spec = load_spec(write_spec(tmp_path, base_ckpt, budget={"max_trials": 4},
                                space={"distill": [0.0, 0.5], "distill_temperature": {"low": 2, "high": 8}}))
    result = run_search(spec, tmp_path / "out", progress=False)
    assert {r["state"] for r in result.rows} == {"complete"}
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "base.pt").write_bytes(Path(base_ckpt).read_bytes())
    teacher_acc = trial_mod.Worker.load(spec, tmp_path / "w", torch.device("cpu")).teacher_acc()
    before = []  # val acc of the trials before: any one at the teacher's accuracy turns distillation off
    for (alpha, temp, has_teacher, until), row in zip(seen, sorted(result.rows, key=lambda r: int(r["number"]))):
        caught = any(acc >= teacher_acc for acc in before)
        wanted = 0.0 if caught else float(row["param_distill"])
        assert alpha == wanted and has_teacher == (alpha > 0)
        assert int(row["distill_epochs"]) <= (1 if alpha > 0 else 0)  # 1-epoch trials
        if alpha > 0:
            assert until == pytest.approx(teacher_acc)  # the student stops distilling once it reaches its teacher
            assert 2 <= temp <= 8 and float(row["param_distill_temperature"]) == temp
        before.append(float(row["val_acc"]))
    # the screening round's queued trials distil at the space's largest weight
    queued = load_spec(write_spec(tmp_path / "q", base_ckpt, budget={"max_trials": 1}, screen={"min_peers": 1},
                                  space={"method": ["l1", "lrf"], "target": [0.5], "distill": [0.0, 0.3]}))
    first = run_search(queued, tmp_path / "q" / "out", progress=False).rows[0]
    assert float(first["param_distill"]) == 0.3
    # off by default: no distillation parameter at all
    plain = load_spec(write_spec(tmp_path / "p", base_ckpt))
    assert plain.space["distill"] == 0.0


def test_a_trial_does_not_distil_from_a_teacher_a_finished_trial_reached():
    from autoprune.search.distillation import distillation
    from autoprune.search.early_stop import Peer, Reference

    def ref(*curves):
        return lambda: Reference(tuple(Peer(0.5, c) for c in curves))

    def teacher():
        return 0.86

    assert distillation(teacher, {"distill": 0.5}, ref(), 5) == (0.5, 0.86)
    assert distillation(teacher, {"distill": 0.5}, ref((0.7, None, 0.85)), 5) == (0.5, 0.86)
    assert distillation(teacher, {"distill": 0.5}, ref((0.7, 0.861, 0.85), (None,)), 5) == (0.0, None)
    assert distillation(lambda: pytest.fail("measured without need"), {"distill": 0.0}, ref(), 5) == (0.0, None)
    # any finished trial counts, however lightly pruned (a peer at 0.5 of the MACs, 0.87): measured on VGG-16-BN
    assert distillation(teacher, {"distill": 0.5}, ref((0.87,)), 5) == (0.0, None)


class _Store:
    """The parts of a TrialStore hedge() reads: meta and the recorded trials."""

    def __init__(self, trials=(), **meta):
        self.values, self._trials = dict(meta), list(trials)

    def meta(self):
        return dict(self.values)

    def set_meta(self, key, value):
        self.values[key] = value

    def trials(self):
        return list(self._trials)


def test_a_trial_that_reaches_the_base_queues_the_methods_the_round_left_out(base_ckpt, tmp_path):
    """Once a trial has recovered the base's accuracy the zero-training ranking no longer tells methods
    apart: each one-shot method the round left out runs once at the lowest window, without distilling,
    once per study."""
    from types import SimpleNamespace

    from optuna.trial import TrialState

    from autoprune.search.store import StoredTrial

    spec = load_spec(write_spec(tmp_path, base_ckpt, screen={"min_peers": 1},
                                space={"method": ["l1", "lrf", "fsm"], "target": [0.3, 0.6], "distill": [0.0, 0.5]}))

    def pt(method, target, fidelity):
        return {"method": method, "target": target, "allocation": "global", "fidelity": fidelity, "knobs": {}}

    points = [pt("lrf", 0.6, 0.86), pt("l1", 0.6, 0.855), pt("fsm", 0.6, 0.70),
              pt("lrf", 0.3, 0.85), pt("fsm", 0.3, 0.63), pt("l1", 0.3, 0.60)]
    worker = SimpleNamespace(spec=spec, data=SimpleNamespace(val=[0] * 3000), teacher_acc=lambda: 0.87)

    def trial(number, curve, state="complete", **record):
        return StoredTrial(number, state, record={"state": state, **record}, curve=curve, cost=0.5)

    below = [trial(1, (0.86, 0.869)), trial(2, (0.9,), duplicate_of=0), trial(3, (0.9,), state="early_stopped"),
             trial(4, (None,))]
    study = optuna.create_study(directions=["maximize", "minimize"])
    store = _Store(below, round=points)
    assert rounds.hedge(worker, store, study) == []
    assert "hedged" not in store.meta() and not study.trials
    store._trials.append(trial(5, (0.86, 0.87, 0.865)))  # reached the teacher at its second epoch
    queued = rounds.hedge(worker, store, study)
    assert [(p["method"], p["target"], p["distill"]) for p in queued] == [("fsm", 0.3, 0.0), ("l1", 0.3, 0.0)]
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"]["method"] for t in waiting] == ["fsm", "l1"]
    assert all(t.user_attrs == {"round": True, "hedge": True} for t in waiting)
    assert store.meta()["hedged"]["after"] == 5 and store.meta()["hedged"]["methods"] == ["fsm", "l1"]
    store._trials.append(trial(6, (0.95,)))
    assert rounds.hedge(worker, store, study) == []  # once per study
    # without a round, or with the round switched off in the spec, nothing is queued
    assert rounds.hedge(worker, _Store([trial(7, (0.95,))]), study) == [] and len(study.trials) == 2
    off = SimpleNamespace(spec=load_spec(write_spec(tmp_path, base_ckpt, screen={"round": False},
                                                    space={"method": ["l1", "lrf", "fsm"], "target": [0.3, 0.6]})),
                          data=worker.data, teacher_acc=worker.teacher_acc)
    assert rounds.hedge(off, _Store([trial(7, (0.95,))], round=points), study) == [] and len(study.trials) == 2


def test_the_search_runs_the_hedge_to_the_end_after_a_trial_reaches_the_base(base_ckpt, tmp_path, monkeypatch):
    """The queued trials run to the end although the fidelity screen (keep 0.3) would drop the round's losers."""
    monkeypatch.setattr(trial_mod.Worker, "teacher_acc", lambda self: 0.0)  # the first trial reaches it
    spec = load_spec(write_spec(tmp_path, base_ckpt, budget={"max_trials": 6}, screen={"min_peers": 1, "keep": 0.3},
                                early_stop={"enabled": True, "min_epochs": 1, "min_trials": 1},
                                space={"method": ["l1", "lrf", "fsm"], "target": [0.4, 0.6], "epochs": 2,
                                       "allocation": ["uniform", "global"], "distill": [0.0, 0.5]}))
    result = run_search(spec, tmp_path / "out", progress=False)
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    hedged = study.user_attrs["hedged"]
    assert hedged["after"] == 0 and hedged["target"] == 0.4 and hedged["methods"]
    ran = [t for t in study.trials if t.user_attrs.get("hedge")]
    assert [t.params["method"] for t in ran] == hedged["methods"]
    assert all(t.params["target"] == 0.4 and t.params["distill"] == 0.0 for t in ran)
    rows = {int(r["number"]): r for r in result.rows}
    assert all(rows[t.number]["state"] == "complete" and int(rows[t.number]["epochs_run"]) == 2 for t in ran)


def test_sensitivity_seeded_shape_is_queued_for_the_searched_allocation(base_ckpt, tmp_path):
    """screen.sensitivity: each depth bucket's and the residual stream's loss when squeezed (zero-training
    fidelity); the seeded shape is queued as each window's first searched trial."""
    spec = load_spec(write_spec(tmp_path, base_ckpt, budget={"max_trials": 3},
                                screen={"min_peers": 1, "sensitivity": True},
                                space={"method": ["l1", "lrf"], "target": [0.5], "residual": {"low": -1, "high": 1},
                                       "allocation": ["global", "searched"], "buckets": 3}))
    assert spec.screen.sensitivity
    run_search(spec, tmp_path / "out", progress=False)
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    seeded = study.user_attrs["sensitivity"]
    assert len(seeded["bucket_losses"]) == 3 and all(x > 0 for x in seeded["bucket_losses"])
    assert set(seeded["shape"]) == {"shape_1", "shape_2", "shape_residual"}
    assert all(-1 <= v <= 1 for v in seeded["shape"].values())
    searched = [t for t in study.trials if t.params.get("allocation") == "searched"]
    assert searched and searched[0].params["shape_1"] == pytest.approx(seeded["shape"]["shape_1"])
    assert study.user_attrs["round_work_s"] > seeded["work_s"] > 0


def test_resrep_epoch_readings_are_the_model_it_would_return(digits, digits_base):
    """Issue 25 asked, once the engine's one training loop landed, whether ResRep's mid-training readings
    are honest: stopped after epoch e, the model ResRep returns (folded, cut, BN recalibrated) reads
    what epoch e's reading said, within two standard errors of a difference on the validation split.
    (Honest readings are necessary, not sufficient, for judging ResRep mid-way: early_stop still judges
    it only at its end until a search measures that its mid-way ranking predicts its final one.)"""
    from autoprune.engine import pruning as engine
    from autoprune.search.early_stop import JUDGED_AT_END, accuracy_se
    from autoprune.train import TrainConfig, evaluate

    model, spec = digits_base
    n = len(digits.val)
    for stop_at in (1, 2):
        readings = []

        def on_epoch(epoch, metrics, stop_at=stop_at, readings=readings):
            readings.append(metrics["val_acc"])
            return epoch >= stop_at

        res = engine.prune(model, "resrep", 0.5, data=digits, spec=spec, device="cpu", on_epoch=on_epoch,
                           train_cfg=TrainConfig(epochs=3, lr=0.01, batch_size=64, seed=0))
        assert res.stopped_early and len(readings) == stop_at
        returned = evaluate(res.model, digits.val, "cpu")["acc"]
        assert abs(returned - readings[-1]) <= 2 * 2 ** 0.5 * accuracy_se(returned, n)
        assert res.macs / res.base_macs <= 0.52
    assert "resrep" in JUDGED_AT_END


def test_the_round_window_bests_run_to_the_end_where_early_stopping_would_stop_them(base_ckpt, tmp_path, monkeypatch):
    """Every epoch rung says stop: the round's best method at each window still trains every epoch (its
    point is the single best method's there); a sampled trial is stopped."""
    from autoprune.search import early_stop

    monkeypatch.setattr(early_stop, "should_stop", lambda *a, **k: True)
    spec = load_spec(write_spec(tmp_path, base_ckpt, budget={"max_trials": 5}, screen={"min_peers": 1},
                                early_stop={"enabled": True, "min_epochs": 1, "min_trials": 1},
                                space={"method": ["l1", "lrf"], "target": [0.6, 0.4], "epochs": 2,
                                       "allocation": ["uniform", "global"]}))
    result = run_search(spec, tmp_path / "out", progress=False)
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    rows = {int(r["number"]): r for r in result.rows}
    best = [t for t in study.trials if t.user_attrs.get("window_best")]
    assert [float(t.params["target"]) for t in best] == [0.4, 0.6]  # one per window, lowest first
    assert all(rows[t.number]["state"] == "complete" and int(rows[t.number]["epochs_run"]) == 2 for t in best)
    others = [r for n, r in rows.items() if n not in {t.number for t in best}]
    assert any(r["state"] == "early_stopped" for r in others)  # the rule did fire
