"""The quality benchmark's statistics: mean/sd over seeds and the two-standard-error verdict."""
from __future__ import annotations

import math

import pytest

from autoprune.benchmarks.quality_tables import accuracy_se, aggregate, summary


def _row(method, seed, before, recal, after, epochs="0+3"):
    return {"method": method, "target": 0.5, "seed": seed, "MACs frac": 0.49, "params frac": 0.5,
            "val acc before FT": before, "val acc after BN recal": recal, "val acc after FT": after,
            "epochs (train+FT)": epochs, "prune s": 1.0, "FT s": 2.0}


def test_accuracy_se_is_binomial():
    assert accuracy_se(0.9, 3000) == pytest.approx(math.sqrt(0.09 / 3000))
    assert accuracy_se(0.5, 100) == pytest.approx(0.05)


def test_aggregate_mean_and_sd_over_seeds():
    rows = [_row("autoprune l1", s, 0.5 + 0.1 * s, 0.8, 0.9) for s in range(3)]
    rows.append({"method": "tp x", "target": 0.5, "seed": 0, "error": "RuntimeError: boom"})
    agg = aggregate(rows)
    assert list(agg["method"]) == ["autoprune l1"]  # failed rows are left out
    r = agg.iloc[0]
    assert r["val acc before FT"] == pytest.approx(0.6)
    assert r["val acc before FT sd"] == pytest.approx(0.1)
    assert r["val acc after FT sd"] == 0 and r["seeds"] == 3


def test_summary_calls_a_large_gap_significant_and_a_small_one_noise():
    rows = []
    for s in range(3):
        rows += [_row("autoprune fsm", s, 0.80, 0.85, 0.900), _row("tp bnscale", s, 0.60, 0.84, 0.899),
                 _row("autoprune resrep", s, 0.95, 0.95, 0.95, epochs="2+1")]
    out = {r["stage"]: r for r in summary(aggregate(rows), n_val=3000, targets=[0.5])}
    assert out["before FT"]["beyond 2 SE"] == "yes"
    assert out["before FT"]["diff (points)"] == pytest.approx(20.0)
    assert "fsm" in out["before FT"]["autoprune best"]  # ResRep trained before surgery: not one-shot
    assert out["after BN recal"]["beyond 2 SE"] == "no"
    assert "resrep" in out["after FT"]["autoprune best"]  # after FT every configuration competes


def test_contrasts_compare_named_configurations_at_every_stage():
    from autoprune.benchmarks.quality_tables import contrasts

    rows = []
    for s in range(3):
        rows += [_row("autoprune lrf", s, 0.85, 0.90, 0.92), _row("autoprune lrf, no compensation", s, 0.40, 0.80, 0.92)]
    out = contrasts(aggregate(rows), 3000, [0.5], [("autoprune lrf", "autoprune lrf, no compensation"),
                                                    ("autoprune lrf", "missing")])
    assert [r["stage"] for r in out] == ["before FT", "after BN recal", "after FT"]
    assert out[0]["diff (points)"] == pytest.approx(45.0) and out[0]["beyond 2 SE"] == "yes"
    assert out[2]["beyond 2 SE"] == "no"
