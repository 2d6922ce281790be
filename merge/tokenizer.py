"""Output vocabulary for merges of models whose tokenizers differ (mergekit-compatible).

Recipe keys handled here:

* ``tokenizer_source: base | union | <model>`` and
  ``tokenizer: {source, tokens: {<token>: {source, force}}, pad_to_multiple_of}`` -> :func:`plan_vocabulary`
  builds a :class:`VocabPlan`; :func:`embedding_remaps` / :func:`row_remap` gather each model's embedding
  rows into the output order; :func:`write_tokenizer_files` and :func:`updated_config` write the matching
  tokenizer and ``config.json``.
* ``chat_template: auto | chatml | llama3 | alpaca | <jinja>`` -> :func:`apply_chat_template`.

Behaviour that follows mergekit:

* No tokenizer setting: no vocabulary change (the runner copies the donor's tokenizer files).
* ``tokenizer.source`` defaults to ``union``. The donor (whose tokenizer files are the starting point) is the
  base model, or the first model when there is no base; for ``source: <model>`` it is that model.
* Tokens whose id is >= a model's ``config.json`` vocab size are treated as absent from that model (they have
  no embedding row), so they are dropped from ``base``/``union`` vocabularies.
* Union order: the donor's tokens keep their ids; then tokens that are regular vocabulary entries of the other
  models (model order) and are not added tokens anywhere; then added tokens of all models (model order); then
  tokens named under ``tokenizer.tokens`` that are still missing. New tokens are written as added tokens.
* Embedding rows (``embedding_remaps``): a model that has a token keeps its own row unless that token is
  configured with ``force: true``. Otherwise the token's default row is used: the configured source, else the
  only model that has it, else the base model's row when the base has it, else the mean over the models that
  have it, else zeros. Rows added by ``pad_to_multiple_of`` get the mean of the model's other rows.
* ``config.json`` gets ``vocab_size`` = output rows (including padding); the tokenizer itself is not padded.
* ``chat_template: auto`` picks the template most input models use; built-in names and literal Jinja work too.

Where this module differs from mergekit (on purpose):

* Within a model, new union tokens are taken in id order (mergekit iterates a hash map: order not stable).
* ``source: <model>`` must be one of the merged models, and its tokenizer is stripped of ids beyond its
  embedding rows like the base's (mergekit leaves them in and then fails to find their rows).
* A token override without ``source`` uses the automatic default (mergekit raises). ``source: base`` names the
  base model. A configured source that lacks the token is reported when planning, not mid-merge.
* A non-donor model without tokenizer files is assumed to share the donor's vocabulary only when its
  ``config.json`` vocab size agrees with it; otherwise it is an error (mergekit always assumes and warns).
* Vocabularies are read straight from the tokenizer files (no ``AutoTokenizer`` round trip), so nothing
  needs remote code, and the written tokenizer is checked to give every output token its planned id.
* ``updated_config(..., config_model=...)`` also moves ``bos/eos/pad_token_id`` to the output ids.

Caveat shared with mergekit: union tokens from another tokenizer become *added* tokens, matched on raw
(normalized) text before pre-tokenization; a byte-level token such as ``Ġcat`` is only produced for the literal
string ``Ġcat``. Their embeddings are still merged correctly and ``convert_tokens_to_ids`` finds them.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from suture.merge.errors import InputError, RecipeError

logger = logging.getLogger(__name__)

RowRemap = Callable[[torch.Tensor], torch.Tensor]

# Files that make up a Hugging Face tokenizer; copied from the donor (absent ones are skipped).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
)

# Defaults for a new non-special added token, as transformers' add_tokens gives them.
_PLAIN_ADDED = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}
_ADDED_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
_TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}
_TOKEN_KEYS = {"source", "force"}


# --------------------------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class TokenOverride:
    """Where one token's default embedding row comes from (``tokenizer.tokens.<token>``)."""

    kind: str = "auto"  # "auto" | "model" | "zero" | "model_token"
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass
class VocabPlan:
    """The output vocabulary and, per model, which of its embedding rows feeds each output row."""

    tokens: list[str]  # output vocabulary in id order (after pad_to_multiple_of)
    row_index: dict[str, torch.Tensor]  # model key -> LongTensor[len(tokens)], -1 when the model lacks the token
    source: str  # "base" | "union" | model key
    donor: str  # model key whose tokenizer files are the starting point
    base: str | None = None  # base model key (preferred default row), None when the recipe has no base
    placeholders: frozenset[int] = frozenset()  # rows with no token in any tokenizer (padding, id gaps)
    overrides: dict[str, TokenOverride] = field(default_factory=dict)
    added: dict[str, dict[str, bool]] = field(default_factory=dict)  # added-token flags for tokens new to the donor
    model_vocabs: dict[str, dict[str, int]] = field(default_factory=dict)  # each model's full original vocabulary
    model_rows: dict[str, int | None] = field(default_factory=dict)  # embedding rows per config.json (None: unknown)
    pad_to_multiple_of: int | None = None

    @property
    def vocab_size(self) -> int:
        """Number of output embedding rows."""
        return len(self.tokens)

    def token_ids(self) -> dict[str, int]:
        """Real output tokens -> output id (placeholders left out)."""
        return {tok: i for i, tok in enumerate(self.tokens) if i not in self.placeholders}

    def is_identity(self, model_key: str) -> bool:
        """True when the model's rows already are the output rows, in order."""
        idx = self.row_index[model_key]
        rows = self.model_rows.get(model_key)
        return not self.placeholders and rows == len(idx) and bool(torch.equal(idx, torch.arange(len(idx))))


@dataclass
class _TokenizerInfo:
    """What the tokenizer files of one folder say: token -> id, and the added tokens' flags."""

    vocab: dict[str, int]
    added: dict[str, dict[str, bool]]
    file: Path


