"""Tokenizer handling for merges: vocabulary plans, embedding row remaps, written tokenizers, chat templates.

Every tokenizer here is built in the test from a tiny in-test vocabulary (WordLevel, BPE, WordPiece), saved with
transformers, and read back with AutoTokenizer; nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from suture.merge.errors import InputError, RecipeError
from suture.merge.tokenizer import (
    BUILTIN_CHAT_TEMPLATES,
    VocabPlan,
    apply_chat_template,
    copy_tokenizer_files,
    embedding_remaps,
    embedding_tensor_names,
    load_vocab,
    plan_vocabulary,
    row_remap,
    updated_config,
    write_tokenizer_files,
)

HIDDEN = 4
SPECIALS = ["<unk>", "<s>", "</s>"]


def make_wordlevel(folder: Path, words: list[str], added: list[str], rows: int | None, seed: int) -> torch.Tensor:
    """Save a WordLevel tokenizer (SPECIALS + words, then `added` special tokens) and config.json; return its embedding."""
    vocab = {t: i for i, t in enumerate(SPECIALS + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if added:
        fast.add_special_tokens({"additional_special_tokens": added})
    fast.save_pretrained(folder)
    n = len(vocab) + len(added)
    rows = n if rows is None else rows
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": rows, "bos_token_id": 1, "eos_token_id": 2}))
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, HIDDEN, generator=gen)


@pytest.fixture()
def three(tmp_path: Path):
    """base / m1 / m2 with overlapping vocabularies; m2 has an added token beyond its embedding rows."""
    dirs = {k: tmp_path / k for k in ("base", "m1", "m2")}
    emb = {
        "base": make_wordlevel(dirs["base"], ["the", "cat", "dog"], [], None, 0),
        "m1": make_wordlevel(dirs["m1"], ["the", "dog", "bird", "fish"], ["<|im_start|>"], None, 1),
        "m2": make_wordlevel(dirs["m2"], ["cat", "the", "fish"], ["<tool>", "<UNUSED>"], 7, 2),
    }
    return dirs, emb


UNION = SPECIALS + ["the", "cat", "dog", "bird", "fish", "<|im_start|>", "<tool>"]


def loader(emb: dict[str, torch.Tensor], calls: list[str]):
    def load(key: str) -> torch.Tensor:
        calls.append(key)
        return emb[key]

    return load


def remap_all(plan: VocabPlan, emb: dict[str, torch.Tensor], calls: list[str] | None = None) -> dict[str, torch.Tensor]:
    calls = [] if calls is None else calls
    remaps = embedding_remaps(plan, loader(emb, calls))
    return {k: remaps[k](emb[k]) for k in remaps}


# ------------------------------------------------------------------------------------------------ planning


def test_union_vocabulary_order_and_row_index(three):
    dirs, _ = three
    plan = plan_vocabulary("union", dirs, "base")
    assert plan.tokens == UNION
    assert plan.donor == "base" and plan.source == "union" and plan.base == "base"
    assert "<UNUSED>" not in plan.tokens  # its id 7 is beyond m2's 7 embedding rows
    assert plan.row_index["base"].tolist() == [0, 1, 2, 3, 4, 5, -1, -1, -1, -1]
    assert plan.row_index["m1"].tolist() == [0, 1, 2, 3, -1, 4, 5, 6, 7, -1]
    assert plan.row_index["m2"].tolist() == [0, 1, 2, 4, 3, -1, -1, 5, -1, 6]
    assert plan.added["bird"]["special"] is False and plan.added["<tool>"]["special"] is True


def test_tokenizer_mapping_defaults_to_union_and_no_setting_means_no_plan(three):
    dirs, _ = three
    assert plan_vocabulary(None, dirs, "base") is None
    assert plan_vocabulary({}, dirs, "base").tokens == UNION
    # without a base model the first model is the donor, and no row is preferred as "base"
    plan = plan_vocabulary({"source": "union"}, {"m1": dirs["m1"], "base": dirs["base"]}, None)
    assert plan.donor == "m1" and plan.base is None
    assert plan.tokens[:8] == SPECIALS + ["the", "dog", "bird", "fish", "<|im_start|>"]
    assert plan.tokens[8:] == ["cat"]


def test_source_model_and_base(three):
    dirs, _ = three
    plan = plan_vocabulary("m2", dirs, "base")
    assert plan.donor == "m2" and plan.source == "m2"
    assert plan.tokens == SPECIALS + ["cat", "the", "fish", "<tool>"]
    assert plan.row_index["base"].tolist() == [0, 1, 2, 4, 3, -1, -1]
    base_plan = plan_vocabulary({"source": "base"}, dirs, "base")
    assert base_plan.tokens == SPECIALS + ["the", "cat", "dog"]
    assert base_plan.is_identity("base") and not base_plan.is_identity("m1")
    # a model given by its folder path resolves to its key
    assert plan_vocabulary(str(dirs["m1"]), dirs, "base").donor == "m1"


def test_pad_to_multiple_of(three):
    dirs, emb = three
    plan = plan_vocabulary({"source": "union", "pad_to_multiple_of": 8}, dirs, "base")
    assert len(plan.tokens) == 16 and plan.tokens[:10] == UNION
    assert plan.placeholders == frozenset(range(10, 16)) and plan.tokens[10] == "<|placeholder_10|>"
    assert all((plan.row_index[k][10:] == -1).all() for k in dirs)
    out = remap_all(plan, emb)
    for k, t in out.items():
        assert t.shape == (16, HIDDEN)
        assert torch.allclose(t[10:], t[:10].mean(0).expand(6, HIDDEN), atol=1e-6)
    # already a multiple: nothing added
    assert len(plan_vocabulary({"source": "base", "pad_to_multiple_of": 3}, dirs, "base").tokens) == 6


# ------------------------------------------------------------------------------------------- row remaps


def test_embedding_remaps_follow_mergekit_defaults(three):
    dirs, emb = three
    plan = plan_vocabulary("union", dirs, "base")
    calls: list[str] = []
    out = remap_all(plan, emb, calls)
    b, m1, m2 = emb["base"], emb["m1"], emb["m2"]
    for k in dirs:  # every model keeps the rows it has
        idx = plan.row_index[k]
        assert torch.equal(out[k][idx >= 0], emb[k][idx[idx >= 0]])
    assert torch.equal(out["m1"][4], b[4])  # cat: base has it -> base's row
    assert torch.equal(out["m2"][5], b[5])  # dog: base's row
    assert torch.equal(out["base"][6], m1[5]) and torch.equal(out["m2"][6], m1[5])  # bird: only m1
    assert torch.allclose(out["base"][7], (m1[6] + m2[5]) / 2)  # fish: not in base -> mean of holders
    assert torch.equal(out["base"][8], m1[7]) and torch.equal(out["m2"][8], m1[7])  # <|im_start|>
    assert torch.equal(out["base"][9], m2[6]) and torch.equal(out["m1"][9], m2[6])  # <tool>
    # defaults are computed once: each other model loaded at most once, the first one never
    assert sorted(calls) == sorted(set(calls)) and "base" not in calls
    # a subset of models still prefers the base model's row, as mergekit always includes the base
    sub = embedding_remaps(plan, loader(emb, []), models=["m1", "m2"])
    assert set(sub) == {"m1", "m2", "base"}
    assert torch.equal(sub["m1"](m1)[4], b[4])


def test_without_base_the_mean_of_holders_is_used(three):
    dirs, emb = three
    plan = plan_vocabulary("union", dirs, None)
    assert plan.donor == "base" and plan.base is None
    out = remap_all(plan, emb)
    assert torch.allclose(out["m1"][4], (emb["base"][4] + emb["m2"][3]) / 2)  # cat
    assert torch.allclose(out["m2"][5], (emb["base"][5] + emb["m1"][4]) / 2)  # dog


def test_token_overrides_force_zero_and_model_token(three):
    dirs, emb = three
    setting = {
        "source": "union",
        "tokens": {
            "dog": {"source": "m1", "force": True},
            "the": {"source": {"kind": "zero"}, "force": True},
            "cat": {"source": "m2"},
            "<new>": {"source": {"kind": "model_token", "model": "m2", "token": "fish"}},
            "<new2>": {"source": {"kind": "model_token", "model": "m1", "token_id": 7}},
        },
    }
    plan = plan_vocabulary(setting, dirs, "base")
    assert plan.tokens == UNION + ["<new>", "<new2>"]
    out = remap_all(plan, emb)
    for k in dirs:
        assert torch.equal(out[k][5], emb["m1"][4])  # dog forced from m1 for everyone
        assert torch.count_nonzero(out[k][3]) == 0  # the forced to zeros
        assert torch.equal(out[k][10], emb["m2"][5])  # <new> = m2's fish
        assert torch.equal(out[k][11], emb["m1"][7])  # <new2> = m1's id 7
    assert torch.equal(out["m1"][4], emb["m2"][3])  # cat: configured source instead of base
    assert torch.equal(out["base"][4], emb["base"][4])  # not forced: holders keep their own
    # bias-like 1-D tensors are remapped the same way
    bias = {k: v[:, 0].contiguous() for k, v in emb.items()}
    out1 = remap_all(plan, bias)
    assert torch.equal(out1["m1"][5], emb["m1"][4, 0]) and out1["base"].shape == (12,)


def test_row_remap_alone_fills_per_model(three):
    dirs, emb = three
    plan = plan_vocabulary({"source": "union", "pad_to_multiple_of": 4, "tokens": {"the": {"source": {"kind": "zero"}, "force": True}}}, dirs, "base")
    m1 = emb["m1"]
    out = row_remap(plan, "m1")(m1)
    present = torch.tensor([0, 1, 2, 5, 6, 7, 8])  # output rows m1 has, minus the forced "the"
    assert torch.equal(out[present], m1[plan.row_index["m1"][present]])
    assert torch.count_nonzero(out[3]) == 0
    mean = out[present].mean(0)
    assert torch.allclose(out[4], mean) and torch.allclose(out[9], mean)  # cat, <tool>: mean of its own rows
    assert torch.allclose(out[10:12], out[:10].mean(0).expand(2, HIDDEN), atol=1e-6)  # padding
    zero = row_remap(plan, "m1", fill="zero")(m1)
    assert torch.count_nonzero(zero[4]) == 0 and torch.count_nonzero(zero[9]) == 0
    # identity for the donor of a base plan
    base_plan = plan_vocabulary("base", dirs, "base")
    t = emb["base"]
    assert row_remap(base_plan, "base")(t) is t


def test_remap_rejects_a_tensor_with_too_few_rows(three):
    dirs, emb = three
    plan = plan_vocabulary("union", dirs, "base")
    with pytest.raises(InputError, match="m1"):
        embedding_remaps(plan, loader(emb, []))["m1"](emb["m1"][:5])


# ------------------------------------------------------------------------------------------ written files


def _check_tokenizer(out: Path, plan: VocabPlan, not_words: tuple[str, ...] = ()) -> None:
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == len(plan.token_ids())
    for t, i in plan.token_ids().items():
        assert tok.convert_tokens_to_ids(t) == i, t
        if t not in not_words:  # a word-continuation piece (##s) is not produced from its own text
            assert tok.encode(t, add_special_tokens=False) == [i], t


def test_written_union_tokenizer_loads_and_encodes_every_token(three, tmp_path):
    dirs, _ = three
    plan = plan_vocabulary({"source": "union", "pad_to_multiple_of": 8}, dirs, "base")
    out = tmp_path / "out"
    names = write_tokenizer_files(plan, dirs, out)
    assert "tokenizer.json" in names and "tokenizer_config.json" in names
    _check_tokenizer(out, plan)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("the bird <tool> fish", add_special_tokens=False).input_ids == [3, 6, 9, 7]
    assert "<UNUSED>" not in tok.get_vocab() and "<|placeholder_10|>" not in tok.get_vocab()
    decoder = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert decoder["8"]["content"] == "<|im_start|>" and decoder["8"]["special"] is True
    assert decoder["6"]["content"] == "bird" and decoder["6"]["special"] is False
    assert load_vocab(out) == plan.token_ids()


def test_written_tokenizer_for_model_source_drops_rowless_tokens(three, tmp_path):
    dirs, _ = three
    plan = plan_vocabulary("m2", dirs, "base")
    out = tmp_path / "out"
    write_tokenizer_files(plan, dirs, out)
    _check_tokenizer(out, plan)
    assert "<UNUSED>" not in load_vocab(out)


def test_base_source_copies_files_unchanged(three, tmp_path):
    dirs, _ = three
    plan = plan_vocabulary("base", dirs, "base")
    out = tmp_path / "out"
    names = write_tokenizer_files(plan, dirs, out)
    assert set(names) == {"tokenizer.json", "tokenizer_config.json"}
    for n in names:
        assert (out / n).read_bytes() == (dirs["base"] / n).read_bytes()


def test_transformers4_style_config_is_patched(three, tmp_path):
    dirs, _ = three
    cfg_path = dirs["base"] / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    cfg["added_tokens_decoder"] = {str(i): {"content": t, **flags} for i, t in enumerate(SPECIALS)}
    cfg["additional_special_tokens"] = []
    cfg_path.write_text(json.dumps(cfg))
    (dirs["base"] / "added_tokens.json").write_text(json.dumps({}))
    plan = plan_vocabulary("union", dirs, "base")
    out = tmp_path / "out"
    write_tokenizer_files(plan, dirs, out)
    decoder = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {int(i): e["content"] for i, e in decoder.items()} == {i: UNION[i] for i in (0, 1, 2, 6, 7, 8, 9)}
    assert json.loads((out / "added_tokens.json").read_text()) == {t: i for i, t in enumerate(UNION) if i >= 6}
    _check_tokenizer(out, plan)


def _bpe(folder: Path, corpus: list[str], rows_cut: int, seed: int) -> torch.Tensor:
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=60, special_tokens=SPECIALS, show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    rows = tk.get_vocab_size() - rows_cut
    (folder / "config.json").write_text(json.dumps({"vocab_size": rows}))
    return torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(seed))


def test_bpe_union_and_stripping_prunes_merges(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _bpe(a, ["the cat sat on the mat", "a cat and a hat"] * 5, 3, 0)  # last 3 merged tokens have no rows
    _bpe(b, ["dogs dig deep ditches", "the dog is digging"] * 5, 0, 1)
    dirs = {"a": a, "b": b}
    vocab_a = load_vocab(a)
    rows_a = json.loads((a / "config.json").read_text())["vocab_size"]
    dropped = [t for t, i in vocab_a.items() if i >= rows_a]
    plan = plan_vocabulary("union", dirs, "a")
    assert plan.tokens[:rows_a] == [t for t, _ in sorted(vocab_a.items(), key=lambda kv: kv[1])][:rows_a]
    out = tmp_path / "out"
    write_tokenizer_files(plan, dirs, out)
    tok = AutoTokenizer.from_pretrained(out)
    for t, i in plan.token_ids().items():
        assert tok.convert_tokens_to_ids(t) == i, t
    merges = json.loads((out / "tokenizer.json").read_text())["model"]["merges"]
    for m in merges:
        left, right = m if isinstance(m, list) else m.split(" ")
        assert left + right not in dropped
    # base text still tokenizes, and only into ids that have embedding rows in a's part of the vocabulary
    ids = tok("the cat sat on the mat", add_special_tokens=False).input_ids
    assert ids and all(i < rows_a for i in ids) and tok.unk_token_id not in ids
    # source a alone: dropped tokens disappear from the written tokenizer
    base_plan = plan_vocabulary("base", dirs, "a")
    write_tokenizer_files(base_plan, dirs, tmp_path / "out_a")
    assert load_vocab(tmp_path / "out_a") == base_plan.token_ids()


def test_wordpiece_donor_without_tokenizer_json(tmp_path, three):
    dirs, _ = three
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "##s"]) + "\n")
    (bert / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    (bert / "config.json").write_text(json.dumps({"vocab_size": 8}))
    plan = plan_vocabulary("union", {"bert": bert, "m1": dirs["m1"]}, "bert")
    assert plan.tokens[:8] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "##s"]
    assert "dog" in plan.tokens and "<|im_start|>" in plan.tokens
    out = tmp_path / "out"
    assert "tokenizer.json" in write_tokenizer_files(plan, {"bert": bert, "m1": dirs["m1"]}, out)
    _check_tokenizer(out, plan, not_words=("##s",))
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("the cats bird", add_special_tokens=False).input_ids == [5, 6, 7, plan.tokens.index("bird")]


def test_donor_with_an_id_gap(three, tmp_path):
    dirs, emb = three
    gap = tmp_path / "gap"
    gap.mkdir()
    data = json.loads((dirs["base"] / "tokenizer.json").read_text())
    data["model"]["vocab"] = {"<unk>": 0, "<s>": 1, "</s>": 2, "the": 3, "cat": 5}  # nothing at id 4
    (gap / "tokenizer.json").write_text(json.dumps(data))
    (gap / "config.json").write_text(json.dumps({"vocab_size": 6}))
    dirs = {"gap": gap, "m1": dirs["m1"]}
    plan = plan_vocabulary("base", dirs, "gap")
    assert plan.tokens[4] == "<|placeholder_4|>" and plan.placeholders == frozenset({4})
    out = embedding_remaps(plan, loader({"gap": emb["base"], "m1": emb["m1"]}, []))["gap"](emb["base"])
    assert torch.allclose(out[4], out[[0, 1, 2, 3, 5]].mean(0))
    write_tokenizer_files(plan, dirs, tmp_path / "out")  # nothing to change: copied as is
    with pytest.raises(InputError, match="not contiguous"):
        write_tokenizer_files(plan_vocabulary("union", dirs, "gap"), dirs, tmp_path / "out2")


def test_updated_config(three):
    dirs, _ = three
    plan = plan_vocabulary({"source": "m2", "pad_to_multiple_of": 4}, dirs, "base")
    cfg = {"model_type": "llava", "vocab_size": 6, "text_config": {"vocab_size": 6}, "eos_token_id": 2, "pad_token_id": [3]}
    new = updated_config(cfg, plan, config_model="base")
    assert new["vocab_size"] == 8 and new["text_config"]["vocab_size"] == 8
    assert new["eos_token_id"] == 2 and new["pad_token_id"] == [4]  # base's id 3 is "the", id 4 in m2's vocabulary
    assert cfg["vocab_size"] == 6  # input untouched
    assert updated_config({"model_type": "x"}, plan)["vocab_size"] == 8


# ---------------------------------------------------------------------------------------------- errors


def test_model_without_tokenizer_files(three, tmp_path):
    dirs, _ = three
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(InputError, match=str(bare)):
        load_vocab(bare)
    with pytest.raises(InputError, match="bare"):
        plan_vocabulary("union", {"bare": bare, **dirs}, "bare")
    # a non-donor without files: an error unless its config shows the donor's vocabulary size
    (bare / "config.json").write_text(json.dumps({"vocab_size": 99}))
    with pytest.raises(InputError, match="no tokenizer files"):
        plan_vocabulary("union", {**dirs, "bare": bare}, "base")
    (bare / "config.json").write_text(json.dumps({"vocab_size": 6}))
    plan = plan_vocabulary("union", {**dirs, "bare": bare}, "base")
    assert torch.equal(plan.row_index["bare"], plan.row_index["base"])


@pytest.mark.parametrize(
    ("setting", "error", "match"),
    [
        ("m9", RecipeError, r"'m9'.*'base', 'union'"),
        ({"source": "nope"}, RecipeError, "tokenizer.source"),
        ({"source": "union", "colour": 1}, RecipeError, "colour"),
        ({"pad_to_multiple_of": 0}, RecipeError, "pad_to_multiple_of"),
        ({"tokens": {"bird": {"source": "m2"}}}, RecipeError, "has no token 'bird'"),
        ({"tokens": {"x": {"source": "m7"}}}, RecipeError, "tokenizer.tokens.x.source"),
        ({"tokens": {"x": {"source": {"kind": "model_token", "model": "m1"}}}}, RecipeError, "exactly one"),
        ({"tokens": {"x": {"source": {"kind": "model_token", "model": "m1", "token": "zzz"}}}}, RecipeError, "no token 'zzz'"),
        ({"tokens": {"x": {"source": {"kind": "model_token", "model": "m1", "token_id": 50}}}}, RecipeError, "beyond"),
        ({"tokens": {"x": {"source": {"kind": "mean"}}}}, RecipeError, "kind"),
        ({"tokens": {"x": {"force": "yes"}}}, RecipeError, "force"),
    ],
)
def test_bad_settings(three, setting, error, match):
    dirs, _ = three
    with pytest.raises(error, match=match):
        plan_vocabulary(setting, dirs, "base")


def test_base_must_be_loaded(three):
    dirs, _ = three
    with pytest.raises(RecipeError, match="base_model"):
        plan_vocabulary("union", dirs, "other")


# ------------------------------------------------------------------------------------------ vocab readers


def test_load_vocab_from_slow_files(tmp_path):
    d = tmp_path / "gpt"
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (d / "added_tokens.json").write_text(json.dumps({"<x>": 3}))
    assert load_vocab(d) == {"a": 0, "b": 1, "ab": 2, "<x>": 3}
    w = tmp_path / "bert"
    w.mkdir()
    (w / "vocab.txt").write_text("[PAD]\nhello\n##s\n")
    (w / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"3": {"content": "[NEW]", "special": True}}}))
    assert load_vocab(w) == {"[PAD]": 0, "hello": 1, "##s": 2, "[NEW]": 3}


def _proto_bytes(field_no: int, payload: bytes) -> bytes:
    out, n = bytearray([(field_no << 3) | 2]), len(payload)
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out) + payload


def test_load_vocab_from_sentencepiece_model(tmp_path):
    pieces = ["<unk>", "<s>", "</s>", "\u2581the", "\u2581caf\u00e9"] + [f"p{i}" for i in range(200)]
    blob = b""
    for p in pieces:  # SentencePiece{piece=1, score=2 (float), type=3 (varint)}
        body = _proto_bytes(1, p.encode()) + bytes([(2 << 3) | 5]) + struct.pack("<f", -1.5) + bytes([3 << 3, 1])
        blob += _proto_bytes(1, body)
    blob += _proto_bytes(2, _proto_bytes(1, b"unigram"))  # trainer spec: ignored
    (tmp_path / "tokenizer.model").write_bytes(blob)
    vocab = load_vocab(tmp_path)
    assert vocab == {p: i for i, p in enumerate(pieces)}
    (tmp_path / "tokenizer.model").write_bytes(blob[:-3])
    with pytest.raises(InputError, match="sentencepiece"):
        load_vocab(tmp_path)


def test_embedding_tensor_names():
    names = [
        "model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.down_proj.weight", "model.norm.weight",
        "transformer.wte.weight", "transformer.wpe.weight",
        "bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
        "bert.encoder.layer.0.output.dense.weight", "bert.encoder.layer.0.attention.output.LayerNorm.weight",
        "cls.predictions.bias", "cls.predictions.decoder.weight", "cls.predictions.transform.dense.weight",
        "lm_head.dense.weight", "lm_head.decoder.weight", "lm_head.bias", "gpt_neox.embed_in.weight", "embed_out.weight",
        "output.weight", "model.layers.0.attn.output.weight",
    ]
    expected = {
        "model.embed_tokens.weight", "lm_head.weight", "transformer.wte.weight", "bert.embeddings.word_embeddings.weight",
        "cls.predictions.bias", "cls.predictions.decoder.weight", "lm_head.decoder.weight", "lm_head.bias",
        "gpt_neox.embed_in.weight", "embed_out.weight", "output.weight",
    }
    assert embedding_tensor_names(names, None) == expected
    shapes = {n: (10, 4) for n in names} | {"lm_head.weight": (12, 4)}
    found = embedding_tensor_names(names, {"vocab_size": 10}, shapes=shapes)
    assert found == expected - {"lm_head.weight"}
    assert "lm_head.weight" in embedding_tensor_names(names, {"vocab_size": 10}, 12, shapes=shapes)


# ---------------------------------------------------------------------------------------- chat templates

MSGS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_chat_template_auto_picks_the_majority(three, tmp_path):
    dirs, _ = three
    common = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    (dirs["m1"] / "chat_template.jinja").write_text(common)  # transformers 5 layout
    cfg = json.loads((dirs["m2"] / "tokenizer_config.json").read_text())
    cfg["chat_template"] = common + "\n"  # transformers 4 layout (whitespace differs only at the end)
    (dirs["m2"] / "tokenizer_config.json").write_text(json.dumps(cfg))
    (dirs["base"] / "chat_template.jinja").write_text("{{ 'other' }}")
    out = tmp_path / "out"
    write_tokenizer_files(plan_vocabulary("union", dirs, "base"), dirs, out)  # copies base's chat_template.jinja
    assert apply_chat_template("auto", dirs, out) == common
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template(MSGS, tokenize=False) == "[user]hi[assistant]yo"
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == common


def test_chat_template_builtin_literal_and_errors(three, tmp_path, caplog):
    dirs, _ = three
    out = tmp_path / "out"
    write_tokenizer_files(plan_vocabulary("base", dirs, "base"), dirs, out)
    with caplog.at_level(logging.WARNING, logger="suture.merge.tokenizer"):
        apply_chat_template("chatml", dirs, out)
    assert "<|im_start|>" in caplog.text  # the base vocabulary lacks ChatML's markers
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>assistant\n"
    apply_chat_template("{{ messages[0]['content'] }}!", dirs, out)
    assert AutoTokenizer.from_pretrained(out).apply_chat_template(MSGS, tokenize=False) == "hi!"
    assert apply_chat_template(None, dirs, out) is None
    assert apply_chat_template("auto", dirs, out) is None  # no input model has a template
    with pytest.raises(InputError, match=r"'vicuna'.*'chatml'"):
        apply_chat_template("vicuna", dirs, out)
    with pytest.raises(InputError, match="does not parse"):
        apply_chat_template("{% for m in %}", dirs, out)


@pytest.mark.parametrize("name", sorted(BUILTIN_CHAT_TEMPLATES))
def test_builtin_templates_render(name, three, tmp_path):
    dirs, _ = three
    out = tmp_path / "out"
    write_tokenizer_files(plan_vocabulary("base", dirs, "base"), dirs, out)
    apply_chat_template(name, dirs, out)
    text = AutoTokenizer.from_pretrained(out).apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    assert "hi" in text and "yo" in text and text.index("hi") < text.index("yo")
    assert text.rstrip().endswith({"chatml": "<|im_start|>assistant", "llama3": "<|end_header_id|>", "alpaca": "### Response:"}[name])


def test_end_to_end_average_of_two_llamas_loads_and_runs(three, tmp_path):
    """Union vocabulary + remapped embeddings + written tokenizer/config form a model transformers can run."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dirs, _ = three
    dirs = {"base": dirs["base"], "m1": dirs["m1"]}
    states = {}
    for seed, (key, d) in enumerate(dirs.items()):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=json.loads((d / "config.json").read_text())["vocab_size"], hidden_size=8,
                          intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                          tie_word_embeddings=False)
        states[key] = {k: v.clone() for k, v in LlamaForCausalLM(cfg).state_dict().items()}
        base_config = cfg.to_dict()
    plan = plan_vocabulary({"source": "union", "pad_to_multiple_of": 8}, dirs, "base")
    vocab_tensors = embedding_tensor_names(states["base"], {"vocab_size": 6}, shapes={k: v.shape for k, v in states["base"].items()})
    assert vocab_tensors == {"model.embed_tokens.weight", "lm_head.weight"}
    merged = {}
    for name in states["base"]:
        if name in vocab_tensors:
            remaps = embedding_remaps(plan, lambda key, name=name: states[key][name])
            merged[name] = (remaps["base"](states["base"][name]) + remaps["m1"](states["m1"][name])) / 2
        else:
            merged[name] = (states["base"][name] + states["m1"][name]) / 2
    out = tmp_path / "merged"
    out.mkdir()
    save_file(merged, out / "model.safetensors")
    base_config["vocab_size"] = 6
    (out / "config.json").write_text(json.dumps(updated_config(base_config, plan, config_model="base")))
    write_tokenizer_files(plan, dirs, out)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("the bird <|im_start|>", return_tensors="pt", add_special_tokens=False).input_ids
    assert ids.tolist() == [[3, 6, 8]]
    logits = model(ids).logits
    assert logits.shape == (1, 3, 16)
    emb = model.get_input_embeddings().weight
    bird_m1 = states["m1"]["model.embed_tokens.weight"][5]  # only m1 has "bird": both sides use its row
    assert torch.allclose(emb[6], bird_m1)
    assert torch.allclose(emb[4], states["base"]["model.embed_tokens.weight"][4])  # m1 lacks "cat": base row
    assert torch.allclose(emb[10:], emb[:10].mean(0).expand(6, 8), atol=1e-6)  # padding rows


