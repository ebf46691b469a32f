"""The two-objective early-stopping rule and the screening rung: pure functions over finished trials."""
from __future__ import annotations

import math

import pytest

from autoprune.search.early_stop import (
    FINETUNE,
    Candidate,
    Peer,
    accuracy_se,
    margin_for,
    peer_accuracy,
    peers_at,
    position,
    schedule,
    screen_out,
    should_stop,
    threshold,
)

FT3 = schedule(3)
# (cost, per-epoch val acc) of finished 3-epoch fine-tune trials
FINISHED = [
    Peer(100.0, (0.50, 0.70, 0.80)),
    Peer(200.0, (0.60, 0.80, 0.90)),
    Peer(300.0, (0.65, 0.85, 0.95)),
    Peer(400.0, (0.70, 0.90, 0.97)),
]


def stop(cost, epoch, acc, finished=FINISHED, phases=FT3 + (FINETUNE,), **kw):
    """A 4-epoch trial by default, so epoch 3 is not its last; margin 0.02 unless given."""
    kw.setdefault("margin", 0.02)
    kw.setdefault("min_trials", 1)
    kw.setdefault("min_epochs", 1)
    return should_stop(cost, epoch, acc, finished, phases=phases, **kw)


def test_schedule_and_position():
    assert schedule(5, 3, "resrep") == ("train:resrep",) * 3 + (FINETUNE,) * 2
    assert position(schedule(5, 3, "resrep"), 2) == ("train:resrep", pytest.approx(2 / 3))
    assert position(schedule(5, 3, "resrep"), 4) == (FINETUNE, 0.5)
    assert position(schedule(20), 10) == (FINETUNE, 0.5)
    with pytest.raises(ValueError):
        position(schedule(3), 4)


def test_compares_only_with_cheaper_or_equal_trials_at_the_same_fraction():
    # a 3-epoch trial at epoch 2 (fraction 2/3): peers of cost 100 and 200 at their epoch 2
    assert peers_at(250.0, FINETUNE, 2 / 3, FINISHED) == pytest.approx([0.70, 0.80])
    assert threshold(250.0, FINETUNE, 2 / 3, FINISHED, margin=0.02, min_trials=1) == pytest.approx(0.78)
    assert stop(250.0, 2, 0.77, phases=FT3)
    assert not stop(250.0, 2, 0.79, phases=FT3)
    assert not stop(250.0, 2, 0.85, phases=FT3)  # the more accurate but more expensive trials do not count
    assert peers_at(200.0, FINETUNE, 1 / 3, FINISHED) == [0.50, 0.60]  # equal cost counts


def test_a_long_trial_is_judged_at_the_same_fraction_of_its_schedule_not_the_same_epoch():
    # a 6-epoch trial after epoch 3 is half-way (lr still high): the 3-epoch peers are read at fraction
    # 0.5, between their epochs 1 and 2 (interpolated), not at their annealed final epoch
    six = schedule(6)
    assert threshold(250.0, FINETUNE, 0.5, FINISHED, margin=0.0, min_trials=1) == pytest.approx(0.70)
    assert not stop(250.0, 3, 0.75, phases=six)  # the same-epoch rule would have stopped it (bar 0.88)
    assert stop(250.0, 3, 0.65, phases=six)
    # and at its epoch 6 (the end) it is never stopped
    assert not stop(250.0, 6, 0.0, phases=six)


def test_before_the_first_measured_fraction_a_peer_is_skipped_unless_its_fidelity_is_known():
    six = schedule(6)
    # fraction 1/6 < 1/3: no peer measured that early
    assert peers_at(250.0, FINETUNE, 1 / 6, FINISHED) == []
    assert not stop(250.0, 1, 0.0, phases=six)
    # with the fidelity as fraction 0 of the fine-tune phase, the peer is interpolated
    with_fid = [Peer(100.0, (0.5, 0.7, 0.8), fidelity=0.2)]
    assert peer_accuracy(with_fid[0], FINETUNE, 1 / 6) == pytest.approx(0.35)
    assert stop(250.0, 1, 0.3, finished=with_fid, phases=six)


def test_resrep_compactor_epochs_are_compared_only_with_resrep():
    rr = schedule(4, 3, "resrep")
    resrep_peer = Peer(100.0, (None, 0.6, 0.7, 0.9), phases=rr)
    other = Peer(100.0, (0.95, 0.97, 0.98, 0.99), phases=schedule(4))
    # a ResRep trial in its compactor phase: only the ResRep peer counts
    assert peers_at(200.0, "train:resrep", 2 / 3, [resrep_peer, other]) == [0.6]
    assert not stop(200.0, 2, 0.59, finished=[resrep_peer, other], phases=rr)
    assert stop(200.0, 2, 0.5, finished=[resrep_peer, other], phases=rr, judged_at_end=())
    assert not stop(200.0, 2, 0.5, finished=[resrep_peer, other], phases=rr)  # judged at its end only
    # the ResRep peer's 1-epoch fine-tune phase is fine-tune fraction 1.0
    assert peer_accuracy(resrep_peer, FINETUNE, 1.0) == 0.9
    # an l1 trial at fine-tune fraction 0.25 is not compared with ResRep's compactor epochs
    assert peers_at(200.0, FINETUNE, 0.25, [resrep_peer]) == []
    assert peers_at(200.0, FINETUNE, 0.25, [other]) == [0.95]


