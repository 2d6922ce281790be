"""`suture push` and the recipe's `publish:` section against the local Hub server."""

from __future__ import annotations

import pytest
import torch

from suture.merge.errors import RecipeError
from suture.merge.store import open_store
from suture.recipes.cli import main
from suture.recipes.runner import run_recipe
from tests.hub_server import DEFAULT_TOKEN
from tests.test_runner_cli import tiny_llama


def _recipe(a, b, **extra):
    return {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                                                 {"model": str(b), "parameters": {"weight": 0.5}}], **extra}


def test_recipe_publish_section_pushes_and_round_trips(hub_server, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", DEFAULT_TOKEN)
    a, b = tiny_llama(tmp_path / "a", 1), tiny_llama(tmp_path / "b", 2)
    with caplog.at_level("DEBUG"):
        result = run_recipe(_recipe(a, b, publish={"repo_id": "tester/merged", "private": True}), tmp_path / "out")
    assert result.url and result.url.endswith("tester/merged")
    files = set(hub_server.list_files("tester/merged"))
    assert {"model.safetensors", "config.json", "suture_recipe.yml", "report.json", "README.md"} <= files
    assert hub_server.file_bytes("tester/merged", "model.safetensors") == (result.out_dir / "model.safetensors").read_bytes()
    assert DEFAULT_TOKEN not in caplog.text
    for path in result.out_dir.iterdir():
        assert DEFAULT_TOKEN not in path.read_bytes().decode("latin-1")


def test_publish_section_is_validated_before_work(tmp_path):
    a, b = tiny_llama(tmp_path / "a", 1), tiny_llama(tmp_path / "b", 2)
    with pytest.raises(RecipeError, match="publish.repo_id"):
        run_recipe(_recipe(a, b, publish={"private": True}), tmp_path / "out")
    with pytest.raises(RecipeError, match="publish.token"):
        run_recipe(_recipe(a, b, publish={"repo_id": "x/y", "token": "hf_secret"}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_push_then_pull(hub_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", DEFAULT_TOKEN)
    a, b = tiny_llama(tmp_path / "a", 1), tiny_llama(tmp_path / "b", 2)
    out = run_recipe(_recipe(a, b), tmp_path / "out").out_dir
    assert main(["push", str(out), "tester/cli-merged", "-q"]) == 0
    printed = capsys.readouterr()
    assert "published:" in printed.out and DEFAULT_TOKEN not in printed.out + printed.err
    from suture.merge.hub import resolve_model_ref

    pulled = resolve_model_ref("tester/cli-merged")
    local, remote = open_store(out), open_store(pulled)
    for name in local.names():
        assert torch.equal(local.get(name), remote.get(name))


def test_cli_push_bad_token_is_a_clear_error(hub_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_value_123456")
    a, b = tiny_llama(tmp_path / "a", 1), tiny_llama(tmp_path / "b", 2)
    out = run_recipe(_recipe(a, b), tmp_path / "out").out_dir
    assert main(["push", str(out), "tester/denied", "-q"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "hf_wrong_token_value_123456" not in err
