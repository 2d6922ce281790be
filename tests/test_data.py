"""Data specs: bundled sklearn sets, tensor files, text lines, batching and error messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from suture.merge.data import CalibrationData, digits_scaling, encode_texts, iter_batches, load_dataset
from suture.merge.errors import InputError


def test_digits_split_sizes_are_disjoint_and_deterministic():
    train = load_dataset("sklearn:digits", split="train")
    test = load_dataset("sklearn:digits")  # default split is test
    full = load_dataset("sklearn:digits", split="all")
    assert len(train) == 1438 and len(test) == 359 and len(full) == 1797
    assert train.inputs.shape == (1438, 64) and train.inputs.dtype == torch.float32
    assert torch.equal(full.inputs[:1438], train.inputs) and torch.equal(full.inputs[1438:], test.inputs)
    again = load_dataset("sklearn:digits", split="test")
    assert torch.equal(again.inputs, test.inputs) and torch.equal(again.labels, test.labels)
    # No sample appears in both splits.
    train_rows = {tuple(r) for r in train.inputs.numpy().round(5).tolist()}
    dup = sum(tuple(r) in train_rows for r in test.inputs.numpy().round(5).tolist())
    assert dup < 5  # digits contains a handful of exact duplicate images; a leak would be hundreds


def test_digits_standardized_with_train_statistics():
    from sklearn.datasets import load_digits

    train = load_dataset("sklearn:digits", split="train")
    mean, std = train.inputs.mean(0), train.inputs.std(0, unbiased=False)
    varying = std > 1e-3
    assert torch.allclose(mean, torch.zeros(64), atol=1e-5)
    assert torch.allclose(std[varying], torch.ones(int(varying.sum())), atol=1e-4)
    assert int((~varying).sum()) >= 1  # the blank corner pixel is constant
    # Undo the scaling: we must get back the raw 0..16 pixel values of real sklearn digits.
    mu, sd = digits_scaling()
    raw = train.inputs.double().numpy() * sd + mu
    assert np.allclose(raw, np.round(raw), atol=1e-4) and raw.min() >= -1e-4 and raw.max() <= 16 + 1e-4
    x, y = load_digits(return_X_y=True)
    first = np.round(raw[0])
    hits = np.where((x == first).all(axis=1))[0]
    assert len(hits) >= 1 and train.labels[0].item() in set(y[hits].tolist())


def test_class_subset_keeps_labels_and_scaling():
    full = load_dataset("sklearn:digits")
    low = load_dataset("sklearn:digits?classes=0-4")
    assert set(low.labels.tolist()) == {0, 1, 2, 3, 4}
    assert len(low) == int((full.labels < 5).sum())
    assert torch.equal(low.inputs, full.inputs[full.labels < 5])
    picked = load_dataset({"source": "sklearn:digits", "classes": [7, 2], "split": "train"})
    assert set(picked.labels.tolist()) == {2, 7}
    listed = load_dataset("sklearn:digits?classes=2,7&split=train")
    assert torch.equal(listed.inputs, picked.inputs)


def test_image_shape_and_max_items():
    img = load_dataset("sklearn:digits?shape=image", max_items=10)
    flat = load_dataset("sklearn:digits", max_items=10)
    assert img.inputs.shape == (10, 1, 8, 8)
    assert torch.equal(img.inputs.reshape(10, 64), flat.inputs)
    assert len(load_dataset("sklearn:digits?max_items=7", max_items=20)) == 7


def test_other_bundled_sets():
    iris = load_dataset("sklearn:iris", split="all")
    assert iris.inputs.shape == (150, 4) and iris.num_classes == 3


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("sklearn:mnist", "unknown built-in dataset 'mnist'"),
        ("sklearn:digits?classes=3-1", "is empty"),
        ("sklearn:digits?classes=11", "do not occur"),
        ("sklearn:digits?colour=red", "unknown option"),
        ("sklearn:digits?shape=cube", "shape must be"),
        ("sklearn:digits?classes", "key=value"),
        ("sklearn:iris?shape=image", "only defined for sklearn:digits"),
        ("sklearn:digits?max_items=many", "max_items='many'"),
        ("", "empty"),
    ],
)
def test_bad_specs_raise_input_errors(spec, fragment):
    with pytest.raises(InputError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        load_dataset(spec)


def test_bad_split_and_spec_types():
    with pytest.raises(InputError, match="split must be"):
        load_dataset("sklearn:digits", split="validation")
    with pytest.raises(InputError, match="'source'"):
        load_dataset({"classes": [1]})
    with pytest.raises(InputError, match="string or a mapping"):
        load_dataset(42)


def test_safetensors_file(tmp_path):
    path = tmp_path / "calib.safetensors"
    inputs = torch.randn(12, 3, 4)
    labels = torch.arange(12) % 3
    save_file({"inputs": inputs, "labels": labels}, str(path))
    data = load_dataset(str(path), split="train")  # a file is its own split
    assert torch.equal(data.inputs, inputs) and torch.equal(data.labels, labels)
    sub = load_dataset(f"{path}?classes=1", max_items=2)
    assert sub.labels.tolist() == [1, 1] and torch.equal(sub.inputs, inputs[[1, 4]])
    only_inputs = tmp_path / "x.safetensors"
    save_file({"feats": inputs}, str(only_inputs))
    data = load_dataset({"path": str(only_inputs), "inputs_key": "feats"})
    assert data.labels is None and len(data) == 12


def test_npz_file_and_dtypes(tmp_path):
    path = tmp_path / "calib.npz"
    x = np.random.RandomState(0).randn(5, 8)  # float64 -> float32
    np.savez(path, inputs=x, labels=np.array([0, 1, 0, 1, 1], dtype=np.int32))
    data = load_dataset(path)
    assert data.inputs.dtype == torch.float32 and torch.allclose(data.inputs.double(), torch.from_numpy(x), atol=1e-6)
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == [0, 1, 0, 1, 1]


def test_tensor_file_errors_name_the_file(tmp_path):
    wrong = tmp_path / "wrong.safetensors"
    save_file({"x": torch.zeros(3, 2)}, str(wrong))
    with pytest.raises(InputError, match=r"wrong\.safetensors.*no tensor 'inputs'.*\['x'\]"):
        load_dataset(str(wrong))
    float_labels = tmp_path / "fl.npz"
    np.savez(float_labels, inputs=np.zeros((3, 2)), labels=np.array([0.5, 1.0, 2.0]))
    with pytest.raises(InputError, match=r"fl\.npz.*'labels' must be 1-D integer"):
        load_dataset(float_labels)
    mismatch = tmp_path / "mm.npz"
    np.savez(mismatch, inputs=np.zeros((3, 2)), labels=np.array([0, 1]))
    with pytest.raises(InputError, match="3 inputs but 2 labels"):
        load_dataset(mismatch)
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(b"not a safetensors file at all")
    with pytest.raises(InputError, match=r"bad\.safetensors.*not a readable safetensors"):
        load_dataset(corrupt)
    with pytest.raises(InputError, match=r"missing\.npz.*file not found"):
        load_dataset(tmp_path / "missing.npz")
    other = tmp_path / "data.csv"
    other.write_text("1,2\n")
    with pytest.raises(InputError, match=r"unsupported file type \.csv"):
        load_dataset(other)
    with pytest.raises(InputError, match="do not apply"):
        load_dataset(f"{mismatch}?shape=image")


@pytest.fixture
def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "good": 2, "bad": 3, "food": 4, "very": 5, "service": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def test_text_lines_with_string_labels(tmp_path, word_tokenizer):
    path = tmp_path / "reviews.txt"
    path.write_text("good food\tpositive\n\nvery bad service\tnegative\nfood\tpositive\n", encoding="utf-8")
    data = load_dataset(str(path), tokenizer=word_tokenizer)
    assert data.label_names == ["negative", "positive"]
    assert data.labels.tolist() == [1, 0, 1]
    assert data.inputs["input_ids"].tolist() == [[2, 4, 0], [5, 3, 6], [4, 0, 0]]
    assert data.inputs["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    short = load_dataset({"path": str(path), "max_length": 1}, tokenizer=word_tokenizer)
    assert short.inputs["input_ids"].shape == (3, 1)
    # max_items keeps the raw texts (which encoders re-tokenize) in step with inputs and labels
    two = load_dataset(str(path), tokenizer=word_tokenizer, max_items=2)
    assert two.meta["texts"] == ["good food", "very bad service"] and two.labels.tolist() == [1, 0]
    picked = data.subset(torch.tensor([2, 0]))
    assert picked.meta["texts"] == ["food", "good food"] and data.meta["texts"][1] == "very bad service"
    assert data.subset(data.labels == 0).meta["texts"] == ["very bad service"]


def test_text_lines_integer_labels_and_unlabelled(tmp_path, word_tokenizer):
    labelled = tmp_path / "l.txt"
    labelled.write_text("good\t3\nbad\t0\n")
    assert load_dataset(labelled, tokenizer=word_tokenizer).labels.tolist() == [3, 0]
    plain = tmp_path / "p.txt"
    plain.write_text("good food\nbad\n")
    data = load_dataset(plain, tokenizer=word_tokenizer)
    assert data.labels is None and data.inputs["input_ids"].shape == (2, 2)


def test_text_errors(tmp_path, word_tokenizer):
    path = tmp_path / "mixed.txt"
    path.write_text("good\t1\nbad\n")
    with pytest.raises(InputError, match=r"mixed\.txt.*needs a tokenizer"):
        load_dataset(path)
    with pytest.raises(InputError, match=r"mixed\.txt.*some lines have a TAB label"):
        load_dataset(path, tokenizer=word_tokenizer)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(InputError, match=r"empty\.txt.*no text lines"):
        load_dataset(empty, tokenizer=word_tokenizer)
    with pytest.raises(InputError, match="could not be loaded"):
        load_dataset(empty, tokenizer=str(tmp_path / "no-such-tokenizer"))


def test_encode_texts_pads_with_eos_when_no_pad_token(word_tokenizer):
    class NoPad:
        pad_token_id = None
        eos_token_id = 9

        def __call__(self, texts, truncation, max_length):
            return {"input_ids": [[1] * len(t.split()) for t in texts]}

    enc = encode_texts(NoPad(), ["a b c", "a"])
    assert enc["input_ids"].tolist() == [[1, 1, 1], [1, 9, 9]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_iter_batches_covers_everything_in_order():
    data = CalibrationData(torch.arange(10).float().unsqueeze(1), torch.arange(10))
    batches = list(iter_batches(data, 4))
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(10))
    unlabelled = CalibrationData({"input_ids": torch.zeros(5, 3, dtype=torch.long)})
    assert [(x["input_ids"].shape[0], y) for x, y in iter_batches(unlabelled, 3)] == [(3, None), (2, None)]
    with pytest.raises(InputError, match="batch_size"):
        list(iter_batches(data, 0))
    with pytest.raises(InputError, match="disagree"):
        CalibrationData({"a": torch.zeros(2), "b": torch.zeros(3)})
