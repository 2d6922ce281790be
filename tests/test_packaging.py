"""The design card's folders install under one `suture` namespace, and old factory references still resolve."""

from __future__ import annotations

import tomllib
from pathlib import Path

import suture.merge.zoo as zoo

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"merge": "suture.merge", "stitch": "suture.stitch", "recipes": "suture.recipes", "app": "suture.app"}


def test_every_package_folder_is_installed_under_suture() -> None:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {"suture"}
    for folder, name in FOLDERS.items():
        assert tool["package-dir"][name] == folder
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *parts)))
    assert set(tool["packages"]) == found


def test_pre_namespace_factory_references_still_build() -> None:
    assert zoo.canonical_factory("merge.zoo:mlp") == "suture.merge.zoo:mlp"
    assert zoo.is_zoo_factory("merge.zoo:mlp") and zoo.is_zoo_factory("suture.merge.zoo:resnet_small")
    assert isinstance(zoo.build_architecture("merge.zoo:mlp", widths=(4, 3)), zoo.MLP)
    assert zoo.canonical_factory("mypkg.models:net") == "mypkg.models:net"
