"""Tests for ResRep: compactor insertion, the penalty rule, the mask schedule, the fold, the method."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import TensorSplit, randomise_bn
from torch import nn

import autoprune
from autoprune.engine.allocate import AllocationConfig, width_bounds
from autoprune.engine.graph import build_width_cost, find_groups
from autoprune.errors import AutopruneError, SpecError
from autoprune.methods import get_method, make_params
from autoprune.methods.compactor import ATTR, Compactors, find_sites
from autoprune.methods.resrep import MaskSchedule, ResRepParams
from autoprune.models.registry import ModelSpec, create_model
from autoprune.train import TrainConfig, evaluate


class Data:
    def __init__(self, n: int, shape: tuple[int, int, int], classes: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, classes, (n,), generator=g)
        x = torch.randn(n, *shape, generator=g) + y.view(-1, 1, 1, 1).float()
        self.train, self.val = TensorSplit(x, y), TensorSplit(x[: n // 4], y[: n // 4])
        self.num_classes, self.in_channels, self.image_size = classes, shape[0], shape[1]


def _attach(name: str, scaled: bool = False, seed: int = 0):
    spec = ModelSpec(name, 10, 1 if name == "small_cnn" else 3, 8 if name == "small_cnn" else 32)
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    torch.manual_seed(seed)
    model = randomise_bn(create_model(spec), seed)
    groups = find_groups(model, shape, check=False)
    sites, skipped = find_sites(model, groups, shape)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        before = model(x)
    comp = Compactors(model, sites, scaled=scaled)
    return model, groups, sites, skipped, comp, x, before


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name,scaled", [("small_cnn", False), ("small_cnn", True), ("resnet20", False),
                                         ("resnet20", True)])
def test_inserting_compactors_keeps_outputs(name, scaled):
    model, groups, sites, skipped, comp, x, before = _attach(name, scaled)
    assert not skipped and set(sites) == {g.name for g in groups if g.prunable}
    names = {n for n, _ in model.named_modules()}
    assert sum(1 for n in names if n.startswith(ATTR + ".")) == sum(len(v) for v in sites.values())
    with torch.no_grad():
        after = model(x)
    assert _rel(after, before) < 1e-6
    assert {id(p) for p in comp.parameters()} <= {id(p) for p in model.parameters()}  # fit trains them
    comp.fold()
    assert not hasattr(model, ATTR)
    with torch.no_grad():
        assert _rel(model(x), before) < 1e-6


@pytest.mark.parametrize("name", ["resnet56", "mobilenetv2"])
def test_fold_reproduces_compactor_model(name):
    model, _, sites, skipped, comp, x, before = _attach(name, scaled=True, seed=1)
    assert not skipped
    if name == "mobilenetv2":  # depthwise-tied groups get diagonal compactors after the depthwise BN
        assert any(s.diagonal for v in sites.values() for s in v)
    base_names = {n: type(m) for n, m in model.named_modules() if not n.startswith(ATTR)}
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in comp.layers.values():
            w = layer.weight
            layer.weight.add_(0.3 * torch.randn(w.shape, generator=g) / math.sqrt(w.shape[1]))
        with_compactors = model(x)
        comp.fold()
        folded = model(x)
    assert _rel(with_compactors, before) > 1e-2  # the random compactors matter
    assert _rel(folded, with_compactors) < 1e-5
    assert {n: type(m) for n, m in model.named_modules()} == base_names  # base architecture again
    assert not hasattr(model, ATTR)
    assert not any(m._forward_hooks for m in model.modules())


def test_fold_sets_bn_statistics_of_the_folded_channels():
    """The folded BN gets the new channels' mean (exact given true old statistics) and a variance
    estimate, so a fine-tune in train mode (batch statistics) starts near the eval-mode function."""
    model, _, sites, _, comp, x, _ = _attach("small_cnn")
    site = sites["features.0"][0]
    bn, conv = model.get_submodule(site.module), model.get_submodule(site.conv)
    x = torch.randn(512, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = conv(x)
        bn.running_mean.copy_(out.mean((0, 2, 3)))
        bn.running_var.copy_(out.var((0, 2, 3)))
        layer = comp.layers[site.module.replace(".", "__")]
        layer.weight.add_(0.1 * torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(4)))
        comp.fold()
        new = conv(x)
        assert torch.allclose(bn.running_mean, new.mean((0, 2, 3)), atol=1e-4)
        ratio = bn.running_var / new.var((0, 2, 3))
        assert ratio.min() > 0.5 and ratio.max() < 2.0
        assert torch.allclose(bn.weight, torch.sqrt(bn.running_var + bn.eps))
        eval_out = bn(new)
        bn.train()
        train_out = bn(new)
    assert _rel(train_out, eval_out) < 0.2


def _masked_compactors() -> tuple[torch.nn.Module, Compactors, torch.optim.Optimizer]:
    """small_cnn with compactors, channels 0..3 of every group masked, and an SGD with the compactors'
    own momentum group (not yet attached)."""
    torch.manual_seed(0)
    model = create_model(ModelSpec("small_cnn", 4, 1, 8))
    groups = find_groups(model, (1, 8, 8), check=False)
    sites, _ = find_sites(model, groups, (1, 8, 8))
    comp = Compactors(model, sites, momentum=0.99, nesterov=True)
    comp.set_masks({g: set(range(4)) for g in sites})
    own = comp.parameters()
    opt = torch.optim.SGD([{"params": [p for p in model.parameters() if all(p is not q for q in own)]},
                           {"params": own, "momentum": 0.99}], lr=0.05, momentum=0.9, nesterov=True)
    return model, comp, opt


def _penalty_run(forget: bool, steps: int = 24):
    """Train small_cnn's compactors with the penalty rule; channels 0..3 of every group are masked."""
    model, comp, opt = _masked_compactors()
    comp.attach_optimizer(opt)
    data = Data(32, (1, 8, 8))
    x, y = data.train.x, data.train.y
    start = {k: v.weight.detach().clone().reshape(v.weight.shape[0], -1) for k, v in comp.layers.items()}
    history = []
    for step in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        fraction = 1.0 / (steps - step) if forget else None
        comp.apply_penalty(1e-2, lr=0.05, forget=fraction)
        opt.step()
        history.append({k: v.weight.detach().clone().reshape(v.weight.shape[0], -1)
                        for k, v in comp.layers.items()})
    return start, history


