"""Per-token loss and perplexity of language models: causal (next token) and masked (BERT-style) objectives.

Targets follow transformers' ``labels=`` convention, so :func:`lm_loss` agrees with a model's own loss: for a
causal LM the targets are the input ids (padding set to -100) and the logits at position i are scored against
the token at i + 1; for a masked LM the targets hold the original ids at masked positions and -100 elsewhere,
scored at the same position. The loss is the mean over every scored token of the whole data (not a mean of
batch means), so it does not depend on the batch size.

Masked-LM evaluation masks a fixed, seeded 15 % of the tokens (Devlin et al. 2019): each item's draw depends
only on the seed, the item's position in the data and its own tokens, so every model (endpoints, merges, every
point of an interpolation path) is scored on exactly the same masked positions and reruns give the same
figures. Chosen tokens are all replaced by the mask token: BERT's 10 % random / 10 % unchanged replacements
are a training device, and leaving them out measures prediction from context alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from suture.merge.data import CalibrationData, Inputs, inputs_to
from suture.merge.errors import InputError

logger = logging.getLogger(__name__)

LMKind = Literal["causal", "masked"]
IGNORE_INDEX = -100  # transformers' ignored label
MASK_RATE = 0.15
_ROW_SEED_STRIDE = 1_000_003  # a prime: item i of seed s draws from generator s * stride + i


@dataclass(frozen=True)
class LMLoss:
    """Mean per-token cross-entropy (nats), its exponential, the number of scored tokens and top-1 accuracy."""

    loss: float
    perplexity: float
    tokens: int
    accuracy: float

    def as_dict(self) -> dict[str, float | int]:
        """The metrics as report.json and interpolation curves record them."""
        return {"loss": self.loss, "accuracy": self.accuracy, "perplexity": self.perplexity, "tokens": self.tokens}


def lm_kind(module: nn.Module) -> LMKind | None:
    """'causal' or 'masked' for a language-model head, else None.

    Read from ``suture_objective`` (set by :mod:`merge.hf_module` on modules built from config.json) or, for a
    transformers model passed directly, from its class name (``*ForCausalLM``, ``*LMHeadModel``, ``*ForMaskedLM``).
    """
    from suture.merge.hf_module import _objective  # the one rule that reads a class name

    objective = getattr(module, "suture_objective", None)
    if objective in ("causal", "masked"):
        return objective
    return _objective(module)


def perplexity(loss: float) -> float:
    """exp(loss), infinite instead of an overflow for a diverged model."""
    return math.exp(loss) if loss < 709.0 else math.inf


def causal_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token targets in transformers' convention: the ids themselves, padding set to -100 (shifted when scored)."""
    if attention_mask is None:
        return input_ids.clone()
    return torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    mask_token_id: int,
    special_ids: Sequence[int] = (),
    rate: float = MASK_RATE,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input ids, targets): a seeded `rate` of each item's ordinary tokens replaced by the mask token.

    Padding and special tokens ([CLS], [SEP], ...) are never chosen. Item i draws from its own generator
    (seeded by `seed` and i), so its mask does not depend on the batch size, the padded width or other items.
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"mask rate must lie in (0, 1), got {rate}")
    ids = input_ids.long()
    attended = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    eligible = attended & ~torch.isin(ids, torch.tensor(list(special_ids), dtype=ids.dtype))
    chosen = torch.zeros_like(eligible)
    for i in range(ids.shape[0]):
        gen = torch.Generator().manual_seed(seed * _ROW_SEED_STRIDE + i)
        chosen[i] = torch.rand(ids.shape[1], generator=gen) < rate
    chosen &= eligible
    masked = torch.where(chosen, torch.full_like(ids, int(mask_token_id)), ids)
    targets = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    return masked, targets


def is_token_text(dataset: CalibrationData) -> bool:
    """True for unlabelled token data (e.g. a ``.txt`` file): what is scored as language modelling."""
    return dataset.labels is None and isinstance(dataset.inputs, Mapping) and "input_ids" in dataset.inputs


def lm_evaluation(dataset: CalibrationData, kind: LMKind, *, mask_rate: float = MASK_RATE,
                  seed: int = 0) -> tuple[CalibrationData, dict]:
    """:func:`lm_data` for an evaluation, plus what a report records of it (kind, masking, block size)."""
    prepared = lm_data(dataset, kind, mask_rate=mask_rate, seed=seed)
    info: dict = {"kind": kind}
    if kind == "masked":
        info.update(mask_rate=mask_rate, mask_seed=seed)
    if "block_size" in prepared.meta:
        info["block_size"] = prepared.meta["block_size"]
    return prepared, info


