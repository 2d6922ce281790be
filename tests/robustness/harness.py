"""Run one `suture` command in-process and classify what happened (the fuzz suites' single judge).

A case passes when the command refuses its input the way a user should see it: a non-zero exit, exactly
one `error:` line, no Python traceback, no hang, and no output folder left behind. Anything else is
counted against the floor of issue "Trust": tracebacks, hangs, silent wrong results.
"""

from __future__ import annotations

import contextlib
import io
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


class CaseHang(BaseException):
    """Raised by the alarm when a case runs past its time limit (BaseException: no `except Exception` swallows it)."""


@dataclass
class Case:
    """One hostile input: an id, the CLI words after `suture`, and the output folder that must not appear."""

    case_id: str
    argv: list[str]
    out: Path | None = None


@dataclass
class Outcome:
    """What one case did."""

    case_id: str
    exit_code: int | None
    stderr: str
    stdout: str
    traceback: bool = False
    hang: bool = False
    output_left: bool = False
    error_lines: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """A clear refusal: failed, one error line, no traceback, no hang, nothing written."""
        return (
            not self.hang and not self.traceback and not self.output_left
            and self.exit_code not in (0, None) and len(self.error_lines) == 1
        )

    @property
    def silent(self) -> bool:
        """Exited 0 on input that should have been refused."""
        return self.exit_code == 0

    def describe(self) -> str:
        """A short line for assertion messages."""
        return (f"{self.case_id}: exit={self.exit_code} traceback={self.traceback} hang={self.hang} "
                f"output_left={self.output_left} stderr={self.stderr.strip()[-400:]!r}")


def _alarm(signum, frame):  # noqa: ARG001
    raise CaseHang


def run_cli_case(case: Case, timeout: float = 60.0) -> Outcome:
    """Run `suture <argv>` in this process (main thread) with stdout/stderr captured and a time limit."""
    from suture.recipes.cli import main

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers.clear()  # so the CLI's basicConfig logs into the captured stderr
    saved_term = signal.getsignal(signal.SIGTERM)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    code: int | None = None
    hang = traceback = False
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(case.argv))
            except SystemExit as exc:  # argparse refusals
                code = exc.code if isinstance(exc.code, int) else 1
            except CaseHang:
                hang = True
            except BaseException as exc:  # noqa: BLE001 - any escape is what we count
                traceback = True
                err.write(f"Traceback (escaped): {type(exc).__name__}: {exc}\n")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        signal.signal(signal.SIGTERM, saved_term)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    stderr = err.getvalue()
    traceback = traceback or "Traceback" in stderr or "Traceback" in out.getvalue()
    left = case.out is not None and case.out.exists()
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    return Outcome(case.case_id, code, stderr, out.getvalue(), traceback, hang, left, lines)


def tally(outcomes: Sequence[Outcome]) -> dict[str, int]:
    """Counts for the robustness benchmark's JSON."""
    return {
        "cases": len(outcomes),
        "clean_errors": sum(o.clean for o in outcomes),
        "tracebacks": sum(o.traceback for o in outcomes),
        "hangs": sum(o.hang for o in outcomes),
        "silent_wrong": sum(o.silent and not o.traceback for o in outcomes),
        "outputs_left": sum(o.output_left for o in outcomes),
    }
