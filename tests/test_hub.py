"""Hub pull/push against a local Hub-compatible server driven by the real huggingface_hub client (no internet)."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from suture.merge.card import build_model_card, write_model_card
from suture.merge.errors import InputError
from suture.merge.hub import hub_cache_dir, is_hub_id, push_folder, resolve_model_ref
from tests.hub_server import (
    DEFAULT_TOKEN,
    READ_ONLY_TOKEN,
    closed_port_url,
    enable_lfs,
    point_client_at,
)

RECIPE = "merge_method: linear\nmodels:\n  - model: org/model-a\n  - model: org/model-b\nparameters:\n  weight: 0.5\n"


def make_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(16, 8, generator=g),
        "layer.bias": torch.randn(16, generator=g),
        "embed.weight": torch.randn(300, 8, generator=g),  # 9.6 kB: large enough to go through LFS when enabled
    }


def make_output_dir(path: Path, seed: int = 0, license: str | None = "apache-2.0") -> dict[str, torch.Tensor]:
    """A Suture-like output folder: weights, config, recipe, report and model card."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = make_tensors(seed)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "mlp", "hidden_size": 16}))
    (path / "suture_recipe.yml").write_text(RECIPE)
    (path / "report.json").write_text(json.dumps({"barrier": 0.02, "seconds": 1.5}))
    write_model_card(path, inputs=["org/model-a", "org/model-b"], method="linear", engine="weight_matching", license=license)
    return tensors


