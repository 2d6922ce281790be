"""The artifact finisher: every run (merge, zip, stitch) ends here, so its output folder is described one way.

Inside the output's temporary folder it writes report.json (the typed :class:`~suture.merge.report.Report`),
the recipe as run (suture_recipe.yml) and the model card read from that same Report; once the folder is in
place, the recipe's `publish:` section pushes it. Readers go through :func:`suture.merge.report.read_report`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from suture.merge.card import write_report_card
from suture.merge.report import REPORT_FILE, Report, write_report
from suture.recipes.plan import Progress
from suture.recipes.publish import publish
from suture.recipes.schema import Recipe
from suture.recipes.sections import PublishSection

logger = logging.getLogger(__name__)

RECIPE_FILE = "suture_recipe.yml"
CARD_FILE = "README.md"


def finish(tmp: Path, recipe: Recipe, report: Report | dict[str, Any], *, library_name: str | None = None,
           card_rows: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None) -> tuple[Report, list[str]]:
    """Write report.json, the recipe as run and the model card into `tmp`; returns the Report and the files written.

    `card_rows` is an engine's own evaluation table for the card (a built model's), read from the same report.
    """
    typed = write_report(tmp, report)
    (tmp / RECIPE_FILE).write_text(recipe.to_yaml())
    extra: dict[str, Any] = {}
    if card_rows is not None and typed.evaluation is not None:
        extra["evaluation"] = card_rows(typed.to_json()["evaluation"])
    write_report_card(tmp, typed, name=recipe.name, library_name=library_name, **extra)
    return typed, [REPORT_FILE, RECIPE_FILE, CARD_FILE]


def publish_output(out_dir: Path, section: PublishSection | None, progress: Progress | None = None) -> str | None:
    """Push the finished folder as the recipe's `publish:` section says; its URL, or None without a section."""
    if section is None:
        return None
    report = (lambda fraction, message: progress("publish", int(fraction * 100), 100, message)) if progress else None
    return publish(out_dir, section, report)