def test_needs_min_trials_peers():
    assert stop(150.0, 2, 0.5, min_trials=1)
    assert not stop(150.0, 2, 0.5, min_trials=2)
    assert stop(250.0, 2, 0.5, min_trials=2)
    assert not stop(250.0, 2, 0.5, min_trials=3)


def test_min_epochs_and_last_epoch():
    assert not stop(450.0, 1, 0.1, min_epochs=2)
    assert stop(450.0, 2, 0.1, min_epochs=2)
    assert not stop(450.0, 3, 0.1, phases=FT3)  # stopping at the last epoch saves nothing
    assert stop(450.0, 2, 0.1, phases=FT3)


def test_fixed_margin():
    four = schedule(4)  # fraction 0.5 of 4 epochs = fraction 0.5 of the 3-epoch peers: (0.70 + 0.90) / 2
    assert not stop(450.0, 2, 0.79, phases=four, margin=0.02)  # bar 0.78
    assert stop(450.0, 2, 0.77, phases=four, margin=0.02)
    assert not stop(450.0, 2, 0.77, phases=four, margin=0.05)


def test_automatic_margin_is_standard_errors_of_a_validation_accuracy():
    assert accuracy_se(0.9, 100) == pytest.approx(0.03)
    assert accuracy_se(1.0, 100) == pytest.approx(math.sqrt(0.01 * 0.99 / 100))  # clipped one image from 1
    assert margin_for(0.9, 100, None, 2.0) == pytest.approx(0.06)
    assert margin_for(0.9, 100, 0.01, 2.0) == 0.01  # a fixed margin wins
    # bar at epoch 2 (3-epoch trial) for cost 450: 0.90 - k * sqrt(0.9 * 0.1 / n)
    assert not stop(450.0, 2, 0.85, phases=FT3, margin=None, n_val=100, se_multiple=2.0)  # bar 0.84
    assert stop(450.0, 2, 0.85, phases=FT3, margin=None, n_val=10_000, se_multiple=2.0)  # bar 0.894
    assert stop(450.0, 2, 0.85, phases=FT3, margin=None, n_val=100)  # default one SE: bar 0.87
    with pytest.raises(ValueError, match="n_val"):
        stop(450.0, 2, 0.85, phases=FT3, margin=None)


def test_short_or_partial_curves_are_skipped_and_plain_tuples_are_accepted():
    finished = [(100.0, [0.9]), (100.0, [None, None, 0.9]), (100.0, [float("nan"), 0.5])]
    # a 2-epoch trial at epoch 1 (fraction 0.5): the 1-epoch peer has no point at or before 0.5
    # except... its only point is at 1.0; the 3-epoch peer has None until 1.0; the 2-epoch peer NaN
    assert peers_at(200.0, FINETUNE, 0.5, finished) == []
    assert peers_at(200.0, FINETUNE, 1.0, finished) == [0.9, 0.9, 0.5]


def test_nan_accuracy_stops_once_peers_exist():
    assert stop(450.0, 2, math.nan)
    assert not stop(50.0, 2, math.nan)  # no peer: nothing to compare with


def test_no_finished_trials():
    assert not stop(100.0, 1, 0.0, finished=[])
    assert threshold(100.0, FINETUNE, 0.5, [], min_trials=1) is None


def test_screen_keeps_the_best_share_of_each_cost_bucket():
    earlier = [Candidate(0.31, f) for f in (0.2, 0.4, 0.6, 0.8)] + [Candidate(0.55, 0.1)]
    # bucket [0.3, 0.4): 4 earlier candidates; keep 0.4 of 5 = top 2
    assert not screen_out(0.35, 0.9, earlier, keep=0.4)  # best
    assert not screen_out(0.35, 0.7, earlier, keep=0.4)  # second
    assert screen_out(0.35, 0.5, earlier, keep=0.4)  # third
    # another bucket: only one earlier candidate there, below min_peers: kept (explore)
    assert not screen_out(0.52, 0.0, earlier, keep=0.4)
    # a candidate is never screened out against candidates of another phase (ResRep after training)
    assert not screen_out(0.35, 0.0, earlier, keep=0.4, phase="train:resrep")
    assert not screen_out(0.35, 0.0, earlier, keep=1.0)  # keep everything
    assert screen_out(0.35, math.nan, earlier, keep=0.4)
    assert not screen_out(0.35, 0.81, earlier, keep=0.01) and screen_out(0.35, 0.79, earlier, keep=0.01)
    with pytest.raises(ValueError):
        screen_out(0.35, 0.5, earlier, keep=0.0)