# ------------------------------------------------------------------------------------------ reading files


def _read_json(path: Path) -> Any:
    """A tokenizer file's JSON object, through the store's one reader (regular files only, size and nesting capped)."""
    from suture.merge.store import read_json

    return read_json(path)


def _flags(entry: Mapping[str, Any]) -> dict[str, bool]:
    return {k: bool(entry.get(k, _PLAIN_ADDED[k])) for k in _ADDED_FLAGS}


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf: bytes) -> Iterable[tuple[int, int, Any]]:
    """Yield (field number, wire type, value) of one protobuf message (bytes for length-delimited fields)."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        yield number, wire, value


def _read_sentencepiece(path: Path) -> list[str]:
    """Pieces of a sentencepiece ``tokenizer.model`` in id order (ModelProto field 1, piece field 1)."""
    try:
        pieces = []
        for number, wire, value in _proto_fields(path.read_bytes()):
            if number == 1 and wire == 2:
                piece = next((v for n, w, v in _proto_fields(value) if n == 1 and w == 2), b"")
                pieces.append(piece.decode("utf-8"))
        return pieces
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable sentencepiece model ({exc})") from None


def _read_tokenizer_info(model_dir: Path) -> _TokenizerInfo:
    """Vocabulary and added tokens of a tokenizer folder, the way transformers would load them."""
    model_dir = Path(model_dir)
    vocab: dict[str, int] = {}
    added: dict[str, dict[str, bool]] = {}
    tj = model_dir / "tokenizer.json"
    if tj.is_file():
        data = _read_json(tj)
        model = data.get("model") or {}
        raw = model.get("vocab")
        if isinstance(raw, dict):
            vocab.update({str(k): int(v) for k, v in raw.items()})
        elif isinstance(raw, list):  # Unigram: [[piece, score], ...], id = position
            vocab.update({str(entry[0]): i for i, entry in enumerate(raw)})
        elif raw is not None:
            raise InputError(f"{tj}: model.vocab has an unexpected type {type(raw).__name__}")
        for entry in data.get("added_tokens") or []:
            vocab[str(entry["content"])] = int(entry["id"])
            added[str(entry["content"])] = _flags(entry)
        source = tj
    elif (model_dir / "vocab.json").is_file():
        source = model_dir / "vocab.json"
        vocab.update({str(k): int(v) for k, v in _read_json(source).items()})
    elif (model_dir / "vocab.txt").is_file():
        source = model_dir / "vocab.txt"
        lines = source.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        for i, line in enumerate(lines):
            vocab.setdefault(line.rstrip("\r"), i)
    elif (model_dir / "tokenizer.model").is_file():
        source = model_dir / "tokenizer.model"
        for i, piece in enumerate(_read_sentencepiece(source)):
            vocab.setdefault(piece, i)
    else:
        raise InputError(
            f"{model_dir}: no tokenizer files (expected tokenizer.json, vocab.json, vocab.txt or tokenizer.model)"
        )
    # transformers also loads added tokens listed beside the vocabulary files; take the ones not yet known
    taken = set(vocab.values())
    extra_json = model_dir / "added_tokens.json"
    if extra_json.is_file() and source.name != "tokenizer.json":
        for tok, idx in _read_json(extra_json).items():
            if tok not in vocab and int(idx) not in taken:
                vocab[tok] = int(idx)
                taken.add(int(idx))
                added[tok] = dict(_PLAIN_ADDED)
    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        decoder = _read_json(cfg_path).get("added_tokens_decoder") or {}
        for idx, entry in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            tok = str(entry.get("content"))
            if tok in vocab:
                added.setdefault(tok, _flags(entry))
            elif int(idx) not in taken:
                vocab[tok] = int(idx)
                taken.add(int(idx))
                added[tok] = _flags(entry)
    return _TokenizerInfo(vocab=vocab, added=added, file=source)


def load_vocab(model_dir: Path) -> dict[str, int]:
    """Token -> id from tokenizer.json (model.vocab + added_tokens), else vocab.json, vocab.txt or tokenizer.model."""
    return _read_tokenizer_info(Path(model_dir)).vocab


def _read_config(model_dir: Path) -> dict | None:
    path = Path(model_dir) / "config.json"
    return _read_json(path) if path.is_file() else None


def config_vocab_size(config: Mapping[str, Any] | None) -> int | None:
    """The embedding row count a model config declares (top level or its text sub-config)."""
    if not config:
        return None
    for key in ("vocab_size", "padded_vocab_size"):
        if isinstance(config.get(key), int):
            return int(config[key])
    for sub in ("text_config", "language_config", "llm_config"):
        if isinstance(config.get(sub), Mapping) and isinstance(config[sub].get("vocab_size"), int):
            return int(config[sub]["vocab_size"])
    return None


# ---------------------------------------------------------------------------------------------- planning


def _resolve_model(name: Any, model_dirs: Mapping[str, Path], key: str) -> str:
    """A recipe's model reference -> model key: exact key, same folder, or a unique folder-name match."""
    if not isinstance(name, str) or not name:
        raise RecipeError(f"{key}: expected a model name, got {name!r}")
    if name in model_dirs:
        return name
    try:
        wanted = Path(name).expanduser().resolve()
        same = [k for k, d in model_dirs.items() if Path(d).resolve() == wanted]
    except OSError:
        same = []
    if len(same) == 1:
        return same[0]
    tail = name.rstrip("/").rsplit("/", 1)[-1]
    by_tail = [k for k in model_dirs if k.rstrip("/").rsplit("/", 1)[-1] == tail]
    if len(by_tail) == 1:
        return by_tail[0]
    raise RecipeError(
        f"{key}: {name!r} is not one of the merged models; expected 'base', 'union' or one of {sorted(model_dirs)}"
    )


