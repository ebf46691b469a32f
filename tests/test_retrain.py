"""retrain: choosing a trial by rule (deterministic, clear errors), the retrained output folder,
val accuracy never below the trial's, the test split reported, Ctrl-C leaving a usable model."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml

import autoprune.report.retrain as rt
from autoprune import prune
from autoprune.cli import main
from autoprune.engine.plan import load_pruned, save_base, save_pruned
from autoprune.errors import AutopruneError
from autoprune.report.retrain import RetrainInterrupted, choose_trial, retrain
from autoprune.search.results import make_row, model_path, write_trials_csv
from autoprune.train import TrainConfig, evaluate, fit

TARGETS = {0: 0.5, 1: 0.3, 4: 0.7}  # trial number -> MACs target of the complete trials


@pytest.fixture(scope="module")
def study(tmp_path_factory, digits, digits_base):
    """A results folder as `autoprune search` writes it: spec.yaml, base.pt, models/, trials.csv."""
    out = tmp_path_factory.mktemp("study")
    base, spec = digits_base
    data_spec = digits.spec
    base_val = evaluate(base, digits.val, "cpu")["acc"]
    save_base(out / "base.pt", base, spec, data_spec, {"val_acc": base_val, "macs": 1, "params": 1})
    (out / "spec.yaml").write_text(
        yaml.safe_dump({"study": "tiny", "model": spec.name, "data": data_spec.to_dict()})
    )
    rows = []
    for number, target in TARGETS.items():
        res = prune(base, "l1", target, spec=spec)
        model = res.model
        fit(model, digits.train, digits.val, TrainConfig(epochs=1, lr=0.01, seed=number), "cpu")
        val = evaluate(model, digits.val, "cpu")["acc"]
        hparams = {
            "method": "l1",
            "target": target,
            "allocation": "global",
            "epochs": 1,
            "lr": 0.01,
            "batch_size": 128,
        }
        save_pruned(
            out / model_path(number),
            model,
            spec,
            res.plan,
            data_spec,
            metrics={
                "val_acc": val,
                "macs": res.macs,
                "params": res.params,
                "base_macs": res.base_macs,
                "base_params": res.base_params,
                "base_val_acc": base_val,
            },
            extra={"trial": number, "params": hparams},
        )
        record = {
            "val_acc": val,
            "macs": res.macs,
            "macs_frac": res.macs_fraction,
            "params": res.params,
            "params_frac": res.params_fraction,
            "epochs_run": 1,
            "duration_s": 1.0,
            "feasible": True,
            "model": model_path(number),
        }
        rows.append(make_row(number, "complete", hparams, record))
    other = {
        "method": "l1",
        "target": 0.2,
        "allocation": "uniform",
        "epochs": 1,
        "lr": 0.01,
        "batch_size": 128,
    }
    rows.append(make_row(2, "failed", other, error="RuntimeError: boom"))
    rows.append(
        make_row(3, "early_stopped", other, {"val_acc": 0.99, "macs": 10, "macs_frac": 0.1, "feasible": True})
    )
    write_trials_csv(out / "trials.csv", rows)
    return out


def _trials(study) -> pd.DataFrame:
    return pd.read_csv(study / "trials.csv")


def _expected(study, max_frac: float) -> int:
    df = _trials(study)
    ok = df[(df.state == "complete") & (df.macs_frac <= max_frac)]
    return int(ok.sort_values(["val_acc", "macs"], ascending=[False, True]).iloc[0]["number"])


# ------------------------------------------------------------------------------------------ choosing


def test_pick_chooses_the_most_accurate_feasible_trial_and_always_the_same(study, tmp_path):
    first = choose_trial(study, "macs_frac<=0.6")
    assert first.trial == _expected(study, 0.6)
    assert first.model_path == study / model_path(first.trial)
    assert all(choose_trial(study, "macs_frac<=0.6").trial == first.trial for _ in range(3))
    # row order of the table does not matter either
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    _trials(study).sample(frac=1.0, random_state=3).to_csv(shuffled / "trials.csv", index=False)
    (shuffled / "models").symlink_to(study / "models")
    assert choose_trial(shuffled, "macs_frac<=0.6").trial == first.trial
    # the early-stopped trial (best val_acc, fewest MACs) is never chosen
    assert choose_trial(study, "best").trial != 3
    assert choose_trial(study, trial=1).trial == 1


def test_pick_errors_name_the_columns_or_the_closest_trials(study):
    with pytest.raises(AutopruneError, match="unknown column 'flops'") as info:
        choose_trial(study, "flops<=0.4")
    assert all(col in str(info.value) for col in ("val_acc", "macs_frac", "params_frac", "number"))
    with pytest.raises(AutopruneError, match="no trial satisfies.*closest: trial 1") as info:
        choose_trial(study, "macs_frac<=0.01")
    assert "\n" not in str(info.value)
    with pytest.raises(AutopruneError, match="trial 2 is failed"):
        choose_trial(study, trial=2)
    with pytest.raises(AutopruneError, match="not both"):
        choose_trial(study, "best", trial=1)


def test_missing_folder_csv_and_model_are_one_line_errors(study, tmp_path):
    with pytest.raises(AutopruneError, match="study folder .*nope does not exist"):
        choose_trial(tmp_path / "nope", "best")
    with pytest.raises(AutopruneError, match="trials.csv not found.*autoprune search"):
        choose_trial(tmp_path, "best")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "trials.csv").write_text((study / "trials.csv").read_text())
    with pytest.raises(AutopruneError, match=r"trial 0's model .*trial_0000.pt does not exist") as info:
        choose_trial(broken, trial=0)
    assert "\n" not in str(info.value)


def test_cli_pick_error_exits_2_with_one_line(study, capsys):
    assert main(["retrain", str(study), "--pick", "accuracyy>=0.9", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: pick rule: unknown column 'accuracyy'") and "val_acc" in err
    assert len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------ retraining


def test_retrain_writes_every_output_and_never_loses_val_accuracy(study, tmp_path, digits):
    out = tmp_path / "out"
    res = retrain(
        study,
        "macs_frac<=0.6",
        epochs=2,
        lr=0.01,
        out_dir=out,
        device="cpu",
        onnx_exporter="legacy",
        latency_repeats=2,
    )
    chosen = _expected(study, 0.6)
    assert res.trial == chosen and res.out_dir == out
    for name in rt.FILES.values():
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    recorded = float(_trials(study).set_index("number").loc[chosen, "val_acc"])
    assert m["pruned"]["val_acc"] >= recorded - 1e-9
    for who in ("base", "pruned"):
        assert 0.0 <= m[who]["test_acc"] <= 1.0 and 0.0 <= m[who]["val_acc"] <= 1.0
        assert set(m[who]["latency_ms"]) == {"batch_1", "batch_32"}
    assert m["pruned"]["macs"] < m["base"]["macs"]
    assert m["pruned"]["macs_frac"] == pytest.approx(m["pruned"]["macs"] / m["base"]["macs"])
    assert m["pruned"]["macs_frac"] <= 0.6 and "MACs" in m["units"]["macs"]
    assert m["retrain"]["epochs_run"] == 2 and len(m["retrain"]["history"]) == 2
    for fmt in ("onnx", "torchscript"):
        assert m["exports"][fmt]["ok"] and m["exports"][fmt]["max_abs_diff"] <= 1e-4
    # model.pt is the best epoch's model: rebuilding it gives the reported val and test accuracy
    model, ckpt = load_pruned(out / "model.pt")
    assert evaluate(model, digits.val, "cpu")["acc"] == pytest.approx(m["pruned"]["val_acc"])
    assert evaluate(model, digits.test, "cpu")["acc"] == pytest.approx(m["pruned"]["test_acc"])
    assert ckpt["metrics"]["test_acc"] == pytest.approx(m["pruned"]["test_acc"])
    assert ckpt["extra"]["trial"] == chosen and ckpt["extra"]["retrain"]["finished"] is True
    summary = (out / "summary.md").read_text()
    assert f"trial {chosen}" in summary and "test acc" in summary and "MACs per sample" in summary


def test_retrain_keeps_the_trial_weights_when_training_only_hurts(study, tmp_path, digits):
    """A learning rate that wrecks the model: the best 'epoch' is 0, the trial's own weights."""
    out = tmp_path / "bad"
    res = retrain(
        study,
        trial=1,
        epochs=1,
        lr=50.0,
        out_dir=out,
        device="cpu",
        onnx_exporter="legacy",
        latency_repeats=1,
    )
    r = res.metrics["retrain"]
    assert r["history"][0]["val_acc"] < r["val_acc_start"]
    assert r["best_epoch"] == 0
    assert res.metrics["pruned"]["val_acc"] == pytest.approx(r["val_acc_start"])
    trial_model, _ = load_pruned(study / model_path(1))
    model, _ = load_pruned(out / "model.pt")
    for a, b in zip(trial_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_ctrl_c_leaves_the_best_epoch_so_far(study, tmp_path, monkeypatch, digits):
    real_fit = rt.fit

    def interrupted_fit(model, train, val, cfg, device, callbacks=None, teacher=None, progress=False):
        def on_epoch_end(epoch, metrics):
            callbacks.on_epoch_end(epoch, metrics)
            if epoch == 2:
                raise KeyboardInterrupt
            return False

        return real_fit(
            model, train, val, cfg, device, rt.Callbacks(on_epoch_end=on_epoch_end), teacher, progress
        )

    monkeypatch.setattr(rt, "fit", interrupted_fit)
    out = tmp_path / "int"
    with pytest.raises(KeyboardInterrupt) as info:
        retrain(study, trial=0, epochs=5, lr=0.02, out_dir=out, device="cpu", distill=True)
    exc = info.value
    assert isinstance(exc, RetrainInterrupted) and exc.model_path == out / "model.pt"
    m = json.loads((out / "metrics.json").read_text())
    assert m["interrupted"] is True and "best epoch so far" in m["note"]
    assert m["retrain"]["best_epoch"] == exc.best_epoch <= 2
    model, ckpt = load_pruned(out / "model.pt")  # usable: rebuilds, and holds the best epoch's weights
    assert ckpt["metrics"]["epoch"] == exc.best_epoch
    assert evaluate(model, digits.val, "cpu")["acc"] == pytest.approx(exc.best_val_acc)
    assert not (out / "model.onnx").exists()


def test_cli_retrain_end_to_end(study, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(
        [
            "retrain",
            str(study),
            "--trial",
            "4",
            "--epochs",
            "1",
            "--lr",
            "0.005",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
            "--exporter",
            "legacy",
            "--distill",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert "trial 4" in text and "pruned" in text and str(out) in text
    m = json.loads((out / "metrics.json").read_text())
    assert m["trial"] == 4 and m["retrain"]["distill"] is True and 0.5 <= m["retrain"]["distill_alpha"] <= 0.9


@pytest.mark.parametrize("cell", ["/etc/hostname", "../elsewhere/model.pt", "models/../../x.pt"])
def test_a_received_trials_csv_cannot_name_a_model_outside_its_folder(study, tmp_path, cell):
    copy = tmp_path / "received"
    copy.mkdir()
    df = _trials(study)
    df["model"] = df["model"].astype(object)
    df.loc[:, "model"] = cell
    df.to_csv(copy / "trials.csv", index=False)
    with pytest.raises(AutopruneError, match="outside the results folder"):
        choose_trial(copy, "macs_frac<=0.6")
