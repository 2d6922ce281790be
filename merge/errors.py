"""Exception types shared by every Suture module.

All user-facing errors derive from :class:`SutureError` so the CLI and the app can show them as one
readable line instead of a traceback. Messages name the file, tensor or recipe key at fault and say
what was expected.
"""

from __future__ import annotations


class SutureError(Exception):
    """Base class for errors caused by bad input or configuration (shown to users without a traceback)."""


class InputError(SutureError, ValueError):
    """A model file, tensor or data set is missing, corrupt or inconsistent."""


class RecipeError(SutureError, ValueError):
    """A recipe key is unknown, has the wrong type, or combines options that cannot work together."""


class AlignmentError(SutureError, ValueError):
    """Models cannot be aligned with the chosen engine (e.g. different widths for permutation matching)."""


class UntrustedCodeError(InputError):
    """A model's metadata names code outside Suture's zoo and the user has not opted in to running it."""


class OutputError(SutureError):
    """The output cannot be written: folder not writable, disk full, file too large, or another run holds it."""


class ParameterError(SutureError, ValueError):
    """A merge method is unknown, or a parameter is missing, of the wrong type or outside its range."""