@pytest.mark.parametrize("forget", [False, True])
def test_penalty_rule_masked_rows_shrink_unmasked_rows_learn(forget):
    start, history = _penalty_run(forget)
    for key, w0 in start.items():
        norms = torch.stack([h[key].norm(dim=1) for h in history])  # steps x rows
        masked = torch.cat([w0[:4].norm(dim=1).unsqueeze(0), norms[:, :4]])
        assert (masked[1:] < masked[:-1]).all(), f"{key}: masked rows must shrink at every step"
        final, late = history[-1][key], history[-2][key]
        # masked rows move only along themselves (no task gradient reaches them)
        cos = nn.functional.cosine_similarity(late[:4], w0[:4], dim=1)
        assert (cos > 1 - 1e-5).all()
        # unmasked rows learn: they turn away from where they started
        cos = nn.functional.cosine_similarity(final[4:], w0[4:], dim=1)
        assert (cos < 1 - 1e-4).any()
        if forget:  # driven to zero at the last step
            assert float(final[:4].norm(dim=1).max()) < 1e-6
        else:
            assert float(final[:4].norm(dim=1).min()) > 0.05


def test_masks_are_shared_by_the_compactors_of_a_residual_group():
    _, groups, sites, _, comp, *_ = _attach("resnet20")
    residual = next(g for g in groups if g.residual)
    assert len(sites[residual.name]) == len(residual.leaders) > 1
    comp.set_masks({residual.name: {1, 5}})
    for s in sites[residual.name]:
        mask = comp.masks[s.module.replace(".", "__")]
        assert mask[list(s.rows)][[1, 5]].eq(0).all() and int(mask.eq(0).sum()) == 2


def _schedule(target: float, steps: int, **kw):
    model = create_model(ModelSpec("small_cnn", 10, 1, 8))
    groups = [g for g in find_groups(model, (1, 8, 8), check=False) if g.prunable]
    cost = build_width_cost(model, groups, (1, 8, 8))
    alloc = AllocationConfig(min_ratio=0.25, normalise="none")
    bounds = {g.name: width_bounds(g, alloc) for g in groups}
    ones = {g.name: torch.ones(g.channels) for g in groups}
    return MaskSchedule(groups, cost, target, steps, ResRepParams(**kw), alloc, ones), groups, cost, bounds


