"""Tests for autoprune.train: the loop, its hooks, the schedule, distillation, evaluate, devices."""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import replace

import pytest
import torch
from conftest import TensorSplit
from torch import nn

from autoprune.errors import AutopruneError
from autoprune.train import (
    Callbacks,
    FitResult,
    NonFiniteLoss,
    TrainConfig,
    amp_dtype_for,
    default_param_groups,
    evaluate,
    fit,
    lr_schedule,
    prefer_epoch,
    resolve_device,
    steps_per_epoch,
)


def blobs(n: int, seed: int, dim: int = 8, classes: int = 3) -> TensorSplit:
    """Well-separated Gaussian blobs: a linear classifier reaches ~100 %."""
    g = torch.Generator().manual_seed(1234)
    centres = torch.randn(classes, dim, generator=g) * 3.0
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + 0.5 * torch.randn(n, dim, generator=g)
    return TensorSplit(x, y)


def image_blobs(n: int, seed: int, classes: int = 3) -> TensorSplit:
    """Tiny noisy 1x6x6 images; class c has a bright quadrant c."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 6, 6, generator=g)
    for c in range(classes):
        r, k = divmod(c, 2)
        x[y == c, 0, 3 * r:3 * r + 3, 3 * k:3 * k + 3] += 2.0
    return TensorSplit(x, y)


def mlp(seed: int, dim: int = 8, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Linear(16, classes))


def small_cnn(seed: int, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, classes))


def agreement(a: nn.Module, b: nn.Module, split: TensorSplit) -> float:
    with torch.no_grad():
        return (a(split.x).argmax(1) == b(split.x).argmax(1)).float().mean().item()


CFG = TrainConfig(epochs=4, lr=0.1, batch_size=32, weight_decay=1e-4)


def test_fit_learns_separable_problem():
    train, val = blobs(256, seed=0), blobs(128, seed=1)
    model = mlp(0)
    assert evaluate(model, val, "cpu")["acc"] < 0.8  # not solved before training
    result = fit(model, train, val, CFG, "cpu")
    assert isinstance(result, FitResult)
    assert result.epochs_run == 4 and not result.stopped_early
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert set(result.history[0]) == {"epoch", "train_loss", "val_acc", "val_loss", "lr", "seconds",
                                     "distilled"}
    assert result.final_val_acc > 0.9
    assert result.best_val_acc == max(h["val_acc"] for h in result.history)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.final_val_acc == pytest.approx(evaluate(model, val, "cpu")["acc"])


def test_fit_learns_with_cnn_label_smoothing_and_warmup():
    train, val = image_blobs(256, seed=0), image_blobs(128, seed=1)
    cfg = TrainConfig(epochs=5, lr=0.1, batch_size=32, label_smoothing=0.1, warmup_epochs=0.5)
    result = fit(small_cnn(0), train, val, cfg, "cpu")
    assert result.final_val_acc > 0.9


def test_fit_is_deterministic_given_seed():
    train = blobs(100, seed=0)
    a, b, c = mlp(0), mlp(0), mlp(0)
    fit(a, train, None, TrainConfig(epochs=2, batch_size=16, seed=3), "cpu")
    fit(b, train, None, TrainConfig(epochs=2, batch_size=16, seed=3), "cpu")
    fit(c, train, None, TrainConfig(epochs=2, batch_size=16, seed=4), "cpu")
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_fit_without_val_reports_nan():
    result = fit(mlp(0), blobs(64, seed=0), None, TrainConfig(epochs=1, batch_size=16), "cpu")
    assert math.isnan(result.final_val_acc) and math.isnan(result.best_val_acc)
    assert math.isfinite(result.history[0]["train_loss"])


def test_on_epoch_end_stops_training():
    seen: list[tuple[int, dict]] = []

    def on_epoch_end(epoch: int, metrics: dict) -> bool:
        seen.append((epoch, metrics))
        return epoch == 2

    result = fit(mlp(0), blobs(64, seed=0), blobs(32, seed=1), TrainConfig(epochs=5, batch_size=16),
                 "cpu", Callbacks(on_epoch_end=on_epoch_end))
    assert result.epochs_run == 2 and result.stopped_early
    assert len(result.history) == 2 and [e for e, _ in seen] == [1, 2]
    assert 0.0 <= seen[-1][1]["val_acc"] <= 1.0


def test_after_backward_called_once_per_step_with_consecutive_steps():
    train = blobs(70, seed=0)  # 70 / 16 -> 5 steps per epoch, the last one short
    cfg = TrainConfig(epochs=3, batch_size=16)
    steps: list[int] = []
    grads_present: list[bool] = []

    def after_backward(model: nn.Module, step: int) -> None:
        steps.append(step)
        grads_present.append(all(p.grad is not None for p in model.parameters()))

    fit(mlp(0), train, None, cfg, "cpu", Callbacks(after_backward=after_backward))
    assert steps_per_epoch(70, 16) == 5
    assert steps == list(range(5 * 3))
    assert all(grads_present)


def test_after_backward_zeroing_grad_freezes_param_without_weight_decay():
    model = mlp(0)
    frozen = model[0].weight
    before = frozen.detach().clone()
    other_before = model[2].weight.detach().clone()

    def param_groups(m: nn.Module) -> list[dict]:
        rest = [p for p in m.parameters() if p is not frozen]
        return [{"params": rest}, {"params": [frozen], "weight_decay": 0.0, "momentum": 0.5}]

    def after_backward(m: nn.Module, step: int) -> None:
        m[0].weight.grad.zero_()

    cfg = TrainConfig(epochs=2, batch_size=16, weight_decay=1e-2)
    fit(model, blobs(64, seed=0), None, cfg, "cpu",
        Callbacks(after_backward=after_backward, param_groups=param_groups))
    assert torch.equal(frozen.detach(), before)
    assert not torch.equal(model[2].weight.detach(), other_before)


def test_default_groups_decay_conv_linear_weights_only():
    model = small_cnn(0)
    groups = default_param_groups(model, 0.1)
    decay = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decay == {id(model[0].weight), id(model[5].weight)}
    assert no_decay == {id(p) for p in model.parameters()} - decay


def test_fit_applies_weight_decay_only_where_grouped():
    # With every gradient zeroed only weight decay moves parameters.
    model = small_cnn(0)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}

    def zero_all(m: nn.Module, step: int) -> None:
        for p in m.parameters():
            p.grad.zero_()

    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.1, weight_decay=0.1)
    fit(model, image_blobs(64, seed=0), None, cfg, "cpu", Callbacks(after_backward=zero_all))
    for name, p in model.named_parameters():
        if name in ("0.weight", "5.weight"):
            assert p.detach().norm() < snapshot[name].norm()
        else:
            assert torch.equal(p.detach(), snapshot[name]), name


def test_huge_lr_raises_non_finite_loss():
    cfg = TrainConfig(epochs=3, lr=1e12, batch_size=16)
    with pytest.raises(NonFiniteLoss, match=r"(nan|inf) at epoch \d+ step \d+") as info:
        fit(mlp(0), blobs(64, seed=0), None, cfg, "cpu")
    assert isinstance(info.value, AutopruneError)
    assert "learning rate" in str(info.value) and "\n" not in str(info.value)


def test_inf_output_raises_non_finite_loss_at_first_step():
    class InfModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 3)

        def forward(self, x):
            return self.lin(x) * float("inf")

    with pytest.raises(NonFiniteLoss, match=r"at epoch 1 step 1 "):
        fit(InfModel(), blobs(32, seed=0), None, TrainConfig(epochs=1, batch_size=16), "cpu")


def test_distillation_moves_student_toward_teacher():
    train, val = blobs(256, seed=0), blobs(128, seed=1)
    teacher = mlp(0)
    fit(teacher, train, val, CFG, "cpu")
    teacher_copy = copy.deepcopy(teacher)
    # Labels are replaced by noise: with alpha=1 the student can only learn from the teacher.
    noisy = TensorSplit(train.x, torch.randint(0, 3, (len(train),), generator=torch.Generator().manual_seed(9)))
    student = mlp(1)
    before = agreement(student, teacher, val)
    teacher.train()  # fit must run the teacher in eval mode and restore this afterwards
    cfg = TrainConfig(epochs=4, lr=0.1, batch_size=32, distill_alpha=1.0, distill_temperature=2.0)
    fit(student, noisy, None, cfg, "cpu", teacher=teacher)
    after = agreement(student, teacher, val)
    assert before < 0.8 and after > 0.95
    assert teacher.training
    for p, q in zip(teacher.parameters(), teacher_copy.parameters()):
        assert torch.equal(p, q) and p.grad is None


def test_distillation_stops_once_the_student_reaches_its_teacher():
    """``distill_until``: after the first epoch whose val reading reaches it, the teacher is no longer run
    (cross-entropy alone); without it every epoch distils; a value outside [0, 1] is refused."""
    calls = []

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(0)

        def forward(self, x):
            calls.append(len(x))
            return self.net(x)

    train, val = blobs(64, seed=0), blobs(64, seed=1)
    cfg = TrainConfig(epochs=3, lr=0.1, batch_size=32, distill_alpha=0.5)
    run = fit(mlp(1), train, val, replace(cfg, distill_until=0.0), "cpu", teacher=Counting())
    assert [h["distilled"] for h in run.history] == [True, False, False] and len(calls) == 2  # epoch 1's 2 steps
    calls.clear()
    run = fit(mlp(1), train, val, cfg, "cpu", teacher=Counting())
    assert [h["distilled"] for h in run.history] == [True] * 3 and len(calls) == 6
    calls.clear()
    above = max(h["val_acc"] for h in run.history) + 1e-6  # never reached: the teacher stays every epoch
    assert above <= 1.0, "the blobs must not be learnt perfectly for this check"
    run = fit(mlp(1), train, val, replace(cfg, distill_until=above), "cpu", teacher=Counting())
    assert [h["distilled"] for h in run.history] == [True] * 3 and len(calls) == 6
    with pytest.raises(AutopruneError, match="distill_until"):
        TrainConfig(distill_until=1.5)


def test_teacher_runs_in_eval_mode_without_grad():
    calls: list[tuple[bool, bool]] = []

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(0)

        def forward(self, x):
            calls.append((self.training, torch.is_grad_enabled()))
            return self.net(x)

    teacher = Spy().train()
    cfg = TrainConfig(epochs=1, batch_size=16, distill_alpha=0.5)
    fit(mlp(1), blobs(32, seed=0), None, cfg, "cpu", teacher=teacher)
    assert calls == [(False, False)] * 2
    assert teacher.training


def test_fit_leaves_global_rng_untouched():
    model = mlp(0)  # seeds the global RNG itself, so build it first
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    fit(model, blobs(32, seed=0), None, TrainConfig(epochs=1, batch_size=16, seed=11), "cpu")
    assert torch.equal(torch.rand(3), expected)


def test_distillation_needs_teacher():
    with pytest.raises(AutopruneError, match="teacher"):
        fit(mlp(0), blobs(32, seed=0), None, TrainConfig(epochs=1, distill_alpha=0.5), "cpu")


def test_cosine_schedule_endpoints():
    cfg = TrainConfig(epochs=5, lr=0.2)
    lr_at = lr_schedule(cfg, steps_per_epoch=20)
    lrs = [lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.2)
    assert lrs[-1] < 1e-3 * 0.2
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    assert lrs[50] == pytest.approx(0.1)


def test_warmup_schedule_is_linear_then_cosine():
    cfg = TrainConfig(epochs=4, lr=0.2, warmup_epochs=0.5)
    lr_at = lr_schedule(cfg, steps_per_epoch=20)  # 10 warm-up steps
    assert [lr_at(s) for s in range(10)] == pytest.approx([0.02 * (s + 1) for s in range(10)])
    assert lr_at(10) == pytest.approx(0.2)
    assert lr_at(79) < 1e-3 * 0.2


def test_fit_uses_the_schedule_per_step():
    # A probe parameter with grad 1, no momentum and no decay moves by exactly the step's lr.
    model = mlp(0)
    probe = nn.Parameter(torch.zeros(()))
    values: list[float] = []

    def param_groups(m: nn.Module) -> list[dict]:
        return default_param_groups(m, 0.0) + [{"params": [probe], "momentum": 0.0, "weight_decay": 0.0}]

    def after_backward(m: nn.Module, step: int) -> None:
        values.append(probe.item())
        probe.grad = torch.ones(())

    cfg = TrainConfig(epochs=3, lr=0.5, batch_size=16, warmup_epochs=1.0)
    result = fit(model, blobs(64, seed=0), None, cfg, "cpu",
                 Callbacks(after_backward=after_backward, param_groups=param_groups))
    values.append(probe.item())
    used = [a - b for a, b in itertools.pairwise(values)]
    lr_at = lr_schedule(cfg, steps_per_epoch(64, 16))
    assert used == pytest.approx([lr_at(s) for s in range(12)], rel=1e-5)
    assert used[3] == pytest.approx(0.5)  # end of the one-epoch warm-up
    assert result.history[-1]["lr"] == pytest.approx(used[-1], rel=1e-5)


def test_evaluate_restores_mode_and_counts_correctly():
    split = TensorSplit(torch.randn(10, 8), torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2]))

    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return torch.tensor([0.0, 5.0, 0.0]).expand(len(x), 3) + 0 * self.head(self.bn(x))

    model = Constant()
    model.train()
    out = evaluate(model, split, "cpu", batch_size=3)
    assert out["acc"] == pytest.approx(0.4)
    logits = torch.tensor([0.0, 5.0, 0.0]).expand(10, 3)
    assert out["loss"] == pytest.approx(nn.functional.cross_entropy(logits, split.y).item(), rel=1e-6)
    assert model.training and model.bn.training
    assert model.bn.num_batches_tracked.item() == 0  # ran in eval mode
    model.eval()
    model.bn.train()  # mixed modes come back exactly
    evaluate(model, split, "cpu")
    assert not model.training and model.bn.training and not model.head.training


def test_steps_per_epoch():
    assert steps_per_epoch(64, 16) == 4
    assert steps_per_epoch(65, 16) == 5
    assert steps_per_epoch(1, 128) == 1


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(AutopruneError, match="--device cuda requested but no CUDA device is available"):
        resolve_device("cuda")
    with pytest.raises(AutopruneError, match="no CUDA device"):
        resolve_device("cuda:1")
    with pytest.raises(AutopruneError, match="unknown device"):
        resolve_device("banana")


def test_invalid_config_names_the_setting():
    with pytest.raises(AutopruneError, match="lr"):
        TrainConfig(lr=0.0)
    with pytest.raises(AutopruneError, match="distill_alpha"):
        TrainConfig(distill_alpha=1.5)


def test_progress_goes_to_the_installed_reporter_only(capsys):
    import io

    from autoprune import progress
    from autoprune.progress_view import LineReporter

    train = blobs(32, seed=0)
    fit(mlp(0), train, None, TrainConfig(epochs=1, batch_size=16), "cpu", progress=True)
    assert capsys.readouterr().err == ""  # the library never prints: no reporter, no output
    out = io.StringIO()
    with progress.use(LineReporter(out, grace=0)):
        fit(mlp(0), train, None, TrainConfig(epochs=2, batch_size=16), "cpu", progress="base mlp on blobs")
    lines = out.getvalue().splitlines()
    assert "base mlp on blobs ..." in lines[0]  # says what it trains
    assert any("base mlp on blobs > epoch 2/2 done in" in line and "val_acc" in line for line in lines)
    assert "\r" not in out.getvalue() and len(lines) == 4  # start, one line per epoch, end


def test_best_epoch_tie_keeps_training_instead_of_discarding_it():
    kept = (0, 0.9972, 0.020, "start")  # epoch 0: the trial's weights, as retrain offers them first
    history = [(1, 0.9944, 0.030), (2, 0.9972, 0.015), (3, 0.9972, 0.015), (4, 0.9972, 0.018)]
    for epoch, acc, loss in history:
        reason = prefer_epoch(acc, loss, kept[1], kept[2])
        if reason:
            kept = (epoch, acc, loss, reason)
    assert kept[0] == 3 and "later epoch" in kept[3]  # not epoch 0: same accuracy, lower loss, then newer
    assert prefer_epoch(0.99, 0.5, 0.98, 0.01) == "highest val accuracy"
    assert prefer_epoch(0.97, 0.001, 0.98, 0.5) is None
    assert "lower val loss" in prefer_epoch(0.98, 0.1, 0.98, math.nan)
    assert prefer_epoch(0.98, math.nan, 0.98, 0.1) is None


def test_augmentation_ops_and_per_data_set_defaults():
    from autoprune.data.datasets import augment_batch, default_augmentation, parse_augmentation

    x = torch.randn(64, 1, 28, 28)
    crop_only = augment_batch(x, torch.Generator().manual_seed(0), ("crop",))
    flips = augment_batch(x, torch.Generator().manual_seed(0), ("flip",))
    unchanged = sum(torch.equal(a, b) for a, b in zip(flips, x))
    mirrored = sum(torch.equal(a, b.flip(-1)) for a, b in zip(flips, x))
    assert unchanged + mirrored == 64 and 10 < mirrored < 54
    assert not any(torch.equal(a, b.flip(-1)) for a, b in zip(crop_only, x))  # 28 px digits never mirrored
    assert torch.equal(augment_batch(x, torch.Generator().manual_seed(0), ()), x)
    assert default_augmentation("digits") == default_augmentation("mnist") == ("crop",)
    assert default_augmentation("cifar10") == default_augmentation("imagefolder:/d") == ("crop", "flip")
    assert parse_augmentation("auto", "mnist") == ("crop",) and parse_augmentation(None, "cifar10") == ()
    assert parse_augmentation("flip, crop", "digits") == ("flip", "crop")
    assert parse_augmentation("none", "cifar10") == () and parse_augmentation(True, "cifar100") == ("crop", "flip")
    with pytest.raises(AutopruneError, match="unknown augmentation 'rotate'"):
        parse_augmentation("crop,rotate", "digits")


def test_fit_with_named_augmentations_matches_split_batches():
    seen = []

    class Recording(TensorSplit):
        def batches(self, batch_size, shuffle=False, generator=None, augment=False):
            seen.append(augment)
            yield from super().batches(batch_size, shuffle, generator, augment)

    cfg = TrainConfig(epochs=1, batch_size=16, augment=["crop"])
    assert cfg.augment == ("crop",)  # a YAML/JSON list becomes a tuple: the config stays hashable
    fit(mlp(0), Recording(blobs(32, 0).x, blobs(32, 0).y), None, cfg, "cpu")
    assert seen == [("crop",)]


def test_amp_dtype_picks_the_autocast_precision(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert amp_dtype_for(TrainConfig(amp_dtype="fp16"), cpu) is None  # CPU trains in fp32 whatever is asked
    assert amp_dtype_for(TrainConfig(amp=False, amp_dtype="bf16"), cuda) is None
    assert amp_dtype_for(TrainConfig(amp_dtype="fp16"), cuda) is torch.float16
    assert amp_dtype_for(TrainConfig(amp_dtype="bf16"), cuda) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert amp_dtype_for(TrainConfig(), cuda) is torch.float16  # auto: fp16 where bf16 is not supported
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert amp_dtype_for(TrainConfig(), cuda) is torch.bfloat16
    with pytest.raises(AutopruneError, match="amp_dtype='fp8' is invalid; it must be one of auto, bf16, fp16"):
        TrainConfig(amp_dtype="fp8")