def _parse_override(tok: str, spec: Any, model_dirs: Mapping[str, Path], base: str | None) -> TokenOverride:
    key = f"tokenizer.tokens.{tok}"
    if spec is None:
        return TokenOverride()
    if not isinstance(spec, Mapping):
        raise RecipeError(f"{key}: expected a mapping with 'source' and/or 'force', got {spec!r}")
    unknown = set(spec) - _TOKEN_KEYS
    if unknown:
        raise RecipeError(f"{key}: unknown keys {sorted(unknown)} (allowed: {sorted(_TOKEN_KEYS)})")
    force = spec.get("force", False)
    if not isinstance(force, bool):
        raise RecipeError(f"{key}.force: expected true or false, got {force!r}")
    src = spec.get("source")
    if src is None:
        return TokenOverride(force=force)
    if isinstance(src, str):
        if src == "base":
            if base is None:
                raise RecipeError(f"{key}.source: 'base' needs a base_model in the recipe")
            return TokenOverride(kind="model", model=base, force=force)
        return TokenOverride(kind="model", model=_resolve_model(src, model_dirs, f"{key}.source"), force=force)
    if isinstance(src, Mapping):
        kind = src.get("kind")
        if kind == "zero":
            if set(src) - {"kind"}:
                raise RecipeError(f"{key}.source: kind 'zero' takes no other keys")
            return TokenOverride(kind="zero", force=force)
        if kind == "model_token":
            extra = set(src) - {"kind", "model", "token", "token_id"}
            if extra:
                raise RecipeError(f"{key}.source: unknown keys {sorted(extra)}")
            has_tok, has_id = src.get("token") is not None, src.get("token_id") is not None
            if has_tok == has_id:
                raise RecipeError(f"{key}.source: give exactly one of 'token' or 'token_id'")
            if has_id and (not isinstance(src["token_id"], int) or isinstance(src["token_id"], bool) or src["token_id"] < 0):
                raise RecipeError(f"{key}.source.token_id: expected a non-negative integer, got {src['token_id']!r}")
            model_name = src.get("model")
            model = base if model_name == "base" and base else _resolve_model(model_name, model_dirs, f"{key}.source.model")
            return TokenOverride(
                kind="model_token",
                model=model,
                token=str(src["token"]) if has_tok else None,
                token_id=int(src["token_id"]) if has_id else None,
                force=force,
            )
        raise RecipeError(f"{key}.source.kind: expected 'zero' or 'model_token', got {kind!r}")
    raise RecipeError(f"{key}.source: expected a model name or a mapping with 'kind', got {src!r}")


def _parse_setting(setting: str | Mapping[str, Any]) -> tuple[str, dict[str, Any], int | None]:
    """(source, tokens, pad_to_multiple_of) from a tokenizer_source string or a tokenizer mapping."""
    if isinstance(setting, str):
        return setting, {}, None
    if not isinstance(setting, Mapping):
        raise RecipeError(f"tokenizer: expected 'base', 'union', a model name or a mapping, got {setting!r}")
    unknown = set(setting) - _TOKENIZER_KEYS
    if unknown:
        raise RecipeError(f"tokenizer: unknown keys {sorted(unknown)} (allowed: {sorted(_TOKENIZER_KEYS)})")
    source = setting.get("source") or "union"  # mergekit's default
    tokens = setting.get("tokens") or {}
    if not isinstance(tokens, Mapping):
        raise RecipeError(f"tokenizer.tokens: expected a mapping of token -> settings, got {tokens!r}")
    pad = setting.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise RecipeError(f"tokenizer.pad_to_multiple_of: expected a positive integer, got {pad!r}")
    return source, dict(tokens), pad


def _usable(info: _TokenizerInfo, rows: int | None, key: str) -> list[tuple[int, str]]:
    """(id, token) pairs that have an embedding row, sorted by id; warns about the others."""
    pairs = sorted((i, t) for t, i in info.vocab.items())
    if rows is None:
        return pairs
    dropped = [t for i, t in pairs if i >= rows]
    if dropped:
        logger.warning("model %s: %d token(s) have ids beyond its %d embedding rows and are ignored (e.g. %r)", key, len(dropped), rows, dropped[0])
    return [(i, t) for i, t in pairs if i < rows]


def _placeholder_name(row: int, taken: set[str]) -> str:
    """A name for an output row that no tokenizer has a token for (never written into a tokenizer)."""
    name = f"<|placeholder_{row}|>"
    while name in taken:
        name = "_" + name
    return name