def test_mask_schedule_warms_up_grows_and_meets_the_target_by_reach():
    sched, groups, cost, bounds = _schedule(0.4, 100, warmup=0.2, reach=0.6, growth=2)
    g = torch.Generator().manual_seed(0)
    scores = {gr.name: torch.rand(gr.channels, generator=g) for gr in groups}
    counts, met = [], None
    for step in range(100):
        if not sched.due(step):
            continue
        assert step >= 20  # nothing during warm-up
        masked = sched.update(scores, step)
        widths = {n: gr.channels - len(masked[n]) for n, gr in zip(sched.masked, groups)}
        assert all(widths[n] >= bounds[n][0] for n in widths)
        counts.append(sum(len(v) for v in masked.values()))
        if met is None and cost.macs(widths) <= 0.4 * cost.base_macs:
            met = step
    assert counts[0] > 0 and all(b >= a for a, b in itertools.pairwise(counts))
    assert len(counts) >= 8 and counts[0] < counts[-1]
    assert met is not None and met <= 60
    frac = cost.macs(widths) / cost.base_macs
    assert 0.39 <= frac <= 0.4


def test_mask_schedule_final_extends_an_unfinished_mask():
    sched, groups, cost, _ = _schedule(0.3, 10)
    scores = {gr.name: torch.arange(gr.channels, dtype=torch.float64) for gr in groups}
    masked = sched.final(scores)  # no update ran: the final mask is built from the scores alone
    widths = {gr.name: gr.channels - len(masked[gr.name]) for gr in groups}
    assert 0.29 <= cost.macs(widths) / cost.base_macs <= 0.3
    for gr in groups:  # the weakest (lowest-index) channels go first
        assert masked[gr.name] == set(range(len(masked[gr.name])))


def test_params_and_training_share():
    method = get_method("resrep")
    assert method.training_epochs(make_params(method, {}), 4) == 4  # default: the whole budget (paper)
    assert method.training_epochs(make_params(method, {"train_share": 0.75}), 4) == 3
    assert method.training_epochs(make_params(method, {"train_share": 0.1}), 2) == 1
    assert method.training_epochs(make_params(method, {}), 0) == 0
    with pytest.raises(SpecError, match="normalise"):
        make_params(method, {"normalise": "l2"})
    with pytest.raises(SpecError, match="warmup"):
        make_params(method, {"warmup": 0.8, "reach": 0.5})
    with pytest.raises(SpecError, match="prior 'bn' is unknown"):
        make_params(method, {"prior": "bn"})
    with pytest.raises(SpecError, match="set prior: none"):
        make_params(method, {"init": "scaled"})
    assert make_params(method, {"init": "scaled", "prior": "none"}).init == "scaled"


def test_prune_digits_meets_the_target_and_runs(digits, digits_base):
    model, spec = digits_base
    result = autoprune.prune(model, "resrep", 0.5, data=digits, spec=spec, train_cfg=TrainConfig(epochs=2))
    assert 0.49 <= result.macs_fraction <= 0.5
    assert result.info["groups_pruned"] >= 1 and result.info["steps"] == 18
    assert result.info["masked_norm_max"] < 1e-3  # masked rows were driven to zero before deletion
    assert not hasattr(result.model, ATTR)
    assert evaluate(result.model, digits.val, "cpu")["acc"] > 0.85
    assert not hasattr(model, ATTR) and model.features[0].out_channels == 16  # input model untouched


def test_epoch_readings_are_the_model_resrep_returns(digits, digits_base):
    """Each compactor epoch is read on the model ResRep would return at that point: the final mask of
    that point applied, BN statistics re-estimated. The last reading equals the returned model (up to
    the re-estimation's sampling), and a run stopped after epoch 1 returns what epoch 1 read."""
    model, spec = digits_base
    readings = []
    cfg = TrainConfig(epochs=3)
    result = autoprune.prune(model, "resrep", 0.4, data=digits, spec=spec, train_cfg=cfg,
                             on_epoch=lambda e, m: readings.append(m) or False)
    assert [r["epoch"] for r in readings] == [1, 2, 3] and not result.stopped_early
    assert result.trained_epochs == 3
    last = readings[-1]
    assert last["macs"] == result.macs and last["params"] == result.params
    assert last["val_acc"] == pytest.approx(evaluate(result.model, digits.val, "cpu")["acc"], abs=0.02)
    stopped = autoprune.prune(model, "resrep", 0.4, data=digits, spec=spec, train_cfg=cfg,
                              on_epoch=lambda e, m: True)
    assert stopped.stopped_early and stopped.trained_epochs == 1
    assert readings[0]["val_acc"] == pytest.approx(evaluate(stopped.model, digits.val, "cpu")["acc"], abs=0.02)
    assert readings[0]["macs"] == stopped.macs <= 0.4 * stopped.base_macs


