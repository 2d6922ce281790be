"""Calibration and evaluation data from a short spec string or dict.

Recipes name their data with one string (or a dict with the same fields). Accepted sources:

``sklearn:digits`` (also ``iris``, ``wine``, ``breast_cancer``)
    Bundled with scikit-learn, nothing is downloaded. Samples are shuffled once with
    ``numpy.random.RandomState(0)``; the first 80 % form the ``train`` split and the rest ``test``
    (``all`` is both, train first). Features are standardized per column with the mean and standard
    deviation of the *whole-dataset train split* (all classes; columns with std < 1e-6, e.g. the
    always-blank digit corners, are only centred). The demo models in :mod:`merge.zoo` are trained on
    exactly these features, so a class subset keeps the same scaling as the full set.
    Query options: ``classes=0-4`` or ``classes=0,2,7`` keeps those classes (labels keep their
    original values unless ``relabel=true`` numbers them 0..k-1); ``shape=image`` returns digits as ``(N, 1, 8, 8)`` instead of ``(N, 64)``;
    ``max_items=N``.
``path/to/data.safetensors`` or ``path/to/data.npz``
    Tensors ``inputs`` (any shape, first axis = items) and optional ``labels`` (1-D integers). Other key
    names via ``inputs_key=`` / ``labels_key=``. A file is one split already: ``split`` is ignored.
``path/to/lines.txt``
    One item per line; an optional label follows a TAB. Integer labels are kept; other labels are
    numbered in sorted order (``label_names`` keeps the names). Encoded with the given Hugging Face
    tokenizer (an object, or a local tokenizer folder) into padded ``input_ids`` + ``attention_mask``,
    truncated to ``max_length`` (default 128). With ``block_size=N`` the file is plain text instead (no
    labels): tokenized as a whole and cut into items of exactly N tokens (the tokenizer's special tokens,
    e.g. BERT's [CLS] ... [SEP], included; the incomplete last block dropped), as language models are
    trained and evaluated. The tokenizer's mask token and special ids are kept in ``meta["tokenizer"]``.

String options follow ``?`` as ``key=value`` pairs joined by ``&``; a dict spec carries the source under
``source`` (or ``path``) and the options as keys, e.g. ``{"source": "sklearn:digits", "classes": [0, 1]}``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from suture.merge.errors import InputError

logger = logging.getLogger(__name__)

Split = Literal["train", "test", "all"]
Inputs = torch.Tensor | dict[str, torch.Tensor]

SKLEARN_DATASETS = ("digits", "iris", "wine", "breast_cancer")
TRAIN_FRACTION = 0.8
SPLIT_SEED = 0
_STD_FLOOR = 1e-6
_KNOWN_OPTIONS = {"classes", "relabel", "shape", "max_items", "inputs_key", "labels_key", "max_length", "split", "block_size"}


@dataclass
class CalibrationData:
    """Inputs (a tensor, or a dict of tensors for tokenized text) with optional integer labels."""

    inputs: Inputs
    labels: torch.Tensor | None = None
    name: str = "data"
    label_names: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = _first_dim(self.inputs, self.name)
        if self.labels is not None and self.labels.shape[0] != n:
            raise InputError(f"data {self.name!r}: {n} inputs but {self.labels.shape[0]} labels; expected one label per item")

    def __len__(self) -> int:
        return _first_dim(self.inputs, self.name)

    def __getitem__(self, index: Any) -> tuple[Inputs, torch.Tensor | None]:
        return _index_inputs(self.inputs, index), None if self.labels is None else self.labels[index]

    @property
    def num_classes(self) -> int | None:
        """Number of classes implied by the labels (max label + 1), or None without labels."""
        if self.labels is None or self.labels.numel() == 0:
            return None
        return int(self.labels.max().item()) + 1

    def subset(self, index: torch.Tensor | slice) -> CalibrationData:
        """A new dataset holding only the selected items (raw ``meta["texts"]``, which encoders re-tokenize, too)."""
        inputs, labels = self[index]
        meta = dict(self.meta)
        texts = meta.get("texts")
        if texts is not None:
            if isinstance(index, slice):
                meta["texts"] = list(texts[index])
            else:
                idx = torch.as_tensor(index)
                idx = idx.nonzero().flatten() if idx.dtype == torch.bool else idx.reshape(-1)
                meta["texts"] = [texts[int(k)] for k in idx]
        return CalibrationData(inputs, labels, self.name, self.label_names, meta)

    def take(self, n: int | None) -> CalibrationData:
        """The first ``n`` items (all when n is None)."""
        if n is None:
            return self
        if n < 1:
            raise InputError(f"data {self.name!r}: max_items must be at least 1, got {n}")
        return self.subset(slice(0, n))


def load_dataset(
    spec: str | Mapping[str, Any] | CalibrationData,
    *,
    split: Split = "test",
    tokenizer: Any = None,
    max_items: int | None = None,
) -> CalibrationData:
    """Load a dataset named by a spec string/dict (see the module docstring for the accepted forms)."""
    if isinstance(spec, CalibrationData):
        return spec.take(max_items)
    source, options = _parse_spec(spec)
    split = options.pop("split", split)
    if split not in ("train", "test", "all"):
        raise InputError(f"data {source!r}: split must be 'train', 'test' or 'all', got {split!r}")
    if options.get("max_items") is not None:
        opt_max = _as_int(options.pop("max_items"), source, "max_items")
        max_items = opt_max if max_items is None else min(max_items, opt_max)
    else:
        options.pop("max_items", None)
    if source.startswith("sklearn:"):
        data = _load_sklearn(source, split, options)
    else:
        path = Path(source.removeprefix("file:")).expanduser()
        if not path.exists():
            raise InputError(f"data {source!r}: file not found; expected 'sklearn:<name>' or a .safetensors, .npz or .txt file")
        suffix = path.suffix.lower()
        _refuse_options(source, options, {"inputs_key", "labels_key", "max_length", "classes", "block_size"})
        if suffix == ".safetensors":
            data = _load_tensor_file(path, options, _read_safetensors(path))
        elif suffix == ".npz":
            data = _load_tensor_file(path, options, _read_npz(path))
        elif suffix == ".txt":
            data = _load_text(path, options, tokenizer)
        else:
            raise InputError(f"data {source!r}: unsupported file type {suffix or '(none)'}; expected .safetensors, .npz or .txt")
        if "classes" in options:
            data = _select_classes(data, options["classes"], source)
    data = data.take(max_items)
    logger.info("loaded data %s (%s split): %d items", data.name, split, len(data))
    return data


def iter_batches(dataset: CalibrationData, batch_size: int) -> Iterator[tuple[Inputs, torch.Tensor | None]]:
    """Yield ``(inputs, labels)`` batches in order (labels None when the data has none)."""
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(dataset), batch_size):
        yield dataset[start : start + batch_size]


def digits_scaling() -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (mean, std) used to standardize sklearn digits (train split, std floored to 1)."""
    return _sklearn_arrays("digits")[2:]