def plan_vocabulary(setting: str | Mapping[str, Any] | None, model_dirs: Mapping[str, Path], base: str | None) -> VocabPlan | None:
    """Output vocabulary and per-model row indices for a recipe's tokenizer setting (None: leave as is)."""
    if setting is None:
        return None
    if not model_dirs:
        raise RecipeError("tokenizer: no models to take a vocabulary from")
    model_dirs = {k: Path(v) for k, v in model_dirs.items()}
    if base is not None and base not in model_dirs:
        raise RecipeError(f"base_model {base!r} is not among the loaded models {sorted(model_dirs)}")
    source, token_specs, pad = _parse_setting(setting)
    first = base if base is not None else next(iter(model_dirs))
    if source in ("base", "union"):
        donor = first
    else:
        donor = _resolve_model(source, model_dirs, "tokenizer.source" if isinstance(setting, Mapping) else "tokenizer_source")

    configs = {k: _read_config(d) for k, d in model_dirs.items()}
    rows = {k: config_vocab_size(c) for k, c in configs.items()}
    infos: dict[str, _TokenizerInfo] = {donor: _read_tokenizer_info(model_dirs[donor])}
    for key, d in model_dirs.items():
        if key == donor:
            continue
        try:
            infos[key] = _read_tokenizer_info(d)
        except InputError:
            donor_size = rows[donor] or (max(infos[donor].vocab.values()) + 1 if infos[donor].vocab else 0)
            if rows[key] is not None and rows[key] == donor_size:
                logger.warning("model %s (%s) has no tokenizer files; assuming it shares %s's vocabulary", key, d, donor)
                infos[key] = infos[donor]
            else:
                raise InputError(
                    f"{d}: no tokenizer files (tokenizer.json, vocab.json, vocab.txt or tokenizer.model) for model "
                    f"{key!r}, and its config.json vocab_size ({rows[key]}) does not show it shares {donor!r}'s "
                    f"vocabulary ({donor_size}); add its tokenizer files"
                ) from None

    overrides = {str(t): _parse_override(str(t), spec, model_dirs, base) for t, spec in token_specs.items()}
    usable = {k: _usable(infos[k], rows[k], k) for k in model_dirs}

    # output tokens: donor's (ids kept), then union additions, then configured tokens still missing
    donor_pairs = usable[donor]
    n_donor = donor_pairs[-1][0] + 1 if donor_pairs else 0
    tokens: list[str | None] = [None] * n_donor
    for i, t in donor_pairs:
        tokens[i] = t
    present = {t for t in tokens if t is not None}
    added_flags: dict[str, dict[str, bool]] = {}

    def append(tok: str, flags: dict[str, bool]) -> None:
        tokens.append(tok)
        present.add(tok)
        added_flags[tok] = flags

    if source == "union":
        order = [donor] + [k for k in model_dirs if k != donor]
        added_anywhere: dict[str, dict[str, bool]] = {}
        for k in order:
            for _, t in usable[k]:
                if t in infos[k].added:
                    added_anywhere.setdefault(t, infos[k].added[t])
        for k in order:
            for _, t in usable[k]:
                if t not in present and t not in added_anywhere:
                    append(t, dict(_PLAIN_ADDED))
        for t, flags in added_anywhere.items():
            if t not in present:
                append(t, dict(flags))
    for t in overrides:
        if t not in present:
            append(t, dict(_PLAIN_ADDED))

    gaps = [i for i, t in enumerate(tokens) if t is None]
    n_real = len(tokens)
    n_out = n_real if not pad else math.ceil(n_real / pad) * pad
    for i in gaps:
        tokens[i] = _placeholder_name(i, present)
    tokens.extend(_placeholder_name(i, present) for i in range(n_real, n_out))
    placeholders = frozenset(gaps) | frozenset(range(n_real, n_out))
    if gaps:
        logger.warning("tokenizer of %s has %d unused id(s) below its largest id; their rows are filled like padding", donor, len(gaps))

    out_tokens: list[str] = [t for t in tokens if t is not None]
    row_index = {}
    for k in model_dirs:
        ids = {t: i for i, t in usable[k]}
        rows_k = [-1 if i in placeholders else ids.get(t, -1) for i, t in enumerate(out_tokens)]
        row_index[k] = torch.tensor(rows_k, dtype=torch.long)

    plan = VocabPlan(
        tokens=out_tokens,
        row_index=row_index,
        source=source if source in ("base", "union") else donor,
        donor=donor,
        base=base,
        placeholders=placeholders,
        overrides=overrides,
        added=added_flags,
        model_vocabs={k: dict(infos[k].vocab) for k in model_dirs},
        model_rows=rows,
        pad_to_multiple_of=pad,
    )
    _check_overrides(plan)
    logger.info(
        "output vocabulary (%s from %s): %d tokens, %d rows; %d new to the donor",
        plan.source, donor, n_real - len(gaps), n_out, len(added_flags),
    )
    return plan


def _check_overrides(plan: VocabPlan) -> None:
    """Report overrides that cannot be satisfied now, instead of midway through a merge."""
    ids = plan.token_ids()
    for tok, ov in plan.overrides.items():
        key = f"tokenizer.tokens.{tok}.source"
        if ov.kind == "model" and plan.row_index[ov.model][ids[tok]] < 0:
            raise RecipeError(f"{key}: model {ov.model!r} has no token {tok!r} (with an embedding row)")
        if ov.kind == "model_token":
            vocab, rows = plan.model_vocabs[ov.model], plan.model_rows.get(ov.model)
            if ov.token is not None and ov.token not in vocab:
                raise RecipeError(f"{key}.token: model {ov.model!r} has no token {ov.token!r}")
            src_id = vocab[ov.token] if ov.token is not None else ov.token_id
            if rows is not None and src_id >= rows:
                raise RecipeError(f"{key}: id {src_id} is beyond model {ov.model!r}'s {rows} embedding rows")


# ----------------------------------------------------------------------------------- embedding tensors

# Tensors whose first axis runs over the vocabulary, by the module that owns them.
_EMBED_PATTERNS = [
    re.compile(p)
    for p in (
        r"(^|\.)(embed_tokens|word_embeddings|wte|tok_embeddings|embed_in|embed_out|output_layer)\.weight$",
        r"(^|\.)embeddings\.weight$",  # e.g. mamba backbone.embeddings
        r"(^|\.)lm_head(\.linear|\.decoder)?\.(weight|bias)$",
        r"(^|\.)cls\.predictions\.(decoder\.weight|decoder\.bias|bias)$",
        r"^(model\.|transformer\.)?shared\.weight$",  # T5 / BART shared embedding
        r"^output\.weight$",  # top-level output head (llama.cpp-style names)
    )
]


