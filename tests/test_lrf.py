"""LRF: leave-one-out algebra, greedy updates, exact compensation, and the engine on real models."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import model_input, randomise_bn
from torch import nn

import autoprune
from autoprune.engine.allocate import AllocationConfig
from autoprune.engine.graph import build_width_cost, find_groups
from autoprune.engine.plan import Plan, apply_plan
from autoprune.methods import PruneContext, get_method, make_params
from autoprune.methods.lrf import greedy_order, joint_fit, loo_fit, loo_residuals, ridge_inverse
from autoprune.models.registry import create_model


def _augmented(u: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows ``[u_k, sqrt(eps) e_k]``: plain least squares on them is the ridge fit."""
    return torch.cat([u, eps ** 0.5 * torch.eye(u.shape[0], dtype=u.dtype)], 1)


def _absolute_eps(u: torch.Tensor, eps: float) -> float:
    return eps * float((u * u).sum(1).mean())


def _fit(aug: torch.Tensor, k: int, others: list[int]) -> tuple[torch.Tensor, float]:
    """Brute force: least-squares coefficients of row k on rows ``others`` and the squared residual."""
    a = aug[others].T
    coef = torch.linalg.lstsq(a, aug[k]).solution
    return coef, float((aug[k] - a @ coef).pow(2).sum())


# --------------------------------------------------------------------------- linear algebra


@pytest.mark.parametrize("n,d", [(6, 20), (9, 5)])  # full rank, and more filters than dimensions
def test_loo_scores_and_coefficients_equal_brute_force_ridge_least_squares(n, d):
    g = torch.Generator().manual_seed(n)
    u = torch.randn(n, d, generator=g, dtype=torch.float64)
    eps = 1e-2
    p = ridge_inverse(u, eps)
    residual, coef = loo_fit(p)
    torch.testing.assert_close(loo_residuals(u, eps), residual, rtol=1e-10, atol=0)
    aug = _augmented(u, _absolute_eps(u, eps))
    for k in range(n):
        others = [j for j in range(n) if j != k]
        want_coef, want_res = _fit(aug, k, others)
        assert residual[k].item() == pytest.approx(want_res, rel=1e-9)
        torch.testing.assert_close(coef[others, k], want_coef, rtol=1e-8, atol=1e-10)
        assert coef[k, k] == 0
        # the same numbers from the textbook ridge formula, without the augmentation trick
        lam = _absolute_eps(u, eps)
        gram = u[others] @ u[others].T + lam * torch.eye(n - 1, dtype=u.dtype)
        ridge = torch.linalg.solve(gram, u[others] @ u[k])
        torch.testing.assert_close(coef[others, k], ridge, rtol=1e-8, atol=1e-10)


def _greedy_from_scratch(u, v, eps, n_remove, step, compensate):
    """Reference: refit every leave-one-out ridge fit from scratch at every step and compensate
    the consumer slices one channel at a time (v_j += lambda_j v_k)."""
    aug = _augmented(u, _absolute_eps(u, eps))
    v = v.clone()
    norms = v.pow(2).sum(1)
    alive, order = list(range(u.shape[0])), []
    while len(order) < n_remove:
        scores = {}
        for k in alive:
            _, res = _fit(aug, k, [j for j in alive if j != k])
            scores[k] = res * float(v[k].pow(2).sum() if compensate else norms[k])
        chosen = sorted(alive, key=scores.__getitem__)[: min(step, n_remove - len(order))]
        for k in chosen:  # within a step, removed one at a time with fresh fits
            others = [j for j in alive if j != k]
            coef, _ = _fit(aug, k, others)
            if compensate:
                v[others] += coef[:, None] * v[k]
            alive.remove(k)
            order.append(k)
    return order, v