def test_a_peer_a_fraction_of_a_percent_more_expensive_still_counts():
    """Trials at one MACs target land just above or below it; the one 0.5 % above still judges."""
    peers = [Peer(100.5, (0.90, 0.92, 0.93))]
    assert stop(100.0, 1, 0.80, finished=peers, phases=FT3)  # default tolerance 1 %
    assert not stop(100.0, 1, 0.80, finished=peers, phases=FT3, cost_tolerance=0.0)
    assert not stop(100.0, 1, 0.80, finished=[Peer(102.0, (0.90, 0.92, 0.93))], phases=FT3)  # 2 % dearer: not a peer


def test_screening_window_is_centred_on_the_candidate():
    """Candidates just below and just above one target share its window (fixed bins would split them)."""
    earlier = [Candidate(0.299, 0.9), Candidate(0.301, 0.8), Candidate(0.2995, 0.7)]
    assert screen_out(0.3005, 0.5, earlier, keep=0.3, bucket=0.1, min_peers=3)
    assert not screen_out(0.3005, 0.95, earlier, keep=0.3, bucket=0.1, min_peers=3)
    assert not screen_out(0.36, 0.5, earlier, keep=0.3, bucket=0.1, min_peers=3)  # 0.06 away: other window


def test_resrep_compactor_epochs_are_never_a_stopping_point():
    """Issue 25: a ResRep trial read 14 % after its first compactor epoch and finished at 59.4 %,
    5.7 points above the cheaper trial it was judged behind. Its training epochs are not judged."""
    phases = schedule(3, 3, "resrep")
    resrep_peer = Peer(100.0, (0.50, 0.55, 0.537), phases)
    finished = [resrep_peer, Peer(90.0, (0.40, 0.50, 0.537))]
    # near chance at its first compactor epoch, far below the ResRep peer's reading there
    assert not should_stop(100.0, 1, 0.14, finished, phases=phases, margin=0.01, min_trials=1)
    assert not should_stop(100.0, 2, 0.14, finished, phases=phases, margin=0.01, min_trials=1)
    # the same schedule for a method whose reading is honest mid-way is judged
    assert should_stop(100.0, 1, 0.14, [Peer(100.0, (0.5, 0.55, 0.6), schedule(3, 3, "other"))],
                       phases=schedule(3, 3, "other"), margin=0.01, min_trials=1)
    assert should_stop(100.0, 1, 0.14, finished, phases=phases, margin=0.01, min_trials=1, judged_at_end=())
    # ResRep's fine-tune epochs after the fold are judged like any other trial's
    mixed = schedule(4, 2, "resrep")
    assert should_stop(100.0, 3, 0.1, [Peer(100.0, (None, None, 0.6, 0.7), mixed)], phases=mixed, margin=0.01,
                       min_trials=1)


def test_a_trial_truly_ahead_at_the_end_is_not_stopped_by_noise():
    """With the automatic margin (standard errors on 3,000 images) a trial one or a few images behind a
    cheaper peer mid-way is not stopped; the margin is never one image."""
    peers = [Peer(100.0, (0.600, 0.650, 0.660))]
    n = 3000
    assert not stop(100.0, 1, 0.600 - 1 / n, peers, phases=FT3, margin=None, n_val=n)
    assert not stop(100.0, 1, 0.600 - 20 / n, peers, phases=FT3, margin=None, n_val=n)
    assert stop(100.0, 1, 0.600 - 40 / n, peers, phases=FT3, margin=None, n_val=n)  # beyond 1 SE (0.89 points)


def test_screening_acts_only_beyond_the_margin():
    """Issue 25: a candidate was screened out by one image in 3,000 (0.2327 vs 0.2330)."""
    earlier = [Candidate(0.3, 0.2330)]
    assert screen_out(0.3, 0.2327, earlier, keep=0.3, min_peers=1)  # the old rule: any difference
    assert not screen_out(0.3, 0.2327, earlier, keep=0.3, min_peers=1, n_val=3000, se_multiple=1.0)
    se = accuracy_se(0.20, 3000)
    assert not screen_out(0.3, 0.2330 - 0.9 * se, earlier, keep=0.3, min_peers=1, n_val=3000, se_multiple=1.0)
    assert screen_out(0.3, 0.2330 - 1.5 * se, earlier, keep=0.3, min_peers=1, n_val=3000, se_multiple=1.0)


def test_a_trial_is_not_screened_against_its_own_round_measurement():
    """The screening round measured (lrf, 0.2, global) at 0.513; the queued trial of that configuration
    reads 0.476 (another BN-recalibration draw): it is compared with the other methods, not itself."""
    from autoprune.search.early_stop import round_key

    key = round_key("lrf", 0.2, "global")
    earlier = [Candidate(0.2, 0.5133, config=key), Candidate(0.2, 0.3893, config=round_key("fsm", 0.2, "global")),
               Candidate(0.2, 0.30, config=round_key("l1", 0.2, "global"))]
    assert screen_out(0.2, 0.4763, earlier, keep=0.3, min_peers=1, n_val=3000, se_multiple=1.0)
    assert not screen_out(0.2, 0.4763, earlier, keep=0.3, min_peers=1, n_val=3000, se_multiple=1.0, config=key)