def lm_data(
    dataset: CalibrationData,
    kind: LMKind,
    *,
    mask_rate: float = MASK_RATE,
    seed: int = 0,
    mask_token_id: int | None = None,
    special_ids: Sequence[int] | None = None,
) -> CalibrationData:
    """Token data prepared for :func:`lm_loss`: per-token targets as the labels (masked inputs for a masked LM).

    The mask token and special ids default to those :func:`merge.data.load_dataset` recorded from the
    tokenizer (``meta['tokenizer']``). Already prepared data of the same kind is returned as is.
    """
    if dataset.meta.get("lm_kind") is not None:
        if dataset.meta["lm_kind"] != kind:
            raise InputError(f"data {dataset.name!r} was prepared for a {dataset.meta['lm_kind']} LM, not a {kind} one")
        return dataset
    inputs = dataset.inputs
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
        raise InputError(f"data {dataset.name!r}: language-model evaluation needs token data (input_ids), e.g. a .txt file")
    if dataset.labels is not None:
        raise InputError(f"data {dataset.name!r} has class labels; language-model evaluation scores the text itself "
                         "(remove the TAB labels, or evaluate a classifier)")
    mask = inputs.get("attention_mask")
    meta = {**dataset.meta, "lm_kind": kind}
    if kind == "causal":
        return CalibrationData(dict(inputs), causal_targets(inputs["input_ids"], mask), dataset.name, None, meta)
    if kind != "masked":
        raise InputError(f"language-model kind must be 'causal' or 'masked', got {kind!r}")
    tok = dataset.meta.get("tokenizer") or {}
    mask_token_id = tok.get("mask_token_id") if mask_token_id is None else mask_token_id
    if mask_token_id is None:
        raise InputError(f"data {dataset.name!r}: masked-LM evaluation needs a mask token, and the tokenizer has none "
                         "(a BERT-style tokenizer defines mask_token, e.g. [MASK])")
    special = tok.get("special_ids", ()) if special_ids is None else special_ids
    masked, targets = mask_tokens(inputs["input_ids"], mask, mask_token_id=int(mask_token_id), special_ids=special,
                                  rate=mask_rate, seed=seed)
    if not bool((targets != IGNORE_INDEX).any()):
        raise InputError(f"data {dataset.name!r}: the {mask_rate:g} masking chose no token; give more text")
    meta.update(mask_rate=mask_rate, mask_seed=seed)
    return CalibrationData({**inputs, "input_ids": masked}, targets, dataset.name, None, meta)


def _logits(output: object) -> torch.Tensor:
    from suture.merge.evaluate import model_logits

    return model_logits(output)


@torch.no_grad()
def lm_loss(
    model: nn.Module,
    batches: Iterable[tuple[Inputs, torch.Tensor]],
    kind: LMKind,
    device: str | torch.device | None = None,
) -> LMLoss:
    """Per-token loss, perplexity and top-1 accuracy of `model` over `(inputs, targets)` batches.

    `inputs` is a dict of tensors passed as keyword arguments (input_ids, attention_mask, ...); `targets` holds
    token ids with -100 where nothing is scored, exactly what the model's ``labels=`` takes. The module is
    evaluated in eval mode and left in the mode it was in.
    """
    if kind not in ("causal", "masked"):
        raise InputError(f"language-model kind must be 'causal' or 'masked', got {kind!r}")
    shift = 1 if kind == "causal" else 0
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    try:
        for inputs, targets in batches:
            if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
                raise InputError("language-model batches need a dict of tensors with input_ids")
            inputs = inputs_to(inputs, device)
            targets = targets.to(device)
            logits = _logits(model(**inputs))
            if logits.dim() != 3 or logits.shape[:2] != targets.shape:
                raise InputError(f"model {type(model).__name__} returns logits of shape {tuple(logits.shape)} for tokens of "
                                 f"shape {tuple(targets.shape)}; expected a language model (a causal or masked LM head)")
            scored_logits = logits[:, : logits.shape[1] - shift].float()
            target = targets[:, shift:]
            keep = target != IGNORE_INDEX
            if not bool(keep.any()):
                continue
            picked, wanted = scored_logits[keep], target[keep]
            if int(wanted.max()) >= picked.shape[-1] or int(wanted.min()) < 0:
                raise InputError(f"token ids up to {int(wanted.max())} but the model's vocabulary has {picked.shape[-1]} entries; "
                                 "is the tokenizer the model's own?")
            total += F.cross_entropy(picked, wanted, reduction="sum").item()
            correct += int((picked.argmax(-1) == wanted).sum())
            count += int(keep.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise InputError("nothing to score: every target is padding or ignored (sequences shorter than two tokens?)")
    loss = total / count
    logger.debug("%s LM loss %.4f over %d tokens", kind, loss, count)
    return LMLoss(loss=loss, perplexity=perplexity(loss), tokens=count, accuracy=correct / count)
