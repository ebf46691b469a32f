"""The latency-vs-MACs search comparison of benchmarks.latency_search: speed-up at equal accuracy and its tables."""
from __future__ import annotations

import csv
from types import SimpleNamespace

import numpy as np
import pytest

from autoprune.benchmarks.latency_search_runs import _compare, speedups


def test_speedup_is_against_the_fastest_model_within_one_standard_error():
    lat = np.array([[0.90, 0.80], [0.88, 0.60], [0.70, 0.40]])  # (val acc, latency fraction)
    macs_front = np.array([[0.90, 0.96], [0.95, 0.99]])
    # 0.90: SE on 3,000 images is 0.0055, so 0.88 is too far below and 0.80 is the fastest allowed;
    # 0.95: no latency model within one SE, so no comparison
    assert speedups(lat, macs_front, 3000) == [pytest.approx(0.96 / 0.80)]
    assert speedups(lat, np.array([[0.885, 0.9]]), 3000) == [pytest.approx(0.9 / 0.60)]
    assert speedups(np.zeros((0, 2)), macs_front, 3000) == []


def test_the_comparison_writes_every_model_and_says_whether_the_goal_is_met(tmp_path):
    args = SimpleNamespace(out=str(tmp_path), name="ls", search_case="digits", search_base=None, trials=2,
                           round_to=1)
    b = SimpleNamespace(data=SimpleNamespace(val=[0] * 3000, train=[0] * 100), base_acc=0.92,
                        case=SimpleNamespace(model="small_cnn", epochs=1))
    rows = {"latency": [{"number": 0, "val_acc": 0.90, "macs_frac": 0.3, "latency_frac": 0.62},
                        {"number": 1, "val_acc": 0.80, "macs_frac": 0.1, "latency_frac": 0.41}],
            "macs": [{"number": 0, "val_acc": 0.90, "macs_frac": 0.5, "latency_frac": None}]}
    ms = [2.0, 1.2, 0.8, 1.8]  # base, then each model in order
    table, _ = _compare(args, b, rows, ms, 0.35, 1)
    lat_row, macs_row = table.rows
    assert lat_row["complete trials"] == 2 and macs_row["complete trials"] == 1
    assert lat_row["fastest front model (lat frac)"] == pytest.approx(0.4)
    assert lat_row["hypervolume (acc x latency frac)"] > macs_row["hypervolume (acc x latency frac)"]
    assert any("median 1.50x" in n for n in table.notes)  # 0.9 / 0.6
    with open(tmp_path / "ls_points.csv") as f:
        points = list(csv.DictReader(f))
    assert [(p["search"], p["trial"]) for p in points] == [("latency", "0"), ("latency", "1"), ("macs", "0")]
    assert [float(p["latency frac (re-measured)"]) for p in points] == pytest.approx([0.6, 0.4, 0.9])
    assert (tmp_path / "ls_fronts.png").stat().st_size > 0


@pytest.mark.parametrize("channels", [3, 8, 16, 24, 64, 96, 160, 1280])
@pytest.mark.parametrize("f", [0.75, 0.5, 0.3])
def test_the_align_part_compares_a_multiple_of_8_with_one_channel_below_it(channels, f):
    from autoprune.benchmarks.latency_align import variant_widths

    w = variant_widths(channels, f)
    assert all(1 <= v <= channels for v in w.values())
    assert w["r8"] % 8 == 0 or w["r8"] == channels  # a group under 8 channels keeps all of them
    assert w["r8 - 1"] == max(1, w["r8"] - 1) and w["as is"] == max(1, round(f * channels))
    assert abs(w["r8"] - f * channels) <= 4 or channels < 8 or w["r8"] == 8


def test_the_align_part_writes_its_table(tmp_path, monkeypatch):
    from autoprune.benchmarks import latency_align, latency_search

    monkeypatch.setattr(latency_align, "FRACTIONS", (0.5,))
    monkeypatch.setattr(latency_align, "runtimes", lambda: ["torch"])
    assert latency_search.main(["--parts", "align", "--models", "resnet56", "--batches", "1", "--thread-counts",
                                "1", "--rounds", "1", "--out", str(tmp_path), "--name", "a"]) == 0
    md = (tmp_path / "a.md").read_text()
    assert "Width rounding: on and off a multiple of 8" in md and "| resnet56 (32) | torch | 1 | 1 |" in md


