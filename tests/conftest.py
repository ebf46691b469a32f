"""Shared fixtures: tiny data and a trained digits base model, built once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from autoprune.data.datasets import DataSpec, load_data
from autoprune.engine.plan import save_base
from autoprune.models.registry import ModelSpec, create_model
from autoprune.train import TrainConfig, evaluate, fit

# The registry models the engine must handle, with an input size that keeps tests fast.
CIFAR_MODELS = ["resnet20", "resnet56", "resnet20_a", "resnet56_a", "vgg16_bn", "mobilenetv2"]
TORCHVISION_MODELS = ["torchvision:resnet18", "torchvision:resnet50", "torchvision:mobilenet_v2",
                      "torchvision:densenet121", "torchvision:efficientnet_b0", "torchvision:regnet_x_400mf"]


def pytest_configure(config):
    """Under pytest-xdist (``-n N``, the README's test command) each worker process takes its share of the
    cores: torch's intra-op pool defaults to every core, so N workers would oversubscribe the machine."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // workers))


class TensorSplit:
    """Duck-typed stand-in for autoprune.data.datasets.Split over in-memory tensors."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size, shuffle=False, generator=None, augment=False):
        n = len(self.y)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            yield self.x[idx], self.y[idx]


def model_input(name: str) -> tuple[ModelSpec, tuple[int, int, int]]:
    """A spec and input shape for ``name``: 8x8x1 for small_cnn, 32x32 CIFAR, 64x64 torchvision."""
    if name == "small_cnn":
        spec = ModelSpec(name, 10, 1, 8)
    elif name.startswith("torchvision:"):
        spec = ModelSpec(name, 10, 3, 64)
    else:
        spec = ModelSpec(name, 10, 3, 32)
    return spec, (spec.in_channels, spec.image_size, spec.image_size)


def randomise_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BN non-trivial statistics and affine parameters, so equivalence tests can fail."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g) * 0.5 + 1.0)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def digits():
    return load_data(DataSpec("digits", seed=0))


@pytest.fixture(scope="session")
def digits_base(digits):
    """small_cnn trained on digits for 10 epochs (about 98% val accuracy), with its spec."""
    spec = ModelSpec("small_cnn", digits.num_classes, digits.in_channels, digits.image_size)
    torch.manual_seed(0)
    model = create_model(spec)
    fit(model, digits.train, digits.val, TrainConfig(epochs=10, lr=0.05, seed=0), "cpu")
    return model.eval(), spec


@pytest.fixture(scope="session")
def base_ckpt(tmp_path_factory) -> Path:
    """A small_cnn digits base checkpoint (3 epochs) for search tests, saved like `autoprune train`."""
    data = load_data(DataSpec("digits"))
    spec = ModelSpec("small_cnn", data.num_classes, data.in_channels, data.image_size)
    torch.manual_seed(0)
    model = create_model(spec)
    fit(model, data.train, data.val, TrainConfig(epochs=3, lr=0.05, seed=0), "cpu")
    path = tmp_path_factory.mktemp("base") / "base.pt"
    save_base(path, model, spec, data.spec, {"val_acc": evaluate(model, data.val, "cpu")["acc"]})
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster.

    Use per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``; the count is restored after.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def trust_special_models(monkeypatch):
    """Trust tests/special_models.py, whose factories tests name as ``special_models:<name>`` (autoprune.trust)."""
    monkeypatch.setenv("AUTOPRUNE_TRUST_CODE", "special_models")