def assert_same_tensors(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_file(str(folder / "model.safetensors"))
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


# ---------------------------------------------------------------------------------------------- push & pull


def test_push_regular_then_pull_round_trip(hub_server, tmp_path):
    out = tmp_path / "out"
    tensors = make_output_dir(out)
    progress: list[tuple[float, str]] = []

    url = push_folder(out, "tester/merged", token=DEFAULT_TOKEN, progress=lambda f, m: progress.append((f, m)))

    assert url == f"{hub_server.url}/tester/merged"
    files = hub_server.list_files("tester/merged")
    assert {"model.safetensors", "config.json", "suture_recipe.yml", "report.json", "README.md"} <= set(files)
    for name in ("model.safetensors", "config.json", "README.md", "suture_recipe.yml"):
        assert hub_server.file_bytes("tester/merged", name) == (out / name).read_bytes()
        assert hub_server.file_entry("tester/merged", name)["lfs"] is False
    # the card went through the Hub's metadata validation and passed it
    assert any("base_model_relation: merge" in text for text in hub_server.validated)
    assert progress[0][0] == 0.0 and progress[-1][0] == 1.0
    assert [f for f, _ in progress] == sorted(f for f, _ in progress)

    folder = resolve_model_ref("tester/merged")
    assert folder.is_dir() and hub_cache_dir() in folder.parents
    assert str(folder).startswith(str(tmp_path / "hf_home" / "hub"))
    assert_same_tensors(folder, tensors)
    assert json.loads((folder / "config.json").read_text()) == {"model_type": "mlp", "hidden_size": 16}
    # only what a merge needs is fetched (no report.json, no recipe, no .gitattributes)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_second_push_without_changes_commits_nothing(hub_server, tmp_path):
    out = tmp_path / "out"
    make_output_dir(out)
    push_folder(out, "tester/merged", token=DEFAULT_TOKEN)
    commits = hub_server.commit_count("tester/merged")
    head = hub_server.head("tester/merged")
    commit_posts = hub_server.count("POST", "/commit/")

    url = push_folder(out, "tester/merged", token=DEFAULT_TOKEN)

    assert url == f"{hub_server.url}/tester/merged"
    assert hub_server.commit_count("tester/merged") == commits
    assert hub_server.head("tester/merged") == head
    assert hub_server.count("POST", "/commit/") == commit_posts

    # a real change is committed, and only then
    (out / "report.json").write_text(json.dumps({"barrier": 0.01}))
    push_folder(out, "tester/merged", token=DEFAULT_TOKEN)
    assert hub_server.commit_count("tester/merged") == commits + 1
    assert json.loads(hub_server.file_bytes("tester/merged", "report.json")) == {"barrier": 0.01}


def test_lfs_upload_and_pull(hub_server, tmp_path, monkeypatch):
    enable_lfs(hub_server, monkeypatch, threshold=4096)
    out = tmp_path / "out"
    tensors = make_output_dir(out)

    push_folder(out, "tester/big", token=DEFAULT_TOKEN)

    weights = hub_server.file_entry("tester/big", "model.safetensors")
    assert weights["lfs"] is True and weights["size"] == (out / "model.safetensors").stat().st_size
    assert hub_server.file_entry("tester/big", "config.json")["lfs"] is False
    assert hub_server.count("POST", "/info/lfs/objects/batch") == 1
    assert hub_server.count("PUT", "/__lfs_upload/") == 1
    assert hub_server.count("POST", "/info/lfs/objects/verify") == 1
    assert hub_server.file_bytes("tester/big", "model.safetensors") == (out / "model.safetensors").read_bytes()

    # unchanged second push: no new LFS transfer, no commit
    commits = hub_server.commit_count("tester/big")
    push_folder(out, "tester/big", token=DEFAULT_TOKEN)
    assert hub_server.count("PUT", "/__lfs_upload/") == 1
    assert hub_server.commit_count("tester/big") == commits

    folder = resolve_model_ref("tester/big")
    assert_same_tensors(folder, tensors)


def test_push_to_branch_and_pull_revisions(hub_server, tmp_path):
    first, second = tmp_path / "v1", tmp_path / "v2"
    t1 = make_output_dir(first, seed=1)
    t2 = make_output_dir(second, seed=2)
    push_folder(first, "tester/merged", token=DEFAULT_TOKEN)
    url = push_folder(second, "tester/merged", revision="dev", token=DEFAULT_TOKEN)

    assert url == f"{hub_server.url}/tester/merged/tree/dev"
    assert hub_server.count("POST", "/branch/dev") == 1
    assert_same_tensors(resolve_model_ref("tester/merged"), t1)
    assert_same_tensors(resolve_model_ref("tester/merged@dev"), t2)
    assert_same_tensors(resolve_model_ref("tester/merged", revision="dev"), t2)
    # a commit hash pins the exact version
    assert_same_tensors(resolve_model_ref(f"tester/merged@{hub_server.head('tester/merged', 'main')}"), t1)
    with pytest.raises(InputError, match="revision"):
        resolve_model_ref("tester/merged@dev", revision="main")
    with pytest.raises(InputError, match="revision 'nope' not found"):
        resolve_model_ref("tester/merged@nope")

    # pushing the same folder to the existing branch again neither fails nor commits
    dev_head = hub_server.head("tester/merged", "dev")
    push_folder(second, "tester/merged", revision="dev", token=DEFAULT_TOKEN)
    assert hub_server.head("tester/merged", "dev") == dev_head
    assert hub_server.head("tester/merged", "main") != dev_head


def test_push_as_pull_request(hub_server, tmp_path):
    first, second = tmp_path / "v1", tmp_path / "v2"
    t1 = make_output_dir(first, seed=1)
    t2 = make_output_dir(second, seed=2)
    push_folder(first, "tester/merged", token=DEFAULT_TOKEN)
    url = push_folder(second, "tester/merged", create_pr=True, commit_message="Try v2", token=DEFAULT_TOKEN)

    assert url == f"{hub_server.url}/tester/merged/discussions/1"
    assert_same_tensors(resolve_model_ref("tester/merged"), t1)  # main untouched
    assert_same_tensors(resolve_model_ref("tester/merged@refs/pr/1"), t2)


def test_private_repo_creation_and_access(hub_server, tmp_path):
    out = tmp_path / "out"
    tensors = make_output_dir(out)
    push_folder(out, "tester/secret", private=True, token=DEFAULT_TOKEN)
    assert hub_server.repos[("model", "tester/secret")].private

    with pytest.raises(InputError) as info:
        resolve_model_ref("tester/secret")
    assert "not found" in str(info.value) and "token" in str(info.value)
    assert_same_tensors(resolve_model_ref("tester/secret", token=DEFAULT_TOKEN), tensors)


# ---------------------------------------------------------------------------------------------- errors


def test_bad_token_gives_clear_401(hub_server, tmp_path):
    out = tmp_path / "out"
    make_output_dir(out)
    bad = "hf_ThisTokenIsNotKnownToTheServer12345"

    with pytest.raises(InputError) as info:
        push_folder(out, "tester/merged", token=bad)
    message = str(info.value)
    assert "401" in message and "rejected the token" in message
    assert bad not in message and bad not in repr(info.value)
    assert info.value.__cause__ is None  # the client's exception (and its request) is not chained

    hub_server.add_repo("tester/private", {"model.safetensors": b"x"}, private=True)
    with pytest.raises(InputError) as info:
        resolve_model_ref("tester/private", token=bad)
    assert "401" in str(info.value) and bad not in str(info.value)


def test_read_only_token_gives_clear_403(hub_server, tmp_path):
    out = tmp_path / "out"
    make_output_dir(out)
    with pytest.raises(InputError) as info:
        push_folder(out, "tester/merged", token=READ_ONLY_TOKEN)
    assert "403" in str(info.value) and "write permission" in str(info.value)
    assert READ_ONLY_TOKEN not in str(info.value)


def test_missing_repo_gives_clear_404(hub_server):
    with pytest.raises(InputError) as info:
        resolve_model_ref("tester/does-not-exist")
    message = str(info.value)
    assert "tester/does-not-exist" in message and "not found" in message and "404" in message


def test_gated_repo_message(hub_server):
    hub_server.add_repo("org/gated", {"model.safetensors": b"x", "config.json": b"{}"}, gated=True)
    with pytest.raises(InputError, match="gated"):
        resolve_model_ref("org/gated", token=DEFAULT_TOKEN)


def test_unreachable_server_fails_fast(tmp_path, monkeypatch):
    point_client_at(monkeypatch, closed_port_url(), tmp_path / "hf_home")
    out = tmp_path / "out"
    make_output_dir(out)

    start = time.monotonic()
    with pytest.raises(InputError) as info:
        resolve_model_ref("org/model-a")
    assert "cannot reach the Hub" in str(info.value) and "not in the local cache" in str(info.value)
    with pytest.raises(InputError) as info:
        push_folder(out, "tester/merged", token=DEFAULT_TOKEN)
    assert "cannot reach the Hub" in str(info.value)
    assert DEFAULT_TOKEN not in str(info.value)
    assert time.monotonic() - start < 10


def test_offline_mode_uses_cache_only(hub_server, tmp_path, monkeypatch):
    out = tmp_path / "out"
    tensors = make_output_dir(out)
    push_folder(out, "tester/merged", token=DEFAULT_TOKEN)
    online = resolve_model_ref("tester/merged")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub_server.requests)
    offline = resolve_model_ref("tester/merged")
    assert offline == online
    assert_same_tensors(offline, tensors)
    with pytest.raises(InputError) as info:
        resolve_model_ref("tester/never-downloaded")
    assert "offline" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)
    with pytest.raises(InputError, match="offline"):
        push_folder(out, "tester/merged", token=DEFAULT_TOKEN)
    assert len(hub_server.requests) == before  # nothing went over the network