@pytest.mark.parametrize("block", [2, 128])  # fold the low-rank factors often / never
@pytest.mark.parametrize("step", [1, 3])
@pytest.mark.parametrize("compensate", [True, False])
def test_greedy_with_rank_one_updates_equals_refitting_from_scratch(step, compensate, block):
    g = torch.Generator().manual_seed(3)
    n, d, m, eps = 12, 7, 10, 1e-3  # n > d: several filters are exactly replaceable
    u = torch.randn(n, d, generator=g, dtype=torch.float64)
    v = torch.randn(n, m, generator=g, dtype=torch.float64)
    v *= torch.linspace(0.5, 2, n, dtype=torch.float64)[:, None]  # consumer norms differ
    p = ridge_inverse(u, eps)
    order = greedy_order(p, v @ v.T, 8, step, compensate, block=block)
    want_order, want_v = _greedy_from_scratch(u, v, eps, 8, step, compensate)
    if step == 1:
        assert order == want_order
    else:  # within a step the removal order is free; the removed set after each step is not
        for i in range(0, 8, step):
            assert set(order[i:i + step]) == set(want_order[i:i + step])
    if compensate:  # the chained one-at-a-time compensation is one joint ridge fit on the kept set
        keep = torch.tensor(sorted(set(range(n)) - set(order)))
        removed = torch.tensor(sorted(order))
        coef, _ = joint_fit(p, keep, removed, torch.zeros(n, dtype=torch.float64))
        torch.testing.assert_close(v[keep] + coef @ v[removed], want_v[keep], rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------- exact compensation


class _Toy(nn.Module):
    """conv -> BN -> consumer with nothing nonlinear in between (``branches`` leaders summed)."""

    def __init__(self, consumer: str, branches: int = 1) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, 6, 3, padding=1, bias=False) for _ in range(branches))
        self.bns = nn.ModuleList(nn.BatchNorm2d(6) for _ in range(branches))
        self.consumer_kind = consumer
        if consumer == "linear":  # Linear after flatten reads each channel at 4 positions
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5))
        else:  # padding 0: a constant input shift is exactly a constant output shift
            self.conv2 = nn.Conv2d(6, 5, 3, padding=0, bias=False)
            self.bn2 = nn.BatchNorm2d(5) if consumer == "conv+bn" else nn.Identity()
            self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4))

    def middle(self, x: torch.Tensor) -> torch.Tensor:
        return sum(bn(conv(x)) for conv, bn in zip(self.convs, self.bns, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.middle(x)
        return self.head(y) if self.consumer_kind == "linear" else self.head(self.bn2(self.conv2(y)))


def _replaceable_toy(consumer: str, branches: int = 1) -> _Toy:
    """Channel 5's BN-scaled filter is 0.5 u_0 - 0.6 u_2 + 0.4 u_4 in every branch.

    Then u_0, u_2 and u_4 are combinations of the others too, but with larger coefficients (all
    |lambda| < 1 here), so with equal consumer norms channel 5 has the smallest ridge residual."""
    torch.manual_seed(0)
    model = randomise_bn(_Toy(consumer, branches))
    lam = torch.tensor([0.5, 0.0, -0.6, 0.0, 0.4])
    with torch.no_grad():
        for conv, bn in zip(model.convs, model.bns, strict=True):
            s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            scaled = conv.weight[:5] * s[:5, None, None, None]
            conv.weight[5] = torch.einsum("j,j...->...", lam, scaled) / s[5]
        consumer_layer = model.head[2] if consumer == "linear" else model.conv2
        w = consumer_layer.weight.view(consumer_layer.weight.shape[0], 6, -1)
        w /= w.pow(2).sum((0, 2), keepdim=True).sqrt()  # every channel's consumer slice has norm 1
    return model


def _run_lrf(model: nn.Module, shape, widths: dict[str, int], **params):
    """Run LRF directly with fixed widths; returns (method output, scores it allocated with, groups)."""
    work = copy.deepcopy(model).eval()
    groups = find_groups(work, shape)
    seen = {}

    def allocate(scores):
        seen.update(scores)
        return {g.name: widths.get(g.name, g.channels) for g in groups if g.prunable}

    ctx = PruneContext(model=work, groups=groups, cost=build_width_cost(work, groups, shape), target=0.9,
                       allocation=AllocationConfig(), device=torch.device("cpu"), input_shape=shape)
    ctx.allocate = allocate
    method = get_method("lrf")
    return method.finalize(ctx, make_params(method, params), None), seen, groups


@pytest.mark.parametrize("consumer,branches", [("conv+bn", 1), ("conv", 1), ("linear", 1), ("conv+bn", 2)])
def test_replaceable_filter_scores_lowest_and_compensation_keeps_the_output(consumer, branches):
    shape = (3, 8, 8)
    model = _replaceable_toy(consumer, branches)
    out, scores, groups = _run_lrf(model, shape, {"convs.0": 5}, eps=1e-8)  # a tiny ridge: an exact fit
    assert int(torch.argmin(scores["convs.0"])) == 5
    assert scores["convs.0"][5] < 0.05 * min(scores["convs.0"][1], scores["convs.0"][3])  # independent ones
    assert out.keep["convs.0"] == (0, 1, 2, 3, 4)
    assert out.info["compensated_groups"] == 1
    x = torch.randn(16, *shape)
    pruned = apply_plan(out.model, groups, Plan.from_keep(out.keep, groups)).eval()
    with torch.no_grad():
        want, got = model(x), pruned(x)
        if consumer != "linear":  # the consumer's output itself, before anything nonlinear
            torch.testing.assert_close(pruned.bn2(pruned.conv2(pruned.middle(x))),
                                       model.bn2(model.conv2(model.middle(x))), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # without compensation the same channel goes, and the output visibly changes
    plain, _, _ = _run_lrf(model, shape, {"convs.0": 5}, eps=1e-8, compensate=False)
    assert plain.keep["convs.0"] == (0, 1, 2, 3, 4) and plain.info["compensated_groups"] == 0
    cut = apply_plan(plain.model, groups, Plan.from_keep(plain.keep, groups)).eval()
    with torch.no_grad():
        assert (cut(x) - want).abs().max() > 1e-2


def test_compensation_off_leaves_weights_untouched():
    spec, shape = model_input("small_cnn")
    model = randomise_bn(create_model(spec))
    out, _, _ = _run_lrf(model, shape, {"features.0": 10, "features.10": 40}, compensate=False)
    after = out.model.state_dict()
    assert list(after) == list(model.state_dict())
    for name, a in model.state_dict().items():
        assert torch.equal(a, after[name]), name


def test_engine_with_an_exactly_replaceable_filter_keeps_logits():
    """Through autoprune.prune: at a mild target the free channel goes first, and nothing changes."""
    model = _replaceable_toy("conv+bn")
    shape = (3, 8, 8)
    groups = find_groups(model, shape)
    cost = build_width_cost(model, groups, shape)
    target = cost.macs({"convs.0": 5}) / cost.base_macs
    result = autoprune.prune(model, "lrf", target, input_shape=shape, allocation={"mode": "global"}, eps=1e-8)
    assert result.plan.keep == {"convs.0": (0, 1, 2, 3, 4)}
    x = torch.randn(8, *shape)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- real models


@pytest.mark.parametrize("name,mode", [("resnet20", "global"), ("resnet20", "uniform"),
                                       pytest.param("mobilenetv2", "global", marks=pytest.mark.slow)])
def test_prune_meets_target_on_registry_models(name, mode):
    spec, shape = model_input(name)
    model = randomise_bn(create_model(spec))
    result = autoprune.prune(model, "lrf", 0.5, input_shape=shape, allocation={"mode": mode})
    assert 0.49 <= result.macs_fraction <= 0.5
    info = result.info
    assert info["compensated_groups"] > 0
    if name == "mobilenetv2":  # expand groups run through a depthwise conv: scored, not compensated
        assert any("depthwise" in why for why in info["uncompensated"].values())
    with torch.no_grad():
        y = result.model(torch.randn(2, *shape))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_bad_params_are_rejected():
    from autoprune.errors import SpecError

    with pytest.raises(SpecError, match="eps"):
        make_params(get_method("lrf"), {"eps": 0})
    with pytest.raises(SpecError, match="step"):
        make_params(get_method("lrf"), {"step": 0})


# --------------------------------------------------------------------------- feature-space fit


class _ReluToy(nn.Module):
    """conv -> BN -> ReLU -> 1x1 consumer -> head: the consumer reads a nonlinear feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 5, 1, bias=True)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4))

    def consumer_out(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.consumer_out(x))


class _Data:
    def __init__(self, x: torch.Tensor) -> None:
        from conftest import TensorSplit

        self.train = TensorSplit(x, torch.zeros(len(x), dtype=torch.long))


def _relu_toy_and_data():
    torch.manual_seed(1)
    model = randomise_bn(_ReluToy())
    with torch.no_grad():  # channel 7's filter is a mix of 0 and 1: replaceable in weights, not after the ReLU
        model.conv1.weight[7] = 0.7 * model.conv1.weight[0] - 0.5 * model.conv1.weight[1]
    return model, _Data(torch.randn(256, 3, 8, 8))


@pytest.mark.parametrize("compensate", [True, False])
def test_feature_fit_compensation_is_least_squares_optimal_through_a_relu(compensate):
    """With a 1x1 consumer, the joint fit of the removed channels' features by the kept ones minimises
    the consumer's output error on the calibration data for every consumer weight: better than the
    weight-space compensation, than none, and than any perturbed coefficients."""
    model, data = _relu_toy_and_data()
    shape = (3, 8, 8)
    x = data.train.x
    groups = find_groups(model, shape)
    widths = {"conv1": 5}

    def consumer_error(fit: str, comp: bool) -> tuple[float, tuple[int, ...]]:
        work = copy.deepcopy(model).eval()
        ctx = PruneContext(model=work, groups=groups, cost=build_width_cost(work, groups, shape), target=0.9,
                           allocation=AllocationConfig(), device=torch.device("cpu"), input_shape=shape, data=data)
        ctx.allocate = lambda scores: {g.name: widths.get(g.name, g.channels) for g in groups if g.prunable}
        method = get_method("lrf")
        out = method.finalize(ctx, make_params(method, {"fit": fit, "eps": 1e-9, "compensate": comp,
                                                   "calibration_batches": 2}), None)
        pruned = apply_plan(out.model, groups, Plan.from_keep(out.keep, groups)).eval()
        with torch.no_grad():
            return float((pruned.consumer_out(x) - model.consumer_out(x)).pow(2).mean()), out.keep["conv1"]

    feat, keep = consumer_error("features", compensate)
    if not compensate:
        plain, _ = consumer_error("weights", False)
        assert feat <= plain  # the feature score picks channels whose removal costs the consumer least
        return
    none, keep_none = consumer_error("features", False)
    weights, _ = consumer_error("weights", True)
    assert keep == keep_none  # same channels: only the compensation differs
    assert feat < none
    assert feat < weights
    # a perturbation of the compensated consumer weights only adds error on these data
    work = copy.deepcopy(model).eval()
    ctx = PruneContext(model=work, groups=groups, cost=build_width_cost(work, groups, shape), target=0.9,
                       allocation=AllocationConfig(), device=torch.device("cpu"), input_shape=shape, data=data)
    ctx.allocate = lambda scores: {g.name: widths.get(g.name, g.channels) for g in groups if g.prunable}
    out = get_method("lrf").finalize(ctx, make_params(get_method("lrf"), {"fit": "features", "eps": 1e-9}), None)
    pruned = apply_plan(out.model, groups, Plan.from_keep(out.keep, groups)).eval()
    with torch.no_grad():
        base = (pruned.consumer_out(x) - model.consumer_out(x)).pow(2).mean()
        pruned.conv2.weight.add_(1e-2 * torch.randn_like(pruned.conv2.weight))
        assert (pruned.consumer_out(x) - model.consumer_out(x)).pow(2).mean() > base


def test_feature_greedy_with_one_consumer_equals_the_weight_space_greedy_on_the_same_gram():
    from autoprune.methods.lrf_algebra import greedy_order_multi

    g = torch.Generator().manual_seed(5)
    u = torch.randn(10, 6, generator=g, dtype=torch.float64)
    v = torch.randn(10, 7, generator=g, dtype=torch.float64)
    p = ridge_inverse(u, 1e-3)
    for compensate in (True, False):
        h = v @ v.T if compensate else torch.diag(v.pow(2).sum(1))
        assert greedy_order_multi([p], [h], 6, 1, compensate) == greedy_order(p, h, 6, 1, compensate)


def test_features_fit_needs_data_and_auto_falls_back_to_weights():
    from autoprune.errors import AutopruneError

    spec, shape = model_input("small_cnn")
    model = randomise_bn(create_model(spec))
    with pytest.raises(AutopruneError, match="fit='weights'"):
        autoprune.prune(model, "lrf", 0.5, input_shape=shape, fit="features")
    assert autoprune.prune(model, "lrf", 0.5, input_shape=shape).info["fit"] == "weights"


def test_features_fit_on_resnet20_meets_target_and_compensates_every_group():
    spec, shape = model_input("resnet20")
    model = randomise_bn(create_model(spec))
    data = _Data(torch.randn(64, *shape))
    result = autoprune.prune(model, "lrf", 0.5, input_shape=shape, data=data, calibration_batches=1)
    assert result.info["fit"] == "features" and result.info["calibration_images"] == 64
    assert 0.49 <= result.macs_fraction <= 0.5
    assert result.info["uncompensated_groups"] == 0 and result.info["compensated_groups"] > 0
    with torch.no_grad():
        y = result.model(torch.randn(2, *shape))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_feature_stats_are_the_mean_and_covariance_of_what_the_consumer_reads_in_any_chunking(monkeypatch):
    from autoprune.methods import lrf_features

    model, data = _relu_toy_and_data()
    groups = [g for g in find_groups(model, (3, 8, 8)) if g.prunable]
    batches = list(data.train.batches(64))
    whole = lrf_features.feature_stats(model, groups, batches)["conv1"]
    with torch.no_grad():
        x = model.relu(model.bn1(model.conv1(data.train.x))).double().movedim(1, 0).reshape(8, -1)
    torch.testing.assert_close(whole.mean["conv2"], x.mean(1))
    torch.testing.assert_close(whole.cov["conv2"], torch.cov(x, correction=0))
    monkeypatch.setattr(lrf_features, "CHUNK_ELEMENTS", 100)  # one sample at a time
    small = lrf_features.feature_stats(model, groups, batches)["conv1"]
    torch.testing.assert_close(small.cov["conv2"], whole.cov["conv2"])
