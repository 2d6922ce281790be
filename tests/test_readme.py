"""Every code block of README.md works as written: Python runs, `suture` command lines parse, recipes validate."""

from __future__ import annotations

import argparse

import re
import shlex
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
# a fence opens at a line start and runs to the next fence line
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```$", README, flags=re.M | re.S)
# what the usage lines' placeholders stand for when parsed
PLACEHOLDER_VALUES = {"N": "1", "K": "2"}  # numeric placeholders in usage lines


def blocks(lang: str) -> list[str]:
    return [text for kind, text in BLOCKS if kind == lang]


def command_lines(text: str) -> list[str]:
    """Logical lines of a bash block (continuation lines joined), comments dropped."""
    out: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if raw[:1].isspace() and out:
            out[-1] += " " + line.strip()
        else:
            out.append(line.strip())
    return out


def concrete_argv(line: str) -> list[str]:
    """`suture run R OUT [--device auto|cpu|cuda] [-v|-q]` -> argv with every optional part and the first choice."""
    line = re.sub(r"\[([^\]]*)\]", r"\1", line)
    argv = []
    for token in shlex.split(line)[1:]:
        token = token.split("|", 1)[0]
        argv.append(PLACEHOLDER_VALUES.get(token, token))
    return argv


def test_readme_has_the_blocks_this_test_covers() -> None:
    assert len(blocks("python")) >= 1 and len(blocks("bash")) >= 2 and len(blocks("yaml")) >= 2
    assert {kind for kind, _ in BLOCKS} <= {"python", "bash", "yaml"}, "a new kind of code block needs a check here"


def test_every_suture_command_line_parses() -> None:
    from suture.recipes.cli import build_parser

    parser = build_parser()
    lines = [line for text in blocks("bash") for line in command_lines(text)]
    suture_lines = [line for line in lines if line.startswith("suture ")]
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {line.split()[1] for line in suture_lines} == set(commands)  # every command documented, none invented
    for line in suture_lines:
        argv = concrete_argv(line)
        args = parser.parse_args(argv)  # SystemExit (a failed test) on an option the parser does not know
        assert args.command == argv[0], line


def test_make_targets_and_variables_exist() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for line in (line for text in blocks("bash") for line in command_lines(text) if line.startswith("make ")):
        for word in line.split()[1:]:
            if "=" in word:
                assert re.search(rf"^{re.escape(word.split('=')[0])}\s*\??=", makefile, re.M), line
            else:
                assert re.search(rf"^{re.escape(word)}:", makefile, re.M), line
    assert "recipes/examples/quickstart.yaml" in makefile


def test_yaml_blocks_are_valid_recipes() -> None:
    from suture.recipes.runner import load
    from suture.recipes.stitch_section import validate_stitch_section

    for text in blocks("yaml"):
        recipe = load(text)  # schema errors raise RecipeError naming key and line
        if recipe.stitch is not None:
            validate_stitch_section(recipe.stitch)


@pytest.fixture
def readme_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_cache: Path) -> Path:
    """A working folder as the README assumes it: the example recipes, and two models named model_a and model_b."""
    from suture.merge.refs import resolve_ref

    shutil.copytree(ROOT / "recipes" / "examples", tmp_path / "recipes" / "examples")
    for name, ref in (("model_a", "demo:mlp-seed1"), ("model_b", "demo:mlp-seed2")):
        shutil.copytree(resolve_ref(ref), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_python_blocks_run_as_written(readme_dir: Path) -> None:
    import torch

    for text in blocks("python"):
        namespace: dict = {"__name__": "__readme__"}
        exec(compile(text, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example code
    # the example's results are real: the quickstart output exists and B is permuted onto A's units
    assert (readme_dir / "out" / "quickstart" / "report.json").is_file()
    spec, match, b = namespace["spec"], namespace["match"], namespace["b"]
    assert set(match.perms) == {g.name for g in spec.active_groups()}
    assert any(not torch.equal(p, torch.arange(len(p))) for p in match.perms.values())
    aligned, original = namespace["b_aligned"], b.state_dict()
    assert aligned.keys() == original.keys() and any(not torch.equal(aligned[k], original[k]) for k in original)


def test_cheap_command_lines_run(readme_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from suture.recipes.cli import main

    assert main(["inspect", "model_a", "--groups", "--json"]) == 0
    assert '"group"' in capsys.readouterr().out
    assert main(["run", "recipes/examples/quickstart.yaml", "out/dry", "--dry-run"]) == 0
    assert not (readme_dir / "out" / "dry").exists()