@pytest.mark.slow
def test_the_targets_part_times_each_round_to_in_one_run(tmp_path):
    from autoprune.benchmarks import latency_search

    assert latency_search.main(["--parts", "targets", "--models", "resnet56", "--batches", "1", "--thread-counts", "1",
                                "--rounds", "1", "--points", "2", "--feedback", "0", "--targets", "0.7",
                                "--round-to", "1", "8", "--out", str(tmp_path), "--name", "t"]) == 0
    with open(tmp_path / "t_targets.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["round_to"] for r in rows] == ["1", "8"]
    for r in rows:
        assert float(r["predicted"]) <= 0.7 + 1e-6 and float(r["latency frac"]) > 0


def test_the_search_part_takes_one_round_to(capsys):
    from autoprune.benchmarks import latency_search

    with pytest.raises(SystemExit) as exc:
        latency_search.main(["--parts", "search", "--round-to", "1", "8"])
    assert exc.value.code == 2 and "the search part takes one value" in capsys.readouterr().err


def test_each_timing_lands_on_its_row_also_around_an_unreachable_target(monkeypatch):
    """The targets part times every model of a (model, batch, threads) in one run and maps the timings
    back: base, latency-targeted models per (target, round_to), then the variants, in that order."""
    from torch import nn

    from autoprune.benchmarks import latency_search as ls
    from autoprune.errors import AutopruneError

    class Tag(nn.Module):
        def __init__(self, key):
            super().__init__()
            self.key = key

    ms = {"base": 10.0, ("lat", 0.7, 1): 7.1, ("lat", 0.7, 8): 6.8, ("lat", 0.5, 1): 5.3, ("macs", 0.7): 9.0,
          ("macs", 0.5): 8.0}
    macs = {"base": 100.0, ("lat", 0.7, 1): 60.0, ("lat", 0.7, 8): 55.0, ("lat", 0.5, 1): 30.0}

    def prune(model, method, t, allocation, **kw):
        if (t, allocation["round_to"]) == (0.5, 8):
            raise AutopruneError("below the floor")
        return SimpleNamespace(model=Tag(("lat", t, allocation["round_to"])), info={"predicted_frac": t - 0.001})

    def variants(model, shape, groups, fracs, kinds=("macs", "tp8"), tag=""):
        (f,) = fracs
        ms.update({(k + tag, f): 10 * f + (0.5 if k == "macs" else 0.2) for k in kinds})
        return [(k + tag, f, Tag((k + tag, f))) for k in kinds]

    monkeypatch.setattr(ls.engine, "prune", prune)
    monkeypatch.setattr(ls, "_macs_variants", variants)
    monkeypatch.setattr(ls, "count_macs", lambda m, shape: macs[getattr(m, "key", "base")])
    monkeypatch.setattr(ls, "measure_models", lambda models, *a: [ms[getattr(m, "key", "base")] for m in models])
    cfg = SimpleNamespace(runtime="torch", batch_size=1, n_threads=1, clock="cpu")
    fixed = [("macs", t, Tag(("macs", t))) for t in (0.7, 0.5)]
    rows = ls._target_rows("m", nn.Identity(), (3, 8, 8), [], None, cfg, [0.7, 0.5], fixed, 0, [1, 8])
    got = {(r["target"], r["round_to"]): r for r in rows}
    assert list(got) == [(0.7, 1), (0.7, 8), (0.5, 1), (0.5, 8)]
    assert got[(0.7, 1)]["latency frac"] == pytest.approx(0.71) and got[(0.7, 8)]["latency frac"] == pytest.approx(0.68)
    assert got[(0.5, 1)]["latency frac"] == pytest.approx(0.53) and got[(0.5, 1)]["in band"] == "yes"
    assert np.isnan(got[(0.5, 8)]["latency frac"]) and got[(0.5, 8)]["in band"] == "no"
    # same MACs as each latency-targeted model: L1 at 0.55 of the MACs timed 6.0 ms, TP r8 5.7 ms
    assert got[(0.7, 8)]["its MACs frac"] == pytest.approx(0.55)
    assert got[(0.7, 8)]["same MACs: L1 lat frac"] == pytest.approx(0.60)
    assert got[(0.7, 8)]["same MACs: TP r8 lat frac"] == pytest.approx(0.57)
    assert got[(0.5, 1)]["same MACs: TP r8 lat frac"] == pytest.approx(0.32)
    assert [got[k]["MACs target = target: lat frac"] for k in got] == pytest.approx([0.9, 0.9, 0.8, 0.8])


def test_the_targets_note_counts_feedback_only_over_rows_that_ran_it():
    from autoprune.benchmarks.latency_search import _target_table

    row = {"in band": "yes", "feedback: in band": "-"}
    assert "no row ran feedback" in _target_table([row, dict(row, **{"in band": "no"})], "").notes[-1]
    ran = [dict(row, **{"feedback: in band": "yes"}), dict(row, **{"feedback: in band": "no"}), row,
           dict(row, **{"feedback: in band": "refused"})]
    assert _target_table(ran, "").notes[-1].startswith("In band: 4 of 4 rows; with feedback 1 of the 3 rows that ran it")