def test_mid_training_reading_is_what_finalize_returns_at_that_point():
    """Issue 25: mid-training readings were near chance for runs that finished far above it. A reading
    taken while masked rows are not yet zero (forget_by 0.9) must be within a few points of the model
    finalize returns when training stops there, and well above chance."""
    data = Data(256, (3, 8, 8), classes=4)
    torch.manual_seed(0)
    model = create_model(ModelSpec("resnet20", 4, 3, 8))
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05)
    readings = []
    kw = {"data": data, "input_shape": (3, 8, 8), "train_cfg": cfg, "forget_by": 0.9, "reach": 0.3}

    def stop_at_2(epoch: int, metrics: dict) -> bool:
        readings.append(metrics)
        return epoch == 2

    result = autoprune.prune(model, "resrep", 0.5, on_epoch=stop_at_2, **kw)
    assert result.stopped_early and result.trained_epochs == 2
    final = evaluate(result.model, data.val, "cpu")["acc"]
    assert readings[-1]["val_acc"] == pytest.approx(final, abs=0.04)
    assert final > 0.5  # chance is 0.25
    assert readings[-1]["macs"] == result.macs


@pytest.mark.parametrize("restat,forget_by", [(True, 0.05), (True, 0.0), (False, 0.05)])
def test_restat_makes_the_engine_recalibration_keep_the_resrep_model(restat, forget_by):
    """The fold sets assumed BN variances; the engine's recalibration then replaces them and changes
    the function unless restat measured them first (and kept the function while doing so). With
    forget_by 0 masked rows are not zero at the end: the fold must still fold the masked model."""
    data = Data(128, (3, 8, 8))
    torch.manual_seed(0)
    model = create_model(ModelSpec("resnet20", 4, 3, 8))
    result = autoprune.prune(model, "resrep", 0.4, data=data, input_shape=(3, 8, 8), restat=restat,
                             forget_by=forget_by, train_cfg=TrainConfig(epochs=2, batch_size=32, lr=0.05),
                             recalibrate_batches=0)
    assert result.info["restat_images"] == (128 if restat else 0)
    x = data.train.x[:64]
    pruned = result.model.eval()
    with torch.no_grad():
        before = pruned(x)
    from autoprune.engine.calibrate import recalibrate_bn
    recalibrate_bn(pruned, data.train, batches=4, batch_size=32)
    with torch.no_grad():
        change = _rel(pruned(x), before)
    assert change < 0.05 if restat else change > 0.05


