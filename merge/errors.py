"""Exception types shared by every Suture module.

All user-facing errors derive from :class:`SutureError` so the CLI and the app can show them as one
readable line instead of a traceback. Messages name the file, tensor or recipe key at fault and say
what was expected.
"""

from __future__ import annotations


class SutureError(Exception):
    """Base class for errors caused by bad input or configuration (shown to users without a traceback).

    ``field`` (empty when none) names the setting at fault in the raising routine's own terms, e.g.
    ``("input_shape",)``; the core never cites recipe keys, and the recipe runner maps the field to its key.
    """

    def __init__(self, *args: object, field: tuple[str | int, ...] = ()) -> None:
        super().__init__(*args)
        self.field = tuple(field)


class InputError(SutureError, ValueError):
    """A model file, tensor or data set is missing, corrupt or inconsistent."""


class RecipeError(SutureError, ValueError):
    """A recipe key is unknown, has the wrong type, or combines options that cannot work together."""


class AlignmentError(SutureError, ValueError):
    """Models cannot be aligned with the chosen engine (e.g. different widths for permutation matching)."""


class OptionError(InputError):
    """A setting given to a core routine does not fit its models or data.

    ``field`` is the setting's path inside the routine's configuration (e.g. ``("source", "layer")``), so a
    caller that read the setting from its own file (the recipe runner, the app) can name its own key.
    """

    def __init__(self, field: tuple[str | int, ...], message: str) -> None:
        self.message = message
        super().__init__(f"{'.'.join(str(p) for p in field)}: {message}" if field else message, field=field)


class UntrustedCodeError(InputError):
    """A model's metadata names code outside Suture's zoo and the user has not opted in to running it."""


class OutputError(SutureError):
    """The output cannot be written: folder not writable, disk full, file too large, or another run holds it."""


class ParameterError(SutureError, ValueError):
    """A merge method is unknown, or a parameter is missing, of the wrong type or outside its range."""
