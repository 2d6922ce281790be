"""Language-model evaluation: per-token loss and perplexity for causal and masked LMs, checked against
transformers' own `labels=` loss, seeded masking, plain text cut into blocks, and `evaluate:` in a recipe.

Every model is a tiny GPT-2 or BERT built from a config in the test (random weights; exactness needs no
training) with a word-level tokenizer made here; nothing is downloaded.
"""

from __future__ import annotations

import math
import re
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers as T
import yaml

from suture.merge.data import CalibrationData, iter_batches, load_dataset
from suture.merge.errors import InputError, SutureError
from suture.merge.evaluate import evaluate
from suture.merge.lm_eval import IGNORE_INDEX, lm_data, lm_kind, lm_loss, mask_tokens
from suture.recipes.cli import main
from suture.recipes.runner import run_recipe

WORDS = [f"w{i}" for i in range(90)]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = 100


def _gpt2(seed: int) -> T.GPT2LMHeadModel:
    torch.manual_seed(seed)
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                          initializer_range=0.2, bos_token_id=0, eos_token_id=0)).eval()


def _bert(seed: int, cls: type = T.BertForMaskedLM) -> T.PreTrainedModel:
    torch.manual_seed(seed)
    return cls(T.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, initializer_range=0.2, max_position_embeddings=64)).eval()