# --- spec parsing -------------------------------------------------------------------------------


def parse_spec(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(source, options) of a spec without reading any data; a malformed spec raises InputError."""
    return _parse_spec(spec)


def _parse_spec(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, Mapping):
        options = dict(spec)
        source = options.pop("source", None) or options.pop("path", None)
        if not isinstance(source, (str, Path)):
            raise InputError(f"data spec {dict(spec)!r}: expected a 'source' (or 'path') key naming the data")
        source = str(source)
    elif isinstance(spec, (str, Path)):
        source, options = str(spec), {}
        if "?" in source:
            source, query = source.split("?", 1)
            for part in filter(None, query.split("&")):
                if "=" not in part:
                    raise InputError(f"data spec {spec!r}: option {part!r} should look like key=value")
                key, value = part.split("=", 1)
                options[key.strip()] = value.strip()
    else:
        raise InputError(f"data spec must be a string or a mapping, got {type(spec).__name__}")
    unknown = set(options) - _KNOWN_OPTIONS
    if unknown:
        raise InputError(f"data spec {source!r}: unknown option(s) {sorted(unknown)}; known: {sorted(_KNOWN_OPTIONS)}")
    if not source.strip():
        raise InputError("data spec is empty; expected e.g. 'sklearn:digits' or a file path")
    return source.strip(), options


def _refuse_options(source: str, options: Mapping[str, Any], allowed: set[str]) -> None:
    bad = set(options) - allowed
    if bad:
        raise InputError(f"data {source!r}: option(s) {sorted(bad)} do not apply to this source; allowed: {sorted(allowed)}")


def _as_int(value: Any, source: str, key: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(f"data {source!r}: option {key}={value!r} should be an integer") from None


def _parse_classes(value: Any, source: str) -> list[int]:
    """'0-4' / '0,2,7' / [0, 2] / 3 -> sorted unique class ids."""
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return sorted({_as_int(v, source, "classes") for v in value})
    text = str(value).strip()
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "-" in part:
            bounds = part.split("-")
            if len(bounds) != 2:
                raise InputError(f"data {source!r}: classes range {part!r} should look like low-high")
            lo, hi = (_as_int(x, source, "classes") for x in bounds)
            if hi < lo:
                raise InputError(f"data {source!r}: classes range {part!r} is empty (expected low-high)")
            out.update(range(lo, hi + 1))
        else:
            out.add(_as_int(part, source, "classes"))
    if not out:
        raise InputError(f"data {source!r}: classes={value!r} selects nothing; expected e.g. 0-4 or 0,2,7")
    return sorted(out)


def _select_classes(data: CalibrationData, value: Any, source: str) -> CalibrationData:
    if data.labels is None:
        raise InputError(f"data {source!r}: classes= needs labels, but the data has none")
    classes = _parse_classes(value, source)
    present = set(data.labels.unique().tolist())
    missing = [c for c in classes if c not in present]
    if missing:
        raise InputError(f"data {source!r}: classes {missing} do not occur in the labels (present: {sorted(present)})")
    keep = torch.isin(data.labels, torch.tensor(classes, dtype=data.labels.dtype))
    out = data.subset(keep.nonzero().squeeze(1))
    out.meta["classes"] = classes
    return out


def _relabel(data: CalibrationData, value: Any, source: str) -> CalibrationData:
    """relabel=true: number the selected classes 0..k-1 in sorted order (a per-task head's own labels)."""
    if str(value).lower() not in ("1", "true", "yes"):
        if str(value).lower() in ("0", "false", "no"):
            return data
        raise InputError(f"data {source!r}: relabel must be true or false, got {value!r}")
    if data.labels is None:
        raise InputError(f"data {source!r}: relabel= needs labels, but the data has none")
    classes = sorted(set(data.labels.tolist()))
    lookup = torch.full((max(classes) + 1,), -1, dtype=data.labels.dtype)
    lookup[torch.tensor(classes)] = torch.arange(len(classes), dtype=data.labels.dtype)
    out = CalibrationData(data.inputs, lookup[data.labels], data.name, [str(c) for c in classes], dict(data.meta))
    out.meta["relabel"] = classes
    return out


# --- sources ------------------------------------------------------------------------------------

_SKLEARN_CACHE: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}


def _sklearn_arrays(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shuffled features/labels of a bundled sklearn dataset plus its train-split scaling."""
    if name not in _SKLEARN_CACHE:
        import sklearn.datasets as skd

        x, y = getattr(skd, f"load_{name}")(return_X_y=True)
        # A fixed RandomState keeps the split identical across numpy versions (Generator streams may change).
        order = np.random.RandomState(SPLIT_SEED).permutation(len(x))
        x, y = x[order].astype(np.float64), y[order].astype(np.int64)
        n_train = int(round(TRAIN_FRACTION * len(x)))
        mean = x[:n_train].mean(axis=0)
        std = x[:n_train].std(axis=0)
        std[std < _STD_FLOOR] = 1.0
        _SKLEARN_CACHE[name] = (x, y, mean, std)
    return _SKLEARN_CACHE[name]


def _load_sklearn(source: str, split: str, options: dict[str, Any]) -> CalibrationData:
    name = source.split(":", 1)[1]
    if name not in SKLEARN_DATASETS:
        known = ["sklearn:" + n for n in SKLEARN_DATASETS]
        raise InputError(f"data {source!r}: unknown built-in dataset {name!r}; expected one of {known}")
    _refuse_options(source, options, {"classes", "relabel", "shape"})
    x, y, mean, std = _sklearn_arrays(name)
    n_train = int(round(TRAIN_FRACTION * len(x)))
    part = {"train": slice(0, n_train), "test": slice(n_train, None), "all": slice(None)}[split]
    feats = torch.from_numpy(((x[part] - mean) / std).astype(np.float32))
    shape = options.get("shape", "flat")
    if shape == "image":
        if name != "digits":
            raise InputError(f"data {source!r}: shape=image is only defined for sklearn:digits (8x8 images)")
        feats = feats.reshape(-1, 1, 8, 8)
    elif shape != "flat":
        raise InputError(f"data {source!r}: shape must be 'flat' or 'image', got {shape!r}")
    data = CalibrationData(feats, torch.from_numpy(y[part].copy()), name=f"{source}[{split}]", meta={"split": split})
    if "classes" in options:
        data = _select_classes(data, options["classes"], source)
    if "relabel" in options:
        data = _relabel(data, options["relabel"], source)
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"data file {str(path)!r}: not a readable safetensors file ({exc})") from exc


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"data file {str(path)!r}: not a readable .npz archive without pickled objects ({exc})") from exc
    out = {}
    for key, arr in arrays.items():
        if arr.dtype.kind not in "biuf":
            raise InputError(f"data file {str(path)!r}: array {key!r} has dtype {arr.dtype}; expected numbers")
        out[key] = torch.from_numpy(np.ascontiguousarray(arr))
    return out


def _load_tensor_file(path: Path, options: Mapping[str, Any], tensors: dict[str, torch.Tensor]) -> CalibrationData:
    in_key = options.get("inputs_key", "inputs")
    lab_key = options.get("labels_key", "labels")
    if in_key not in tensors:
        raise InputError(
            f"data file {str(path)!r}: no tensor {in_key!r}; expected keys {in_key!r} (and optional {lab_key!r}), "
            f"found {sorted(tensors)}"
        )
    inputs = tensors[in_key]
    if inputs.dim() == 0:
        raise InputError(f"data file {str(path)!r}: tensor {in_key!r} is a scalar; expected a first axis over items")
    labels = tensors.get(lab_key)
    if labels is not None:
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise InputError(
                f"data file {str(path)!r}: tensor {lab_key!r} must be 1-D integer class ids, "
                f"got {labels.dtype} shape {tuple(labels.shape)}"
            )
        labels = labels.long()
    if inputs.dtype in (torch.float64, torch.float16, torch.bfloat16):
        inputs = inputs.float()
    return CalibrationData(inputs, labels, name=str(path))


def _resolve_tokenizer(tokenizer: Any, path: Path) -> Any:
    if tokenizer is None:
        raise InputError(f"data file {str(path)!r}: text data needs a tokenizer (pass tokenizer=; in a recipe, the "
                         "reference model's folder must hold its tokenizer files, e.g. tokenizer.json)")
    if isinstance(tokenizer, (str, Path)):
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise InputError(f"tokenizer {str(tokenizer)!r} for {str(path)!r} could not be loaded from local files ({exc})") from exc
    if not callable(tokenizer):
        raise InputError(f"tokenizer for {str(path)!r} is a {type(tokenizer).__name__}; expected a Hugging Face tokenizer")
    return tokenizer


def _load_text(path: Path, options: Mapping[str, Any], tokenizer: Any) -> CalibrationData:
    tok = _resolve_tokenizer(tokenizer, path)
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"data file {str(path)!r}: not UTF-8 text ({exc})") from exc
    if "block_size" in options:
        return _load_blocks(path, raw, tok, _as_int(options["block_size"], str(path), "block_size"))
    texts: list[str] = []
    raw_labels: list[str] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        text, sep, label = line.partition("\t")
        if sep and not label.strip():
            raise InputError(f"data file {str(path)!r} line {lineno}: a TAB but no label after it")
        texts.append(text)
        raw_labels.append(label.strip() if sep else "")
    if not texts:
        raise InputError(f"data file {str(path)!r}: no text lines; expected one item per line")
    labelled = [bool(label) for label in raw_labels]
    if any(labelled) and not all(labelled):
        first = labelled.index(False) if labelled[0] else labelled.index(True)
        raise InputError(
            f"data file {str(path)!r}: some lines have a TAB label and some do not "
            f"(first differing item #{first + 1}); label all or none"
        )
    labels, label_names = None, None
    if all(labelled):
        if all(_is_int(s) for s in raw_labels):
            labels = torch.tensor([int(s) for s in raw_labels], dtype=torch.long)
        else:
            label_names = sorted(set(raw_labels))
            lookup = {name: i for i, name in enumerate(label_names)}
            labels = torch.tensor([lookup[s] for s in raw_labels], dtype=torch.long)
    max_length = _as_int(options.get("max_length", 128), str(path), "max_length")
    inputs = encode_texts(tok, texts, max_length=max_length)
    return CalibrationData(inputs, labels, name=str(path), label_names=label_names,
                           meta={"texts": texts, "tokenizer": tokenizer_meta(tok)})


def tokenizer_meta(tokenizer: Any) -> dict[str, Any]:
    """What scoring needs from a tokenizer beyond the ids: its mask token (masked LMs) and special token ids."""
    mask_id = getattr(tokenizer, "mask_token_id", None)
    return {"mask_token_id": None if mask_id is None else int(mask_id),
            "special_ids": sorted(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []))}


def _load_blocks(path: Path, raw: str, tok: Any, block_size: int) -> CalibrationData:
    """Plain text cut into items of exactly `block_size` tokens, each wrapped in the tokenizer's special tokens."""
    if not raw.strip():
        raise InputError(f"data file {str(path)!r}: no text; expected plain text to cut into blocks of {block_size} tokens")
    prefix, suffix = _special_frame(tok, raw, path)
    content = block_size - len(prefix) - len(suffix)
    if content < 1:
        raise InputError(f"data file {str(path)!r}: block_size={block_size} leaves no room for text beside the "
                         f"tokenizer's {len(prefix) + len(suffix)} special tokens")
    ids = tok(raw, add_special_tokens=False)["input_ids"]  # the whole text once; a length warning here is harmless
    n_blocks = len(ids) // content
    if n_blocks == 0:
        raise InputError(f"data file {str(path)!r}: {len(ids)} tokens of text, fewer than one block of {block_size}")
    rows = [prefix + list(ids[i * content:(i + 1) * content]) + suffix for i in range(n_blocks)]
    input_ids = torch.tensor(rows, dtype=torch.long)
    logger.info("%s: %d tokens in %d blocks of %d (%d left over)", path, len(ids), n_blocks, block_size, len(ids) - n_blocks * content)
    return CalibrationData({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, None, name=str(path),
                           meta={"block_size": block_size, "tokenizer": tokenizer_meta(tok)})


def encode_texts(tokenizer: Any, texts: list[str], max_length: int = 128) -> dict[str, torch.Tensor]:
    """Tokenize texts into right-padded ``input_ids`` and ``attention_mask`` (the tokenizer is not modified)."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    ids = [list(x) for x in encoded["input_ids"]]
    # Pad by hand: some tokenizers (GPT-2) have no pad token, and setting one would mutate the caller's object.
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def _special_frame(tok: Any, raw: str, path: Path) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after a text (BERT: [CLS], [SEP]; GPT-2: none).

    Read off the first line encoded with and without special tokens, which works for every tokenizer class
    (transformers 5's fast tokenizers no longer expose `build_inputs_with_special_tokens`).
    """
    probe = next(line for line in raw.splitlines() if line.strip())
    framed = list(tok(probe)["input_ids"])
    plain = list(tok(probe, add_special_tokens=False)["input_ids"])
    for start in range(len(framed) - len(plain) + 1):
        if framed[start:start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain):]
    raise InputError(f"data file {str(path)!r}: the tokenizer changes a text's own tokens when it adds its special tokens, "
                     "so text cannot be cut into blocks with them; use one document per line (no block_size)")


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _first_dim(inputs: Inputs, name: str) -> int:
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 0:
            raise InputError(f"data {name!r}: inputs are a scalar; expected a first axis over items")
        return inputs.shape[0]
    if isinstance(inputs, Mapping) and inputs:
        sizes = {k: v.shape[0] for k, v in inputs.items()}
        if len(set(sizes.values())) != 1:
            raise InputError(f"data {name!r}: input tensors disagree on the number of items: {sizes}")
        return next(iter(sizes.values()))
    raise InputError(f"data {name!r}: inputs must be a tensor or a non-empty dict of tensors, got {type(inputs).__name__}")


def _index_inputs(inputs: Inputs, index: Any) -> Inputs:
    if isinstance(inputs, torch.Tensor):
        return inputs[index]
    return {k: v[index] for k, v in inputs.items()}


def inputs_to(inputs: Inputs, device: torch.device | str) -> Inputs:
    """Move a batch of inputs (tensor or dict of tensors) to a device."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    return {k: v.to(device) for k, v in inputs.items()}