def test_residual_groups_pruned_with_shared_masks_and_rounding():
    data = Data(96, (3, 8, 8))
    model = create_model(ModelSpec("resnet20", 4, 3, 8))
    result = autoprune.prune(model, "resrep", 0.5, data=data, input_shape=(3, 8, 8),
                             train_cfg=TrainConfig(epochs=2, batch_size=32), allocation={"round_to": 2})
    assert 0.49 <= result.macs_fraction <= 0.5
    assert result.info["residual_groups"] == "pruned with shared masks"
    groups = {g.name: g for g in find_groups(model, (3, 8, 8), check=False)}
    assert any(groups[n].residual for n in result.plan.keep)
    assert all(len(k) % 2 == 0 for k in result.plan.keep.values())
    assert result.model(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_residual_false_leaves_residual_groups_and_errors():
    data = Data(64, (3, 8, 8))
    model = create_model(ModelSpec("resnet20", 4, 3, 8))
    result = autoprune.prune(model, "resrep", 0.7, data=data, input_shape=(3, 8, 8),
                             train_cfg=TrainConfig(epochs=1, batch_size=32), residual=False)
    groups = {g.name: g for g in find_groups(model, (3, 8, 8), check=False)}
    assert result.info["residual_groups"] == "left unpruned"
    assert result.plan.keep and not any(groups[n].residual for n in result.plan.keep)
    assert result.macs_fraction <= 0.7
    with pytest.raises(AutopruneError, match="unreachable"):
        autoprune.prune(model, "resrep", 0.02, data=data, input_shape=(3, 8, 8), residual=False)
    with pytest.raises(AutopruneError, match="data="):
        autoprune.prune(model, "resrep", 0.5, input_shape=(3, 8, 8))


def test_forced_forgetting_reads_the_optimizer_state_so_a_skipped_step_changes_nothing():
    """A GradScaler skips optimizer.step() on an fp16 overflow. The forced update reads the optimizer's
    real momentum buffer, so a skipped step leaves nothing stale: masked rows still reach zero on
    time (a mirrored buffer advanced on the skipped step left them at ~6e-3)."""
    model, comp, opt = _masked_compactors()
    with pytest.raises(ValueError, match="attach_optimizer"):
        comp.apply_penalty(1e-4, lr=0.05, forget=0.5)
    comp.attach_optimizer(opt)
    data = Data(32, (1, 8, 8))
    steps = 12
    for step in range(steps):
        loss = nn.functional.cross_entropy(model(data.train.x), data.train.y)
        opt.zero_grad()
        loss.backward()
        comp.apply_penalty(1e-4, lr=0.05, forget=1.0 / (steps - step))
        if step not in (3, 7):  # the scaler found an overflow: no step
            opt.step()
    for key, layer in comp.layers.items():
        rows = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        assert float(rows[:4].norm(dim=1).max()) < 1e-6, key


@pytest.mark.parametrize("mode", ["uniform", "searched"])
def test_resrep_honours_a_fixed_allocation_and_records_it(mode):
    from autoprune.engine.allocate import allocate

    data = Data(96, (3, 8, 8))
    model = create_model(ModelSpec("resnet20", 4, 3, 8))
    shape = (3, 8, 8)
    alloc = {"mode": mode, "multipliers": (0.5, 1.0, 1.5) if mode == "searched" else ()}
    cfg = TrainConfig(epochs=1, batch_size=32)
    result = autoprune.prune(model, "resrep", 0.5, data=data, input_shape=shape, train_cfg=cfg, allocation=alloc)
    groups = find_groups(model, shape)
    want = allocate([g for g in groups if g.prunable], None, build_width_cost(model, groups, shape), 0.5,
                    AllocationConfig(**alloc))
    want = {n: w for n, w in want.items() if w < next(g.channels for g in groups if g.name == n)}
    assert {n: len(k) for n, k in result.plan.keep.items()} == want
    assert result.info["allocation"] == mode
    glob = autoprune.prune(model, "resrep", 0.5, data=data, input_shape=shape, train_cfg=cfg,
                           allocation={"mode": "global"})
    assert glob.info["allocation"].startswith("global")
    assert {n: len(k) for n, k in glob.plan.keep.items()} != want


def test_resrep_reports_the_schedule_values_it_used(digits, digits_base):
    model, spec = digits_base
    result = autoprune.prune(model, "resrep", 0.5, data=digits, spec=spec, train_cfg=TrainConfig(epochs=1),
                             mask_interval=200, growth=4)
    info = result.info
    assert info["mask_interval"] < 200  # capped: a 9-step trial cannot wait 200 steps between updates
    assert info["mask_growth"] > 4  # raised: the target must be met by `reach`
    assert info["target_met_step"] is not None


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_resrep_under_cuda_amp_drives_masked_rows_to_zero(dtype, monkeypatch):
    """Mixed precision on a GPU (fp16 with a GradScaler that skips overflowing steps, or bf16):
    masked rows still reach zero before deletion, and the model is usable."""
    if dtype == "fp16":
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    data = Data(256, (3, 8, 8))
    model = create_model(ModelSpec("resnet20", 4, 3, 8))
    if dtype == "fp16":  # force one overflow: the scaler skips that step
        calls = {"n": 0}

        def overflow(grad: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            return grad * float("inf") if calls["n"] == 5 else grad

        model.fc.weight.register_hook(overflow)
    result = autoprune.prune(model, "resrep", 0.5, data=data, input_shape=(3, 8, 8), device="cuda",
                             train_cfg=TrainConfig(epochs=2, batch_size=32, amp=True))
    assert result.info["masked_norm_max"] < 1e-4
    assert 0.49 <= result.macs_fraction <= 0.5
    y = result.model(torch.randn(2, 3, 8, 8, device="cuda"))
    assert torch.isfinite(y).all()