def _tokenizer(masked: bool) -> T.PreTrainedTokenizerFast:
    """Word-level: BERT-style ([CLS] text [SEP], a [MASK] token) or GPT-2-style (no special tokens added)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if not masked:
        return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                     sep_token="[SEP]", mask_token="[MASK]")


def _save(model: T.PreTrainedModel, folder: Path, masked: bool, tokenizer: bool = True) -> Path:
    model.save_pretrained(folder)
    if tokenizer:
        _tokenizer(masked).save_pretrained(folder)
    return folder


def _lines(path: Path, n: int = 12, seed: int = 1) -> Path:
    g = torch.Generator().manual_seed(seed)
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(k),), generator=g).tolist())
             for k in torch.randint(5, 14, (n,), generator=g)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- lm_loss against transformers' own loss --------------------------------------------------------------


def test_causal_loss_equals_transformers_labels_loss_and_ignores_padding():
    model = _gpt2(0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (5, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[3, 4:] = 0
    ids[mask == 0] = 0  # padding ids, never scored
    data = lm_data(CalibrationData({"input_ids": ids, "attention_mask": mask}), "causal")
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, labels=data.labels).loss.item()
    scored = int(mask[:, 1:].sum())  # every attended token but each row's first
    for batch_size in (1, 2, 5):
        got = lm_loss(model, iter_batches(data, batch_size), "causal")
        assert got.loss == pytest.approx(expected, rel=1e-5)
        assert got.tokens == scored
        assert got.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    # padding really is ignored: different ids under the padding give the same figure
    ids2 = ids.clone()
    ids2[mask == 0] = 7
    again = lm_loss(model, iter_batches(lm_data(CalibrationData({"input_ids": ids2, "attention_mask": mask}), "causal"), 2), "causal")
    assert again.loss == pytest.approx(expected, rel=1e-5)


def test_masked_loss_equals_transformers_labels_loss_on_the_seeded_mask():
    model = _bert(0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (6, 20), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    mask = torch.ones_like(ids)
    meta = {"tokenizer": {"mask_token_id": 4, "special_ids": [0, 1, 2, 3, 4]}}
    data = lm_data(CalibrationData({"input_ids": ids, "attention_mask": mask}, meta=meta), "masked", seed=3)
    chosen = data.labels != IGNORE_INDEX
    assert bool(chosen.any())
    assert torch.equal(data.inputs["input_ids"][chosen], torch.full((int(chosen.sum()),), 4))
    assert torch.equal(data.labels[chosen], ids[chosen]) and torch.equal(data.inputs["input_ids"][~chosen], ids[~chosen])
    with torch.no_grad():
        expected = model(**data.inputs, labels=data.labels).loss.item()
    got = lm_loss(model, iter_batches(data, 4), "masked")
    assert got.loss == pytest.approx(expected, rel=1e-5) and got.tokens == int(chosen.sum())


def test_masking_is_reproducible_per_item_and_spares_special_tokens_and_padding():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, VOCAB, (400, 30), generator=g)
    ids[:, 0], ids[:, 1] = 2, 3
    mask = torch.ones_like(ids)
    mask[::2, 20:] = 0
    masked, targets = mask_tokens(ids, mask, mask_token_id=4, special_ids=[2, 3], rate=0.15, seed=7)
    again, targets2 = mask_tokens(ids, mask, mask_token_id=4, special_ids=[2, 3], rate=0.15, seed=7)
    assert torch.equal(masked, again) and torch.equal(targets, targets2)
    other, _ = mask_tokens(ids, mask, mask_token_id=4, special_ids=[2, 3], rate=0.15, seed=8)
    assert not torch.equal(masked, other)
    chosen = targets != IGNORE_INDEX
    assert not chosen[:, :2].any() and not chosen[mask == 0].any()
    eligible = int(mask[:, 2:].sum())
    assert abs(int(chosen.sum()) / eligible - 0.15) < 0.01  # 15 % of ~10,000 tokens, binomial sd ~0.004
    # an item's mask does not depend on the padded width or on the other items
    part, _ = mask_tokens(ids[:3, :25], mask[:3, :25], mask_token_id=4, special_ids=[2, 3], seed=7)
    assert torch.equal(part, masked[:3, :25])


def test_lm_kind_and_a_non_lm_model_is_refused_in_one_line():
    assert lm_kind(_gpt2(0)) == "causal" and lm_kind(_bert(0)) == "masked"
    classifier = _bert(0, T.BertForSequenceClassification)
    assert lm_kind(classifier) is None
    data = lm_data(CalibrationData({"input_ids": torch.randint(5, VOCAB, (2, 6))}), "causal")
    with pytest.raises(InputError, match=r"^model BertForSequenceClassification returns logits of shape \(2, 2\).*language model") as err:
        lm_loss(classifier, iter_batches(data, 2), "causal")
    assert "\n" not in str(err.value)


# --- text data --------------------------------------------------------------------------------------------


def test_plain_text_is_cut_into_blocks_with_special_tokens(tmp_path):
    text = _lines(tmp_path / "plain.txt", n=20)
    tok = _tokenizer(masked=True)
    words = text.read_text().split()
    data = load_dataset(f"{text}?block_size=10", tokenizer=tok)
    ids = data.inputs["input_ids"]
    assert ids.shape == (len(words) // 8, 10) and bool(data.inputs["attention_mask"].all())
    assert (ids[:, 0] == 2).all() and (ids[:, -1] == 3).all()  # [CLS] 8 words [SEP]
    assert tok.convert_ids_to_tokens(ids[1, 1:-1].tolist()) == words[8:16]
    assert data.meta["tokenizer"]["mask_token_id"] == 4
    gpt = load_dataset(f"{text}?block_size=10", tokenizer=_tokenizer(masked=False))
    assert gpt.inputs["input_ids"].shape == (len(words) // 10, 10)


def test_text_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    for spec, pattern in [(str(empty), "no text lines"), (f"{empty}?block_size=8", "no text"),
                          (f"{_lines(tmp_path / 'short.txt', n=1)}?block_size=64", "fewer than one block of 64")]:
        with pytest.raises(InputError, match=pattern) as err:
            load_dataset(spec, tokenizer=_tokenizer(masked=False))
        assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="needs a tokenizer"):
        load_dataset(str(_lines(tmp_path / "x.txt")))
    unmaskable = load_dataset(str(_lines(tmp_path / "y.txt")), tokenizer=_tokenizer(masked=False))
    with pytest.raises(InputError, match="needs a mask token"):
        evaluate(_bert(0), unmaskable)


def test_evaluate_scores_text_per_token_for_both_kinds(tmp_path):
    text = _lines(tmp_path / "lines.txt")
    for model, masked in ((_gpt2(1), False), (_bert(1), True)):
        data = load_dataset(str(text), tokenizer=_tokenizer(masked))
        got = evaluate(model, data, batch_size=5)
        prepared = lm_data(data, lm_kind(model))
        with torch.no_grad():
            expected = model(**prepared.inputs, labels=prepared.labels).loss.item()
        assert got["loss"] == pytest.approx(expected, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5) and got["tokens"] > 0


# --- recipes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_recipe_reports_per_token_loss_perplexity_and_the_lm_barrier(tmp_path, family):
    masked = family == "bert"
    build = _bert if masked else _gpt2
    a = _save(build(1), tmp_path / "a", masked)
    b = _save(build(2), tmp_path / "b", masked)
    text = _lines(tmp_path / "eval.txt", n=30)
    spec = f"{text}?block_size=12"
    recipe = {"merge_method": "linear",
              "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}],
              "evaluate": {"data": spec, "points": 5, "plot": False, "mask_seed": 4, "batch_size": 8}}
    result = run_recipe(recipe, tmp_path / "out")
    ev = result.report["evaluation"]
    assert ev["language_model"]["kind"] == ("masked" if masked else "causal")
    # each endpoint's figures are transformers' own loss on the same seeded targets
    data = lm_data(load_dataset(spec, tokenizer=_tokenizer(masked)), "masked" if masked else "causal", seed=4)
    for key, model in ((str(a), build(1)), (str(b), build(2))):
        with torch.no_grad():
            expected = model(**data.inputs, labels=data.labels).loss.item()
        row = ev["models"][key]
        assert row["loss"] == pytest.approx(expected, rel=1e-5)
        assert row["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    curve = ev["curves"]["naive"]
    assert [p["t"] for p in curve] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve[0]["loss"] == pytest.approx(ev["models"][str(a)]["loss"], rel=1e-6)
    assert curve[-1]["loss"] == pytest.approx(ev["models"][str(b)]["loss"], rel=1e-6)
    assert curve[2]["loss"] == pytest.approx(ev["merged"]["loss"], rel=1e-5)  # linear 0.5/0.5 is the midpoint
    line = [(1 - p["t"]) * curve[0]["loss"] + p["t"] * curve[-1]["loss"] for p in curve]
    assert ev["barriers"]["naive"]["loss"] == pytest.approx(max(p["loss"] - y for p, y in zip(curve, line)), abs=1e-9)
    assert ev["barriers"]["naive"]["loss_midpoint"] == pytest.approx(curve[2]["loss"] - line[2], abs=1e-9)
    summary = result.summary()
    assert f"{'merged':<28} accuracy" in summary and "perplexity" in summary and "LM per token" in summary


def test_masked_lm_figures_depend_on_the_mask_seed_only_through_the_recipe(tmp_path):
    a = _save(_bert(1), tmp_path / "a", masked=True)
    text = _lines(tmp_path / "eval.txt", n=20)
    losses = []
    for i, seed in enumerate((0, 0, 5)):
        recipe = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1.0}}],
                  "evaluate": {"data": str(text), "plot": False, "mask_seed": seed}}
        losses.append(run_recipe(recipe, tmp_path / f"out{i}").report["evaluation"]["merged"]["loss"])
    assert losses[0] == losses[1] and losses[0] != losses[2]


def test_recipe_errors_for_lm_evaluation_are_one_line(tmp_path, capsys):
    text = _lines(tmp_path / "eval.txt")
    no_tok = _save(_gpt2(1), tmp_path / "no-tok", masked=False, tokenizer=False)
    classifier = _save(_bert(1, T.BertForSequenceClassification), tmp_path / "cls", masked=True)
    for folder, pattern in ((no_tok, "needs a tokenizer (pass tokenizer=; in a recipe, the reference model's folder"), (classifier, "has no causal or masked LM head")):
        recipe = {"merge_method": "linear", "models": [{"model": str(folder), "parameters": {"weight": 1.0}}],
                  "evaluate": {"data": str(text), "plot": False}}
        with pytest.raises(SutureError, match=re.escape(pattern)) as err:
            run_recipe(recipe, tmp_path / f"out-{folder.name}")
        assert "\n" not in str(err.value)
        recipe_file = tmp_path / f"{folder.name}.yaml"
        recipe_file.write_text(yaml.safe_dump(recipe), encoding="utf-8")
        capsys.readouterr()  # progress bars of the saves above
        assert main(["run", str(recipe_file), str(tmp_path / f"cli-{folder.name}"), "-q"]) != 0
        err_text = capsys.readouterr().err.strip()
        assert pattern in err_text and len(err_text.splitlines()) == 1
