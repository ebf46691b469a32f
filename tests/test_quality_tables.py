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


def test_quality_compare_calls_a_shift_real_only_beyond_its_standard_error(tmp_path):
    import pandas as pd

    from autoprune.benchmarks.quality_compare import compare, main

    def run(shift):
        return pd.DataFrame([{"method": m, "target": 0.3, "seed": s, "val acc after FT": 0.85 + d + (shift if m == "b" else 0)}
                             for m in ("a", "b") for s, d in ((0, -0.002), (1, 0.0), (2, 0.002))])

    rows = {r["method"]: r for r in compare(run(0.0), run(0.03), n_val=3000)}
    assert rows["a"]["within 1 SE"] == "yes" and rows["b"]["within 2 SE"] == "no"
    assert rows["b"]["after - before (points)"] == "+3.00"
    # three seeds that agree to 0.2 points do not shrink the SE below the 3000-image binomial one
    assert float(rows["a"]["1 SE (points)"]) >= round(100 * (2 * 0.85 * 0.15 / 3000 / 3) ** 0.5, 2)
    run(0.0).to_csv(tmp_path / "a.csv", index=False)
    run(0.0).to_csv(tmp_path / "b.csv", index=False)
    assert main([str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--out", str(tmp_path), "--name", "c"]) == 0
    assert "Within 1 SE: 2 of 2 rows" in (tmp_path / "c.md").read_text()


def test_quality_compare_refuses_a_summary_table_in_one_line(tmp_path):
    import pandas as pd

    from autoprune.benchmarks.quality_compare import main

    pd.DataFrame([{"method": "a", "target": 0.3, "val acc after FT": "0.9159 ± 0.0018"}]).to_csv(tmp_path / "s.csv")
    pd.DataFrame([{"method": "a", "seed": 0}]).to_csv(tmp_path / "n.csv")
    for bad, words in (("s.csv", "holds no numbers"), ("n.csv", "no column 'target'"), ("gone.csv", "not found")):
        with pytest.raises(SystemExit) as exc:
            main([str(tmp_path / bad), str(tmp_path / "s.csv"), "--out", str(tmp_path)])
        assert words in str(exc.value) and "_seeds.csv" in str(exc.value)
