"""Every mutated recipe of tests/robustness/recipe_cases.py is refused cleanly by `suture run`.

Clean: a non-zero exit, exactly one `error:` line, no traceback, no hang and no output folder; and no
architecture code named by a model's config.json was imported (the marker file never appears).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.robustness.harness import run_cli_case, tally
from tests.robustness.recipe_cases import EVIL_MODULE, MARKER, recipe_cases

MIN_CASES = 100


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("recipe-fuzz")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # Hub ids must fail from the cache alone, never reach the network
        mp.syspath_prepend(str(workdir))  # so that a missing trust check would really import the planted module
        mp.chdir(workdir)
        cases = recipe_cases(workdir)
        results = [run_cli_case(case, timeout=30) for case in cases]
    yield workdir, cases, results
    sys.modules.pop(EVIL_MODULE, None)


def test_there_are_enough_cases(outcomes) -> None:
    _, cases, _ = outcomes
    assert len(cases) >= MIN_CASES
    assert len({c.case_id for c in cases}) == len(cases), "case ids must be unique"


def test_every_case_is_refused_cleanly(outcomes) -> None:
    _, _, results = outcomes
    bad = [o.describe() for o in results if not o.clean]
    assert not bad, f"{len(bad)} unclean of {len(results)}:\n" + "\n".join(bad)
    counts = tally(results)
    assert counts["tracebacks"] == counts["hangs"] == counts["silent_wrong"] == counts["outputs_left"] == 0, counts


def test_no_code_from_model_metadata_ran(outcomes) -> None:
    workdir, _, results = outcomes
    assert not (workdir / MARKER).exists()
    assert EVIL_MODULE not in sys.modules
    malicious = [o for o in results if o.case_id.startswith("malicious-")]
    assert len(malicious) >= 10
    for o in malicious:
        assert "--trust-remote-code" in o.error_lines[0], o.describe()


@pytest.mark.parametrize("case_id, expected", [
    ("param-weight-text", r"line 5: models\[0\]\.parameters\.weight: .*must be a number, got 'half'"),
    ("param-weight-nan", r"line 5: models\[0\]\.parameters\.weight: .*must be finite"),
    ("param-weight-inf", r"line 5: models\[0\]\.parameters\.weight: .*must be finite"),
    ("param-weight-huge-int", r"line 5: models\[0\]\.parameters\.weight: .*finite number"),
    ("param-weight-gradient-nan", r"line 5: models\[0\]\.parameters\.weight\[1\]: .*must be finite"),
    ("global-normalize-yes", r"line \d+: parameters\.normalize: .*must be true or false, got 'yes'"),
    ("yaml-alias-bomb", r"aliases expand to more than"),
    ("yaml-deep-lists", r"nests deeper than"),
    ("yaml-huge-document", r"over the recipe size limit"),
    ("shard-0", r"out_shard_size: expected a positive size"),
    ("shard--1", r"out_shard_size: expected a positive size"),
    ("cli-shard-0", r"must be positive"),
    ("bytes-latin-1", r"not a UTF-8 text file"),
    ("recipe-is-a-directory", r"is a folder"),
    ("yaml-top-level-list", r"a recipe is a mapping"),
    ("yaml-empty", r"the recipe is empty"),
    ("hub-offline", r"offline"),
])
def test_messages_name_the_problem(outcomes, case_id: str, expected: str) -> None:
    import re

    _, _, results = outcomes
    outcome = next(o for o in results if o.case_id == case_id)
    assert re.search(expected, outcome.error_lines[0]), outcome.error_lines[0]
