"""The trust boundary for code: a name that imports code resolves only when the user allows it.

A model name ``package.module:function`` imports ``package.module`` and calls ``function``; importing
runs the module's top-level code. Such names reach autoprune from files a user may have received (a
checkpoint's model spec, a results folder's ``spec.yaml``, a search spec), so a name alone never
imports anything: the module must be trusted *where autoprune runs*, by

- the command line: ``--trust-code mypkg`` (comma-separated module prefixes, repeatable; ``all``
  trusts every module);
- the environment: ``AUTOPRUNE_TRUST_CODE=mypkg,otherpkg`` (or ``all``);
- the Python API: ``trust_code="mypkg"`` (a prefix, a list of them, or ``True`` for all) on
  :func:`~autoprune.models.registry.create_model`, :func:`~autoprune.engine.plan.load_base`,
  :func:`~autoprune.search.runner.run_search`, :func:`~autoprune.report.retrain.retrain` and
  :func:`~autoprune.models.importing.import_model`, or ``with trust.granting("mypkg"): ...``.

A prefix ``mypkg`` trusts ``mypkg`` and its submodules (``mypkg.nets``), not ``mypkg2``. Nothing a
file says can grant trust. Registry names, ``torchvision:<name>`` and ``timm:<name>`` import no user
code and need no trust. The grant lives in the environment variable while it is in force, so the
worker processes a search spawns inherit it (the convention of ``trust_remote_code`` in the Hugging
Face libraries, with an allow-list instead of all-or-nothing).
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from .errors import AutopruneError

ENV = "AUTOPRUNE_TRUST_CODE"
ALL = "all"
NO_TRUST_NEEDED = ("torchvision:", "timm:")  # prefixes of names that import no user code
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")

TrustCode = bool | str | Iterable[str] | None
F = TypeVar("F", bound=Callable[..., Any])


class TrustError(AutopruneError):
    """A name would import code from a module the user has not trusted."""


def parse(value: TrustCode) -> frozenset[str]:
    """``True``/``"all"`` -> {"all"}; ``"a,b"`` or ``["a", "b"]`` -> {"a", "b"}; None/False -> {}.

    Raises ``AutopruneError`` for an entry that is not a dotted module name."""
    if value is None or value is False:
        return frozenset()
    if value is True:
        return frozenset({ALL})
    items = [part for item in ([value] if isinstance(value, str) else value) for part in str(item).split(",")]
    out = set()
    for item in items:
        text = str(item).strip()
        if text.lower() in (ALL, "*", "1", "true"):
            out.add(ALL)
        elif _MODULE.fullmatch(text):
            out.add(text)
        elif text:
            raise AutopruneError(f"trust-code entry {text!r} is not a module name; give module prefixes such as "
                                 f"--trust-code mypkg,otherpkg.nets, or --trust-code {ALL}")
    return frozenset(out)


def granted() -> frozenset[str]:
    """The module prefixes trusted now (from ``AUTOPRUNE_TRUST_CODE``)."""
    try:
        return parse(os.environ.get(ENV, ""))
    except AutopruneError as exc:
        raise AutopruneError(f"{ENV}: {exc}") from None


def is_trusted(module: str) -> bool:
    allowed = granted()
    return ALL in allowed or any(module == p or module.startswith(p + ".") for p in allowed)


@contextlib.contextmanager
def granting(value: TrustCode) -> Iterator[frozenset[str]]:
    """Trust the modules ``value`` names (see :func:`parse`) inside the block, and in processes started in it."""
    extra = parse(value)
    if not extra:
        yield granted()
        return
    before = os.environ.get(ENV)
    now = granted() | extra
    os.environ[ENV] = ALL if ALL in now else ",".join(sorted(now))
    try:
        yield now
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def accepts_trust_code(fn: F) -> F:
    """Decorate an API function with a keyword-only ``trust_code`` argument: its call runs in :func:`granting`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with granting(kwargs.get("trust_code")):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def needs_trust(name: str) -> bool:
    """Whether resolving the model name ``name`` would import a user's module."""
    return ":" in name and not name.startswith(NO_TRUST_NEEDED)


def check_name(name: str, what: str = "model") -> str:
    """The module ``package.module:function`` imports, after checking it is trusted.

    Raises ``TrustError`` (one line naming the module and the flag) when it is not, and
    ``AutopruneError`` for a name that is not ``package.module:function``."""
    module, _, function = name.partition(":")
    if not _MODULE.fullmatch(module) or not re.fullmatch(r"[A-Za-z_]\w*", function):
        raise AutopruneError(f"bad {what} name {name!r}: expected package.module:function")
    if not is_trusted(module):
        raise TrustError(f"{what} {name!r} would import and run code from module {module!r}, which is not "
                         f"trusted; if you trust it, pass --trust-code {module} (or set {ENV}={module}; "
                         f"Python: trust_code={module!r})")
    return module
