"""Which of a model's outputs are the logits: one rule, used by training, evaluation, distillation,
calibration, the graph's output-layer protection, export and its check.

The rule (README "Models and data"), applied to what ``forward`` returns:

1. a tensor: it is the logits;
2. a tuple, list or namedtuple (torchvision's ``GoogLeNetOutputs``, ``(logits, embedding)``): its
   first element that is a tensor;
3. a dict or other mapping (a HuggingFace ``ModelOutput``): the value under ``"logits"``, else its
   only tensor value;
4. a selector the user gives (``output: <index|key>`` in a search spec, ``--output`` on the CLI,
   ``ModelSpec(output=...)``, or :func:`set_output` on a model) picks the element at that index of a
   tuple/list or under that key of a mapping instead.

Anything else raises :class:`~autoprune.errors.AutopruneError` naming what ``forward`` returned and how to
choose. Every output, not only the logits, keeps the widths of the layers producing it (the graph
never prunes an output layer, see :mod:`autoprune.engine.trace`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import AutopruneError

Selector = int | str | None
_ATTR = "_autoprune_output"  # where set_output keeps a model's selector (deep copies keep it)
OUTPUT_HELP = ("which of the model's outputs are the logits when forward returns several: an index of a tuple/list "
               "or a key of a dict (default: a tensor; the first tensor of a tuple/list; the 'logits' key or the "
               "only tensor of a dict); kept in the checkpoint")
HOW = "choose it with `output: <index|key>` in the search spec or --output on the command line"


def parse_selector(value: Any) -> Selector:
    """``None`` / ``""`` -> None; an int or a string of digits -> index; any other string -> key."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise AutopruneError(f"output selector {value!r} must be an index (0, 1, ...) or a key name")
    if isinstance(value, int):
        if value < 0:
            raise AutopruneError(f"output selector {value} must be an index >= 0 or a key name")
        return value
    if isinstance(value, str):
        text = value.strip()
        return int(text) if text.isdigit() else text
    raise AutopruneError(f"output selector {value!r} must be an index (0, 1, ...) or a key name")


def set_output(model: nn.Module, selector: Any) -> nn.Module:
    """Record on ``model`` which output is the logits (see the module docstring); returns ``model``."""
    object.__setattr__(model, _ATTR, parse_selector(selector))
    return model


def output_selector(model: nn.Module) -> Selector:
    """The selector recorded with :func:`set_output` (None: the default rule)."""
    return getattr(model, _ATTR, None)


def _kind(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return "a tensor"
    name = type(out).__name__
    if isinstance(out, Mapping):
        return f"a {name} with keys {list(out)[:8]}"
    if isinstance(out, (tuple, list)):
        return f"a {name} of {len(out)}"
    return f"a {name}"


def _pick(out: Any, selector: Selector) -> tuple[Any, str]:
    """(the chosen output, how it was chosen); raises AutopruneError."""
    selector = parse_selector(selector)
    if isinstance(out, torch.Tensor) and selector is None:
        return out, "the tensor forward returns"
    if isinstance(out, Mapping):
        if selector is not None:
            if selector not in out:
                raise AutopruneError(f"output selector {selector!r}: forward returns {_kind(out)}; name one of its keys")
            return out[selector], f"key {selector!r} of {_kind(out)}"
        if "logits" in out:
            return out["logits"], f"key 'logits' of {_kind(out)}"
        tensors = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return out[tensors[0]], f"key {tensors[0]!r}, the only tensor of {_kind(out)}"
        raise AutopruneError(f"forward returns {_kind(out)} without a 'logits' key and with {len(tensors)} tensors: "
                             f"autoprune cannot tell which are the logits; {HOW}")
    if isinstance(out, (tuple, list)):
        if selector is not None:
            if not isinstance(selector, int) or selector >= len(out):
                raise AutopruneError(f"output selector {selector!r}: forward returns {_kind(out)}; give an index "
                                     f"from 0 to {len(out) - 1}")
            return out[selector], f"element {selector} of {_kind(out)}"
        for i, value in enumerate(out):
            if isinstance(value, torch.Tensor):
                field = getattr(type(out), "_fields", None)  # a namedtuple names its fields
                named = f" ({field[i]!r})" if field else ""
                return value, f"element {i}{named}, the first tensor of {_kind(out)}"
        raise AutopruneError(f"forward returns {_kind(out)} without a tensor; it must return the logits")
    if selector is not None:
        raise AutopruneError(f"output selector {selector!r}: forward returns {_kind(out)}, which has no elements "
                             "to choose from; drop the selector")
    raise AutopruneError(f"forward returns {_kind(out)}: autoprune needs the logits as a tensor, a tuple/list whose "
                         "first tensor they are, or a dict with a 'logits' key")


def select_logits(out: Any, selector: Selector = None) -> torch.Tensor:
    """The logits in ``out`` (what forward returned) by the module's rule; AutopruneError if there are none."""
    chosen, how = _pick(out, selector)
    if not isinstance(chosen, torch.Tensor):
        raise AutopruneError(f"the chosen output ({how}) is a {type(chosen).__name__}, not a tensor; {HOW}")
    if chosen.dim() != 2:
        raise AutopruneError(f"the chosen output ({how}) has shape {tuple(chosen.shape)}; logits must be "
                             f"(batch, classes); {HOW}")
    return chosen


def logits_of(model: nn.Module, out: Any) -> torch.Tensor:
    """``select_logits(out, output_selector(model))``: the logits of ``model``'s output ``out``."""
    return select_logits(out, output_selector(model))


def describe(out: Any, selector: Selector = None) -> str:
    """Which output the rule picks, in words, e.g. "element 0 ('logits'), the first tensor of a
    GoogLeNetOutputs of 3, shape (1, 10)"; the error message if none."""
    try:
        chosen, how = _pick(out, selector)
        return f"{how}, shape {tuple(chosen.shape)}" if isinstance(chosen, torch.Tensor) else how
    except AutopruneError as exc:
        return f"none: {exc}"


def describe_model(model: nn.Module, shape: tuple[int, ...], device: torch.device | str = "cpu") -> list[str]:
    """Lines saying which output ``model`` trains and evaluates on (one forward of zeros of ``shape`` (C, H, W)
    in eval mode and one in training mode, on copies: BN statistics and the random state are unchanged)."""
    import copy

    selector, found = output_selector(model), {}
    for mode in ("eval", "training"):
        twin = copy.deepcopy(model).train(mode == "training")
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                found[mode] = describe(twin(torch.zeros(2, *shape, device=device)), selector)
        except Exception as exc:  # noqa: BLE001 - reported, not raised: `info` still lists the groups
            found[mode] = f"none: forward fails ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    chosen = f" (--output {selector!r})" if selector is not None else ""
    if found["eval"] == found["training"]:
        return [f"output{chosen}: trains and evaluates on {found['eval']}"]
    return [f"output{chosen}: trains on {found['training']} (training mode)",
            f"output{chosen}: evaluates and exports {found['eval']} (eval mode)"]


class LogitsOnly(nn.Module):
    """``model`` with forward returning only its logits (for export: one named ONNX output)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.selector = output_selector(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return select_logits(self.model(x), self.selector)


def single_output(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``model``, or :class:`LogitsOnly` around it when forward returns more than the logits (a tuple, a
    dict): what an export writes, with one output. AutopruneError when the rule finds no logits."""
    with torch.no_grad():
        out = model(example)
    if isinstance(out, torch.Tensor) and output_selector(model) is None:
        return model
    logits_of(model, out)
    return LogitsOnly(model).eval()