def embedding_tensor_names(
    names: Iterable[str],
    config: Mapping[str, Any] | None,
    vocab_size: int | None = None,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> set[str]:
    """Names of the tensors indexed by token id on axis 0 (embeddings, LM heads and their biases).

    Matched by name; when ``shapes`` is given, only those whose first dimension equals the vocab size
    (``vocab_size`` or the config's) are kept.
    """
    size = vocab_size if vocab_size is not None else config_vocab_size(config)
    found = set()
    for name in names:
        if not any(p.search(name) for p in _EMBED_PATTERNS):
            continue
        if shapes is not None and size is not None:
            shape = shapes.get(name)
            if not shape or int(shape[0]) != size:
                continue
        found.add(name)
    return found


class _SharedDefaults:
    """Default rows for tokens some model lacks (or that are forced), computed once per tensor name.

    Only the rows that some model needs are kept (``rows[slot[i]]`` for output row ``i``), so the table stays
    small next to the embedding matrices.
    """

    def __init__(self, plan: VocabPlan, models: list[str], load: Callable[[str], torch.Tensor] | None, fill: str):
        self.plan, self.models, self.load, self.fill = plan, models, load, fill
        n = len(plan.tokens)
        self.real = torch.ones(n, dtype=torch.bool)
        self.real[sorted(plan.placeholders)] = False
        self.force = torch.zeros(n, dtype=torch.bool)
        ids = plan.token_ids()
        for tok, ov in plan.overrides.items():
            if ov.force and tok in ids:
                self.force[ids[tok]] = True
        self.index = torch.stack([plan.row_index[m] for m in models])  # [models, n]
        self.need = self.real & ((self.index < 0).any(0) | self.force)
        self.need_rows = self.need.nonzero().flatten()
        self.slot = torch.full((n,), -1, dtype=torch.long)
        self.slot[self.need_rows] = torch.arange(len(self.need_rows))
        self.rows: torch.Tensor | None = None  # [len(need_rows), *row shape], float32
        self.defined = torch.zeros(len(self.need_rows), dtype=torch.bool)

    def _getter(self, first_key: str, first: torch.Tensor) -> Callable[[str], torch.Tensor]:
        cache = {first_key: first}

        def get(key: str) -> torch.Tensor:
            if key not in cache:
                if self.load is None:
                    raise KeyError(key)
                tensor = self.load(key).to(first.device)
                if tuple(tensor.shape[1:]) != tuple(first.shape[1:]):
                    raise InputError(
                        f"embedding rows of model {key!r} have shape {list(tensor.shape[1:])}, "
                        f"but model {first_key!r} has {list(first.shape[1:])}"
                    )
                cache[key] = tensor
            return cache[key]

        return get

    def compute(self, first_key: str, first: torch.Tensor) -> None:
        """Fill the default rows, reading each donor model's tensor once (``first`` is not read again)."""
        plan, dev = self.plan, first.device
        need_rows, k = self.need_rows, len(self.need_rows)
        rows = torch.zeros((k, *first.shape[1:]), dtype=torch.float32, device=dev)
        defined = torch.zeros(k, dtype=torch.bool)
        get = self._getter(first_key, first)
        ids = plan.token_ids()

        def take(key: str, rid: int, slot: int, what: str) -> bool:
            try:
                tensor = get(key)
            except KeyError:
                logger.warning("row for %s comes from model %s, whose tensor is not available here; using the %s fill", what, key, self.fill)
                return False
            _check_rows(tensor, rid + 1, key)
            rows[slot] = tensor[rid].float()
            return True

        # configured sources first
        for tok, ov in plan.overrides.items():
            i = ids.get(tok)
            if i is None or ov.kind == "auto" or self.slot[i] < 0:
                continue
            slot = int(self.slot[i])
            if ov.kind == "zero":
                defined[slot] = True
            elif ov.kind == "model":
                defined[slot] = take(ov.model, int(plan.row_index[ov.model][i]), slot, repr(tok))
            else:  # model_token
                rid = plan.model_vocabs[ov.model][ov.token] if ov.token is not None else int(ov.token_id)
                defined[slot] = take(ov.model, rid, slot, repr(tok))
        # automatic defaults in mergekit's order: the only holder, else the base model, else the holders' mean
        idx = self.index[:, need_rows]  # [models, k]
        has = idx >= 0
        count = has.sum(0)
        auto = ~defined
        single = auto & (count == 1)
        base_pos = self.models.index(plan.base) if plan.base in self.models else None
        from_base = auto & (count >= 2) & (has[base_pos] if base_pos is not None else torch.zeros(k, dtype=torch.bool))
        mean = auto & (count >= 2) & ~from_base
        summed = torch.zeros(k, dtype=torch.float32)
        for pos, key in enumerate(self.models):
            direct = (single | (from_base if pos == base_pos else torch.zeros_like(single))) & has[pos]
            averaged = mean & has[pos]
            if not (direct.any() or averaged.any()):
                continue
            try:
                tensor = get(key)
            except KeyError:
                logger.warning("defaults that need model %s's rows are not available (no loader given); using the %s fill", key, self.fill)
                continue
            _check_rows(tensor, int(idx[pos].max()) + 1, key)
            for sel, add in ((direct.nonzero().flatten(), False), (averaged.nonzero().flatten(), True)):
                if not len(sel):
                    continue
                picked = tensor.index_select(0, idx[pos, sel].to(dev)).float()
                if add:
                    rows.index_add_(0, sel.to(dev), picked)
                    summed[sel] += 1
                else:
                    rows[sel.to(dev)] = picked
                    defined[sel] = True
        averaged = mean & (summed > 0)
        if averaged.any():
            sel = averaged.nonzero().flatten()
            rows[sel.to(dev)] /= summed[sel].to(dev).view(-1, *([1] * (rows.dim() - 1)))
            defined[sel] = True
        self.rows, self.defined = rows, defined
        nowhere = int((~defined & (count == 0)).sum())
        if nowhere:
            logger.info("%d output token(s) have no row in any model; filled with %s", nowhere, self.fill)


def _check_rows(tensor: torch.Tensor, needed: int, key: str) -> None:
    if tensor.dim() == 0 or tensor.shape[0] < needed:
        raise InputError(
            f"model {key!r}: embedding tensor has {tensor.shape[0] if tensor.dim() else 0} rows but its tokenizer "
            f"needs at least {needed}; its config.json vocab_size or tokenizer files do not match its weights"
        )


def _mean_except(out: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Mean over the rows of `out` not listed in `skip`, in float32, without copying the whole tensor."""
    kept = out.shape[0] - len(skip)
    if kept <= 0:
        return torch.zeros(out.shape[1:], dtype=torch.float32, device=out.device)
    total = torch.sum(out, dim=0, dtype=torch.float32)
    if len(skip):
        total -= torch.sum(out.index_select(0, skip), dim=0, dtype=torch.float32)
    return total / kept


def _make_remap(plan: VocabPlan, key: str, shared: _SharedDefaults) -> RowRemap:
    n = len(plan.tokens)
    idx = plan.row_index[key]
    own = (idx >= 0) & ~shared.force
    gather = torch.where(own, idx, torch.zeros_like(idx))  # rows the model lacks are overwritten below
    need_rows = (shared.real & ~own).nonzero().flatten()
    not_own = (~own).nonzero().flatten()
    pad_rows = (~shared.real).nonzero().flatten()
    top = int(idx[own].max()) + 1 if own.any() else 0
    identity = plan.is_identity(key) and not bool(shared.force.any())

    def remap(tensor: torch.Tensor) -> torch.Tensor:
        if identity and tensor.shape[0] == n:
            return tensor
        dev = tensor.device
        _check_rows(tensor, top, key)
        out = tensor.index_select(0, gather.to(dev))
        own_mean = _mean_except(out, not_own.to(dev)) if shared.fill == "mean" else None
        if len(need_rows):
            if shared.rows is None:
                shared.compute(key, tensor)
            slots = shared.slot[need_rows]
            ok = shared.defined[slots]
            if ok.any():
                out[need_rows[ok].to(dev)] = shared.rows[slots[ok].to(shared.rows.device)].to(dev, tensor.dtype)
            if (~ok).any():
                out[need_rows[~ok].to(dev)] = own_mean.to(tensor.dtype) if own_mean is not None else 0
        if len(pad_rows):
            # padding rows: mean of this model's real output rows (mergekit, after Hewitt's vocabulary-expansion note)
            out[pad_rows.to(dev)] = _mean_except(out, pad_rows.to(dev)).to(tensor.dtype)
        return out

    return remap


def embedding_remaps(
    plan: VocabPlan,
    load: Callable[[str], torch.Tensor] | None,
    *,
    models: Iterable[str] | None = None,
    fill: str = "zero",
) -> dict[str, RowRemap]:
    """Per-model callables that turn one embedding-like tensor into the output rows, with mergekit's defaults.

    ``load(model_key)`` returns that model's raw tensor (same tensor name); it is called at most once per model,
    and only for models that donate default rows. ``models`` limits which models take part (default: all in
    the plan; the base model is always added, as in mergekit); ``fill`` ("zero", mergekit's choice, or "mean") covers rows no model has. Make one set of
    remaps per tensor name: they share the computed default rows.
    """
    if fill not in ("zero", "mean"):
        raise ValueError(f"fill must be 'zero' or 'mean', got {fill!r}")
    keys = list(models) if models is not None else list(plan.row_index)
    if models is not None and plan.base is not None and plan.base not in keys and len(keys) > 1:
        keys.append(plan.base)  # mergekit always lets the base model take part in the defaults
    unknown = [k for k in keys if k not in plan.row_index]
    if unknown:
        raise InputError(f"models {unknown} are not part of the vocabulary plan ({sorted(plan.row_index)})")
    shared = _SharedDefaults(plan, keys, load, fill)
    return {k: _make_remap(plan, k, shared) for k in keys}


def row_remap(plan: VocabPlan, model_key: str, *, fill: str = "mean") -> RowRemap:
    """Gather one model's rows into the output order, on its own (no other model's rows are read).

    A row the model lacks gets the configured override when that only needs this model (``zero``, or a
    source/model_token on this model), else ``fill``: "mean" of the model's present rows (the
    vocabulary-expansion advice mergekit follows for padding) or "zero" (mergekit's choice for tokens no model
    has). Padding rows get the mean of the model's rows. For mergekit's cross-model defaults (sole holder,
    base row, mean of holders) use :func:`embedding_remaps`.
    """
    if model_key not in plan.row_index:
        raise InputError(f"model {model_key!r} is not part of the vocabulary plan ({sorted(plan.row_index)})")
    return embedding_remaps(plan, None, models=[model_key], fill=fill)[model_key]


# ------------------------------------------------------------------------------------------ writing files


def copy_tokenizer_files(src_dir: Path, out_dir: Path) -> list[str]:
    """Copy a model's tokenizer files unchanged (the no-setting case); returns the names copied."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, out_dir / name)
            copied.append(name)
    if not copied:
        _report_no_tokenizer(src_dir)
    return copied


_NO_TOKENIZER_REPORTED: set[str] = set()


def _report_no_tokenizer(src_dir: Path) -> None:
    """Say once per folder that it has no tokenizer files: a warning only where config.json declares a vocabulary.

    Vision and MLP checkpoints never had a tokenizer, so for them the fact is a debug note, not a warning
    repeated on every merge.
    """
    key = str(src_dir.resolve())
    if key in _NO_TOKENIZER_REPORTED:
        return
    _NO_TOKENIZER_REPORTED.add(key)
    try:
        config = _read_config(src_dir)
    except InputError:
        config = None
    rows = config_vocab_size(config) if isinstance(config, Mapping) else None
    if rows is not None:
        logger.warning("%s declares a %d-token vocabulary but has no tokenizer files to copy", src_dir, rows)
    else:
        logger.debug("%s has no tokenizer files to copy (no vocabulary declared)", src_dir)


def _merge_parts(entry: Any) -> tuple[str, str] | None:
    if isinstance(entry, str):
        parts = entry.split(" ")
        return (parts[0], parts[1]) if len(parts) == 2 else None
    if isinstance(entry, (list, tuple)) and len(entry) == 2:
        return str(entry[0]), str(entry[1])
    return None


def _patch_tokenizer_json(data: dict, remove: set[str], extras: list[tuple[int, str, dict[str, bool]]], where: Path) -> dict:
    """Drop `remove` tokens from a tokenizer.json and append `extras` as added tokens."""
    data = dict(data)
    data["added_tokens"] = [e for e in data.get("added_tokens") or [] if e.get("content") not in remove]
    model = dict(data.get("model") or {})
    vocab = model.get("vocab")
    if remove and isinstance(vocab, dict):
        model["vocab"] = {t: i for t, i in vocab.items() if t not in remove}
    elif remove and isinstance(vocab, list):
        model["vocab"] = [e for e in vocab if e[0] not in remove]
    if remove and isinstance(model.get("merges"), list):
        prefix = model.get("continuing_subword_prefix") or ""
        kept = []
        for entry in model["merges"]:
            parts = _merge_parts(entry)
            if parts is None:
                raise InputError(f"{where}: unexpected BPE merge entry {entry!r}")
            a, b = parts
            joined = a + (b[len(prefix) :] if prefix and b.startswith(prefix) else b)
            if a in remove or b in remove or joined in remove or a + b in remove:
                continue
            kept.append(entry)
        model["merges"] = kept
    data["model"] = model
    specials = (data.get("post_processor") or {}).get("special_tokens") or {}
    for name in specials:
        if name in remove:
            logger.warning("%s: post-processor refers to token %r, which is not in the output vocabulary", where, name)
    for i, tok, flags in extras:
        data["added_tokens"].append({"id": i, "content": tok, **{k: flags[k] for k in _ADDED_FLAGS}})
    return data


def _verify_tokenizer_json(text: str, wanted: dict[str, int], where: Path) -> None:
    """The written tokenizer must give every output token its planned id."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # the tokenizers library comes with the optional transformers extra
        logger.info("tokenizers is not installed; the written tokenizer.json was not test-loaded")
        return
    try:
        tk = Tokenizer.from_str(text)
    except Exception as exc:  # the tokenizers library raises its own exception types
        raise InputError(f"{where}: the adjusted tokenizer does not load ({exc})") from None
    for tok, i in wanted.items():
        got = tk.token_to_id(tok)
        if got != i:
            raise InputError(
                f"{where}: could not give token {tok!r} id {i} (tokenizer assigns {got}); "
                "the donor's vocabulary ids are not contiguous, so it cannot be extended in place"
            )


def _donor_tokenizer_json(src: Path) -> dict | None:
    """tokenizer.json of the donor, converting slow-only tokenizer files with transformers when needed."""
    if (src / "tokenizer.json").is_file():
        return _read_json(src / "tokenizer.json")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(src))
        backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
        return json.loads(backend.to_str()) if backend is not None else None
    except Exception as exc:  # conversion needs optional packages for some formats; fall back below
        logger.warning("could not build tokenizer.json for %s (%s); new tokens go into tokenizer_config.json only", src, exc)
        return None


def write_tokenizer_files(plan: VocabPlan, model_dirs: Mapping[str, Path], out_dir: Path) -> list[str]:
    """Write the donor's tokenizer files into out_dir, adjusted so token ids match plan.tokens; returns names written."""
    src = Path(model_dirs[plan.donor])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = plan.token_ids()
    donor_vocab = plan.model_vocabs[plan.donor]
    remove = {t for t, i in donor_vocab.items() if wanted.get(t) != i}
    extras = sorted((i, t, plan.added.get(t, dict(_PLAIN_ADDED))) for t, i in wanted.items() if donor_vocab.get(t) != i)
    written = copy_tokenizer_files(src, out_dir)
    if not remove and not extras:
        return written
    logger.info("tokenizer from %s: %d token(s) removed, %d added", plan.donor, len(remove), len(extras))

    data = _donor_tokenizer_json(src)
    if data is not None:
        patched = _patch_tokenizer_json(data, remove, extras, src / "tokenizer.json")
        text = json.dumps(patched, ensure_ascii=False, indent=2)
        _verify_tokenizer_json(text, wanted, src / "tokenizer.json")
        (out_dir / "tokenizer.json").write_text(text, encoding="utf-8")
        if "tokenizer.json" not in written:
            written.append("tokenizer.json")

    cfg_path = out_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = _read_json(cfg_path)
        decoder = {k: v for k, v in (cfg.get("added_tokens_decoder") or {}).items() if v.get("content") not in remove}
        for i, tok, flags in extras:
            decoder[str(i)] = {"content": tok, **{k: flags[k] for k in ("lstrip", "normalized", "rstrip", "single_word", "special")}}
        cfg["added_tokens_decoder"] = dict(sorted(decoder.items(), key=lambda kv: int(kv[0])))
        for list_key in ("additional_special_tokens", "extra_special_tokens"):
            if isinstance(cfg.get(list_key), list):
                cfg[list_key] = [t for t in cfg[list_key] if (t.get("content") if isinstance(t, dict) else t) not in remove]
        for role in ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token"):
            value = cfg.get(role)
            value = value.get("content") if isinstance(value, dict) else value
            if value in remove:
                logger.warning("tokenizer_config.json: %s %r is not in the output vocabulary", role, value)
        cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    elif data is None:
        raise InputError(f"{src}: cannot add tokens: no tokenizer.json and no tokenizer_config.json to record them in")

    extra_path = out_dir / "added_tokens.json"
    if extra_path.is_file():
        legacy = {t: i for t, i in _read_json(extra_path).items() if t not in remove}
        legacy.update({t: i for i, t, _ in extras})
        extra_path.write_text(json.dumps(legacy, ensure_ascii=False, indent=2), encoding="utf-8")
    return written


def updated_config(config: Mapping[str, Any], plan: VocabPlan, *, config_model: str | None = None) -> dict:
    """A copy of config with vocab_size = output rows; with config_model, special token ids moved to output ids."""
    out = json.loads(json.dumps(config))
    size = len(plan.tokens)
    targets = [out] + [out[s] for s in ("text_config", "language_config", "llm_config") if isinstance(out.get(s), dict)]
    set_any = False
    for target in targets:
        for key in ("vocab_size", "padded_vocab_size"):
            if key in target:
                target[key] = size
                set_any = True
    if not set_any:
        out["vocab_size"] = size
    if config_model is not None:
        by_id = {i: t for t, i in plan.model_vocabs[config_model].items()}
        ids = plan.token_ids()

        def move(value: Any, key: str) -> Any:
            if isinstance(value, list):
                return [move(v, key) for v in value]
            if not isinstance(value, int) or isinstance(value, bool):
                return value
            tok = by_id.get(value)
            if tok is None or tok not in ids:
                logger.warning("config %s=%r: token %r is not in the output vocabulary; left unchanged", key, value, tok)
                return value
            return ids[tok]

        for target in targets:
            for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id"):
                if key in target and target[key] is not None:
                    target[key] = move(target[key], key)
    return out


# -------------------------------------------------------------------------------------------- chat template

BUILTIN_CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    ),
    "llama3": (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{{- '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\\n\\n' ~ (message['content'] | trim) ~ '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
    ),
    "alpaca": (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{{- message['content'] ~ '\\n\\n' -}}"
        "{%- elif message['role'] == 'user' -%}{{- '### Instruction:\\n' ~ message['content'] ~ '\\n\\n' -}}"
        "{%- elif message['role'] == 'assistant' -%}{{- '### Response:\\n' ~ message['content'] ~ eos_token ~ '\\n\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"
    ),
}
# Marker tokens a built-in template expects to find in the vocabulary.
_TEMPLATE_MARKERS = {"chatml": ("<|im_start|>", "<|im_end|>"), "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}


def read_chat_template(model_dir: Path) -> str | None:
    """A model's chat template: chat_template.jinja (what transformers prefers), else tokenizer_config.json."""
    model_dir = Path(model_dir)
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg_path = model_dir / "tokenizer_config.json"
    if not cfg_path.is_file():
        return None
    template = _read_json(cfg_path).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def resolve_chat_template(setting: str | None, model_dirs: Mapping[str, Path]) -> str | None:
    """The template text a chat_template setting stands for (None: nothing to write)."""
    if setting is None:
        return None
    if not isinstance(setting, str) or not setting.strip():
        raise InputError(f"chat_template: expected 'auto', a template name or Jinja text, got {setting!r}")
    if setting == "auto":
        found = [t.strip() for t in (read_chat_template(d) for d in model_dirs.values()) if t]
        if not found:
            logger.warning("chat_template: auto found no chat template in any input model; none written")
            return None
        template, votes = Counter(found).most_common(1)[0]
        logger.info("chat_template: auto picked the template used by %d of %d model(s)", votes, len(model_dirs))
        return template
    if setting in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[setting]
    if "{{" in setting or "{%" in setting:
        import jinja2

        try:
            jinja2.Environment().parse(setting)
        except jinja2.TemplateSyntaxError as exc:
            raise InputError(f"chat_template: the Jinja template does not parse (line {exc.lineno}: {exc.message})") from None
        return setting
    raise InputError(
        f"chat_template: unknown template {setting!r}; supported: 'auto', "
        + ", ".join(repr(n) for n in BUILTIN_CHAT_TEMPLATES)
        + ", or a literal Jinja template"
    )


def apply_chat_template(setting: str | None, model_dirs: Mapping[str, Path], out_dir: Path) -> str | None:
    """Write the chat template into out_dir's tokenizer_config.json (and chat_template.jinja if present); returns it."""
    template = resolve_chat_template(setting, model_dirs)
    if template is None:
        return None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    # transformers reads chat_template.jinja in preference to the config key: keep the two in agreement
    jinja = out_dir / "chat_template.jinja"
    if jinja.is_file():
        jinja.write_text(template, encoding="utf-8")
    markers = _TEMPLATE_MARKERS.get(setting or "", ())
    if markers:
        try:
            vocab = load_vocab(out_dir)
        except InputError:
            vocab = None
        missing = [m for m in markers if vocab is not None and m not in vocab]
        if missing:
            logger.warning("chat_template %s uses %s, which the output tokenizer lacks (add them under tokenizer.tokens)", setting, missing)
    return template


__all__ = [
    "BUILTIN_CHAT_TEMPLATES",
    "TOKENIZER_FILES",
    "TokenOverride",
    "VocabPlan",
    "apply_chat_template",
    "config_vocab_size",
    "copy_tokenizer_files",
    "embedding_remaps",
    "embedding_tensor_names",
    "load_vocab",
    "plan_vocabulary",
    "read_chat_template",
    "resolve_chat_template",
    "row_remap",
    "updated_config",
    "write_tokenizer_files",
]