def test_missing_tokenizer_files_are_reported_once_and_warned_only_for_text_models(tmp_path, caplog):
    vision, text = tmp_path / "vision", tmp_path / "text"
    vision.mkdir()
    text.mkdir()
    (vision / "config.json").write_text(json.dumps({"suture_architecture": "mlp"}))
    (text / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 30522}))
    with caplog.at_level(logging.DEBUG, logger="suture.merge.tokenizer"):
        for _ in range(3):
            assert copy_tokenizer_files(vision, tmp_path / "out1") == []
            assert copy_tokenizer_files(text, tmp_path / "out2") == []
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "no tokenizer files to copy" in r.getMessage()]
    assert [lvl for lvl, msg in said if str(vision) in msg] == [logging.DEBUG]
    assert [lvl for lvl, msg in said if str(text) in msg] == [logging.WARNING]


@pytest.mark.parametrize(
    ("section", "line", "key"),
    [
        ("tokenizer:\n  source: union\n  tokens:\n    bird:\n      source: m2\n", 9, "tokenizer.tokens.bird.source"),
        ("tokenizer_source: m9\n", 5, "tokenizer_source"),
    ],
)
def test_recipe_tokenizer_errors_name_the_key_and_line(three, tmp_path, section, line, key):
    """A tokenizer problem found while planning is one line naming the recipe file, the key and its YAML line."""
    from safetensors.torch import save_file

    from suture.recipes.runner import run_recipe

    dirs, emb = three
    for name, folder in dirs.items():
        save_file({"model.embed_tokens.weight": emb[name].contiguous()}, str(folder / "model.safetensors"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {dirs['m1']}\n  - model: {dirs['m2']}\n{section}")
    with pytest.raises(RecipeError) as info:
        run_recipe(recipe, tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{recipe} line {line}: {key}:"), message
