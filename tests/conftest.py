"""Session-wide test settings: demo models are trained once per session into a temporary cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.hub_server import hub_server  # noqa: F401 - the local Hub server fixture, for every test module


@pytest.fixture(scope="session", autouse=True)
def suture_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point SUTURE_CACHE at a per-session folder so tests never read or write ~/.cache/suture."""
    path = tmp_path_factory.getbasetemp() / "suture-cache"
    path.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("SUTURE_CACHE")
    os.environ["SUTURE_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("SUTURE_CACHE", None)
    else:
        os.environ["SUTURE_CACHE"] = previous


@pytest.fixture(scope="session")
def demo_cache(suture_cache: Path) -> Path:
    """The folder `demo:` model references are built in (shared by every test module)."""
    return suture_cache / "demo"


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same global RNG state, so a test that draws unseeded data cannot flake."""
    import torch

    torch.manual_seed(0)