def test_pickle_only_repo_refused_unless_allowed(hub_server):
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2, 2)}, buffer)
    hub_server.add_repo("org/old", {"pytorch_model.bin": buffer.getvalue(), "config.json": b"{}"})

    with pytest.raises(InputError) as info:
        resolve_model_ref("org/old")
    assert "pytorch_model.bin" in str(info.value) and "allow" in str(info.value)

    folder = resolve_model_ref("org/old", allow_pickle=True)
    assert (folder / "pytorch_model.bin").is_file()
    assert torch.equal(torch.load(folder / "pytorch_model.bin", weights_only=True)["w"], torch.ones(2, 2))


def test_repo_without_weights(hub_server):
    hub_server.add_repo("org/empty", {"config.json": b"{}", "notes.txt": b"hello"})
    with pytest.raises(InputError, match="no model weights"):
        resolve_model_ref("org/empty", allow_pickle=True)


def test_only_root_weights_are_fetched(hub_server):
    hub_server.add_repo(
        "org/mixed",
        {"model.safetensors": b"root", "onnx/model.safetensors": b"sub", "pytorch_model.bin": b"pickle", "config.json": b"{}"},
    )
    # (the bytes are not valid safetensors: resolving only fetches, opening is the store's job)
    folder = resolve_model_ref("org/mixed")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_local_paths_and_bad_refs(hub_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "org" / "name"
    local.mkdir(parents=True)
    assert resolve_model_ref("org/name") == Path("org/name")  # an existing local path wins over the Hub id
    assert resolve_model_ref(str(local)) == local
    with pytest.raises(InputError, match="not a Hugging Face Hub id"):
        resolve_model_ref("./missing/model.safetensors")
    assert not hub_server.requests


def test_push_needs_a_token_and_a_folder(hub_server, tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        push_folder(tmp_path / "nothing", "tester/merged", token=DEFAULT_TOKEN)
    out = tmp_path / "out"
    make_output_dir(out)
    with pytest.raises(InputError, match="no Hugging Face token"):
        push_folder(out, "tester/merged")
    with pytest.raises(InputError, match="not a valid Hub repository id"):
        push_folder(out, "just-a-name", token=DEFAULT_TOKEN)
    assert not hub_server.requests


def test_invalid_card_metadata_is_reported(hub_server, tmp_path):
    out = tmp_path / "out"
    make_output_dir(out)
    (out / "README.md").write_text("---\nbase_model_relation: merge\n---\n# no base model\n")
    with pytest.raises(InputError, match="Invalid metadata in README.md"):
        push_folder(out, "tester/merged", token=DEFAULT_TOKEN)


# ---------------------------------------------------------------------------------------------- token hygiene


def test_token_never_leaks(hub_server, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("HF_TOKEN", DEFAULT_TOKEN)  # taken from the environment, as users usually do
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    tensors = make_output_dir(out)

    push_folder(out, "tester/merged", progress=lambda f, m: logging.getLogger("test").info(m))
    assert hub_server.requests[-1][2] is True  # the upload was authenticated
    folder = resolve_model_ref("tester/merged")
    assert_same_tensors(folder, tensors)
    with pytest.raises(InputError) as info:
        resolve_model_ref("tester/missing")
    messages = [str(info.value)]

    # a folder that embeds the token is refused, without repeating the token
    (out / "notes.txt").write_text(f"token={DEFAULT_TOKEN}\n")
    with pytest.raises(InputError) as info:
        push_folder(out, "tester/merged")
    assert "notes.txt" in str(info.value)
    messages.append(str(info.value))

    captured = capsys.readouterr()
    assert caplog.records, "expected some log records"
    assert DEFAULT_TOKEN not in caplog.text
    assert all(DEFAULT_TOKEN not in m for m in messages)
    assert DEFAULT_TOKEN not in captured.out + captured.err
    for root in (out, tmp_path / "hf_home"):
        for path in root.rglob("*"):
            if path.is_file() and path.name != "notes.txt":
                assert DEFAULT_TOKEN.encode() not in path.read_bytes(), path
    assert DEFAULT_TOKEN not in (out / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- card + hub


def test_card_license_from_cached_hub_inputs(hub_server, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_output_dir(a, seed=1, license="apache-2.0")
    make_output_dir(b, seed=2, license="apache-2.0")
    push_folder(a, "tester/a", token=DEFAULT_TOKEN)
    push_folder(b, "tester/b", token=DEFAULT_TOKEN)
    resolve_model_ref("tester/a")
    resolve_model_ref("tester/b")
    before = len(hub_server.requests)

    card = build_model_card(inputs=["tester/a", "tester/b"], method="linear")
    assert "license: apache-2.0" in card
    assert len(hub_server.requests) == before  # the card read the cache, not the network
    assert is_hub_id("tester/a")


def test_server_speaks_the_client_protocol(hub_server):
    """The stand-in answers the way the client expects: info with siblings/sha, resolve headers, 404 kinds."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    oid = hub_server.add_repo("org/model", {"config.json": b'{"a": 1}', "model.safetensors": b"weights"})
    api = HfApi(endpoint=hub_server.url, token=False)
    info = api.model_info("org/model")
    assert info.sha == oid == hub_server.head("org/model")
    assert sorted(s.rfilename for s in info.siblings) == [".gitattributes", "config.json", "model.safetensors"]
    assert api.model_info("org/model", revision=oid[:10]).sha == oid

    path = hf_hub_download("org/model", "config.json", endpoint=hub_server.url, token=False)
    assert Path(path).read_bytes() == b'{"a": 1}'
    assert Path(path).parent.name == oid  # X-Repo-Commit placed it in the right snapshot
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("org/model", "missing.json", endpoint=hub_server.url, token=False)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/nothing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/model", revision="no-branch")


def test_sharded_folder_round_trip_opens_as_a_store(hub_server, tmp_path):
    from suture.merge.store import open_store

    out = tmp_path / "out"
    out.mkdir()
    tensors = make_tensors(3)
    first, second = {"layer.weight": tensors["layer.weight"], "layer.bias": tensors["layer.bias"]}, {"embed.weight": tensors["embed.weight"]}
    save_file(first, str(out / "model-00001-of-00002.safetensors"))
    save_file(second, str(out / "model-00002-of-00002.safetensors"))
    weight_map = {n: "model-00001-of-00002.safetensors" for n in first} | {n: "model-00002-of-00002.safetensors" for n in second}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "tokenizer.json").write_text('{"version": "1.0"}')
    (out / ".partial.tmp").write_text("never published")

    push_folder(out, "tester/sharded", token=DEFAULT_TOKEN)
    assert ".partial.tmp" not in hub_server.list_files("tester/sharded")

    folder = resolve_model_ref("tester/sharded")
    assert sorted(p.name for p in folder.iterdir()) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
    ]
    store = open_store(folder)
    assert sorted(store.names()) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(store.get(name), tensor)
