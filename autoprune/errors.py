"""User-facing errors.

Anything a user can fix (bad spec, unknown model, missing file, corrupt checkpoint,
unsupported layer) raises :class:`AutopruneError` with a one-line message that names
the thing and the fix. The CLI prints it without a traceback and exits with code 2.
"""
from __future__ import annotations


class AutopruneError(Exception):
    """An error caused by user input; its message is shown as-is, on one line."""


class SpecError(AutopruneError):
    """A malformed search spec or parameter; the message names the key and the file."""


class UnreachableTarget(AutopruneError):
    """An allocation target below what the narrowest allowed widths reach: ``floor`` is their cost as a
    fraction of the base's (as the allocation's cost model predicts it), ``widths`` the widths themselves
    (group name -> channels), so a caller can measure them (latency feedback does)."""

    def __init__(self, message: str, floor: float, widths: dict[str, int]) -> None:
        super().__init__(message)
        self.floor, self.widths = floor, dict(widths)

    def __reduce__(self) -> tuple:  # picklable across processes like any other exception
        return (type(self), (str(self), self.floor, self.widths))


class CheckpointError(AutopruneError):
    """A missing, corrupt or foreign checkpoint file."""


class AutopruneWarning(UserWarning):
    """Something the user should know about a result that still stands (e.g. no data for BN recalibration).

    Issued with :func:`warnings.warn`, so a notebook or script shows it like any library warning (once
    per place, by Python's default filter); the CLI prints it as one ``warning:`` line. Silence it with
    ``warnings.simplefilter("ignore", autoprune.errors.AutopruneWarning)``.
    """


def warn(message: str, stacklevel: int = 2) -> None:
    """Issue ``message`` as an :class:`AutopruneWarning` (``stacklevel`` as :func:`warnings.warn`'s, plus this
    function's own frame)."""
    import warnings

    warnings.warn(message, AutopruneWarning, stacklevel=stacklevel + 1)


def did_you_mean(name: str, known: list[str] | tuple[str, ...]) -> str:
    """A short hint listing known names, closest first."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    listed = ", ".join(sorted(known))
    if close:
        return f"did you mean {' or '.join(repr(c) for c in close)}? known: {listed}"
    return f"known: {listed}"
