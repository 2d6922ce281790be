"""Tokenizer settings (``union``, ``base``, a model) remap embedding rows exactly as mergekit 0.1.5 does.

The models' word-level vocabularies differ (each fine-tune adds its own words, two of them share one), so
every setting changes some model's rows. mergekit numbers the tokens a ``union`` adds in an order that
changes from run to run, so vocabulary-sized tensors are compared row by row through the token strings;
Suture's own numbering must be the same in every run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.parity.conftest import NEEDS_MERGEKIT, Zoo, compare, config_of, load_dir, run_mergekit, run_suture

pytest.importorskip("mergekit", reason=NEEDS_MERGEKIT)

VOCAB_TENSORS = {"model.embed_tokens.weight", "lm_head.weight", "transformer.wte.weight", "wte.weight"}


def vocabulary(folder: Path) -> dict[str, int]:
    """token -> id of an output folder's tokenizer (tokenizer.json's model vocabulary plus added tokens)."""
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = dict(data["model"]["vocab"])
    for tok in data.get("added_tokens", []):
        vocab[tok["content"]] = tok["id"]
    return vocab


def by_token(tensors: dict[str, torch.Tensor], vocab: dict[str, int]) -> dict[str, torch.Tensor]:
    """Vocabulary-sized tensors re-ordered by token string (rows past the vocabulary kept in order)."""
    order = sorted(vocab, key=str)
    out = dict(tensors)
    for name in VOCAB_TENSORS & set(tensors):
        t = tensors[name]
        rows = [vocab[tok] for tok in order]
        out[name] = torch.cat([t[rows], t[len(vocab):]]) if t.shape[0] > len(vocab) else t[rows]
    return out


def _recipe(method: str, source: Any, zoo: Zoo, family: str) -> dict:
    b, f1, f2 = (zoo.path(family, n, tokenizer=True) for n in ("base", "ft1", "ft2"))
    src = {"base": "base", "union": "union", "ft2": f2}[source]
    r: dict[str, Any] = {"merge_method": method, "dtype": "float32", "tokenizer_source": src}
    if method == "linear":
        r["models"] = [{"model": f1, "parameters": {"weight": 0.3}}, {"model": f2, "parameters": {"weight": 0.7}},
                       {"model": b, "parameters": {"weight": 0.2}}]
        r["base_model"] = b
    elif method == "slerp":
        r["base_model"] = b
        r["models"] = [{"model": b}, {"model": f2}]
        r["parameters"] = {"t": [0.2, 0.7]}
    else:
        r["base_model"] = b
        r["models"] = [{"model": f1, "parameters": {"weight": 0.6, "density": 0.5}},
                       {"model": f2, "parameters": {"weight": 0.4, "density": 0.7}}]
    return r


CASES = [("linear", "union", "llama"), ("ties", "union", "qwen2"), ("slerp", "union", "mistral"),
         ("linear", "base", "qwen2"), ("task_arithmetic", "base", "llama"), ("linear", "ft2", "mistral"),
         ("ties", "ft2", "llama"), ("task_arithmetic", "union", "gpt2")]


@pytest.mark.parametrize(("method", "source", "family"), CASES, ids=["-".join(c) for c in CASES])
def test_tokenizer_source_matches_mergekit(method: str, source: str, family: str, zoo: Zoo, tmp_path: Path) -> None:
    recipe = _recipe(method, source, zoo, family)
    mk = run_mergekit(recipe, tmp_path / "mergekit")
    su = run_suture(recipe, tmp_path / "suture")
    v_mk, v_su = vocabulary(mk), vocabulary(su)
    assert sorted(v_su) == sorted(v_mk), "the output vocabularies hold different tokens"
    assert config_of(su)["vocab_size"] == config_of(mk)["vocab_size"]
    ours, theirs = load_dir(su), load_dir(mk)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    compare(by_token(ours, v_su), by_token(theirs, v_mk))
    if source == "union":
        # Suture numbers the union deterministically: a second run gives the same ids and bytes
        again = run_suture(recipe, tmp_path / "suture-again")
        assert vocabulary(again) == v_su
        assert all(torch.equal(load_dir(again)[k], ours[k]) for k in ours)


def test_tokenizer_tokens_and_padding_match_mergekit(zoo: Zoo, tmp_path: Path) -> None:
    """``tokenizer:`` with per-token embedding sources (a model, a model's token, zero, forced) and padding."""
    b, f1, f2 = (zoo.path("llama", n, tokenizer=True) for n in ("base", "ft1", "ft2"))
    recipe = {
        "merge_method": "ties", "dtype": "float32", "base_model": b,
        "models": [{"model": f1, "parameters": {"weight": 0.5, "density": 0.6}},
                   {"model": f2, "parameters": {"weight": 0.5, "density": 0.6}}],
        "tokenizer": {
            "source": "union", "pad_to_multiple_of": 8,
            "tokens": {
                "ft1_x0": {"source": f1},
                "ft2_x1": {"source": {"kind": "model_token", "model": f2, "token": "w3"}},
                "shared_0": {"source": {"kind": "zero"}},
                "w5": {"source": f2, "force": True},
            },
        },
    }
    mk = run_mergekit(recipe, tmp_path / "mergekit")
    su = run_suture(recipe, tmp_path / "suture")
    v_mk, v_su = vocabulary(mk), vocabulary(su)
    assert sorted(v_su) == sorted(v_mk)
    ours, theirs = load_dir(su), load_dir(mk)
    assert ours["model.embed_tokens.weight"].shape == theirs["model.embed_tokens.weight"].shape
    assert ours["model.embed_tokens.weight"].shape[0] % 8 == 0
    compare(by_token(ours, v_su), by_token(theirs, v_mk))
