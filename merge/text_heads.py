"""Per-task linear heads on a text encoder's mean-pooled features: files, features, accuracy, probes.

Multi-task merging (task arithmetic, TIES, RegMean, AdaMerging...) merges the fine-tuned *encoders* and keeps
every task's own classification head: a merged encoder is scored on a task by that task's head. A fine-tune
folder is a Hugging Face encoder folder (tensors named as in the base, so merge recipes line up) with its head
beside it in ``head/`` (``head.safetensors`` holding ``weight`` and ``bias``, ``head.json`` holding the task and
class names). ``head/`` is a subfolder so the model store, which reads every ``*.safetensors`` at the folder's
top level, never mistakes the head for encoder tensors.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from suture.merge.errors import InputError
from suture.merge.measure import pool_items

logger = logging.getLogger(__name__)

HEAD_DIR = "head"
HEAD_FILE = "head.safetensors"
HEAD_META = "head.json"


@dataclass
class LinearHead:
    """A task's classifier on pooled features: logits = features @ weight.T + bias."""

    weight: torch.Tensor  # (classes, hidden)
    bias: torch.Tensor  # (classes,)
    task: str
    classes: tuple[str, ...]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores for (n, hidden) features."""
        return features.float() @ self.weight.float().T + self.bias.float()

    def accuracy(self, features: torch.Tensor, labels: Sequence[int]) -> float:
        """Fraction of rows whose arg-max class is the label."""
        y = torch.as_tensor(list(labels))
        return float((self.logits(features).argmax(1) == y).float().mean()) if len(y) else float("nan")


def save_head(folder: str | Path, head: LinearHead) -> Path:
    """Write ``folder/head/`` (safetensors + json)."""
    from safetensors.torch import save_file

    out = Path(folder) / HEAD_DIR
    out.mkdir(parents=True, exist_ok=True)
    save_file({"weight": head.weight.detach().float().contiguous(), "bias": head.bias.detach().float().contiguous()}, out / HEAD_FILE)
    (out / HEAD_META).write_text(json.dumps({"task": head.task, "classes": list(head.classes)}, indent=2) + "\n")
    return out


def load_head(folder: str | Path) -> LinearHead:
    """Read a fine-tune's ``head/``; a missing or malformed head is one InputError naming the file."""
    from safetensors.torch import load_file

    where = Path(folder) / HEAD_DIR
    try:
        meta = json.loads((where / HEAD_META).read_text(encoding="utf-8"))
        tensors = load_file(str(where / HEAD_FILE))
        weight, bias, classes = tensors["weight"], tensors["bias"], tuple(str(c) for c in meta["classes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{where}: no readable task head ({HEAD_FILE} with weight and bias, {HEAD_META} with classes): {exc}") from None
    if weight.ndim != 2 or bias.shape != (weight.shape[0],) or weight.shape[0] != len(classes):
        raise InputError(f"{where / HEAD_FILE}: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not fit {len(classes)} classes")
    return LinearHead(weight, bias, str(meta.get("task", "")), classes)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states over real (unpadded) tokens, as sentence-transformers' MiniLM does
    (the shared masked pooling of :func:`suture.merge.measure.pool_items`)."""
    return pool_items(hidden, mask, channel_axis=-1)


def pooled(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled last hidden state of a Hugging Face encoder for one tokenized batch."""
    return mean_pool(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state, batch["attention_mask"])


def attach_head(model: nn.Module, head: LinearHead) -> nn.Module:
    """Make an encoder return ``head``'s logits on its mean-pooled output (the features compare scores with).

    Data-driven merges (Fisher's log-likelihood, AdaMerging's entropy, aTLAS's cross-entropy) need each
    fine-tune's task logits, but the encoder folder holds no classifier: its head lives in ``head/``. A forward
    hook replaces the encoder's output, so the module's state names stay the encoder's (the statistics and
    learned coefficients line up with the store's tensors) and the head, a constant, is never merged. Works
    under ``torch.func.functional_call`` too. Returns the same module.
    """
    on: dict[torch.device, LinearHead] = {}

    def to_logits(_module: nn.Module, args: tuple, kwargs: dict, output: object) -> torch.Tensor:
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            raise InputError(f"task head {head.task!r}: the encoder's output {type(output).__name__} has no last_hidden_state")
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
        if hidden.device not in on:
            on[hidden.device] = replace(head, weight=head.weight.detach().to(hidden.device), bias=head.bias.detach().to(hidden.device))
        return on[hidden.device].logits(mean_pool(hidden, mask))

    model.register_forward_hook(to_logits, with_kwargs=True)
    return model


@torch.no_grad()
def encode(model: nn.Module, tokenizer, texts: Sequence[str], *, max_length: int = 64, batch_size: int = 64,
           progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """(n, hidden) pooled features, in input order; texts are sorted by length and padded per batch (less padding)."""
    if not len(texts):
        raise InputError("no texts to encode")
    was_training = model.training
    model.eval()
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": [ids[i] for i in chunk]}, return_tensors="pt")
        feats = pooled(model, batch)
        for j, i in enumerate(chunk):
            out[i] = feats[j]
        if progress:
            progress(min(start + batch_size, len(order)), len(order))
    model.train(was_training)
    return torch.stack(out)


def fit_probe(features: torch.Tensor, labels: Sequence[int], classes: Sequence[str], task: str, *, seed: int = 0) -> LinearHead:
    """A logistic-regression head (scikit-learn, L2, C=1 on standardised features folded back into the weights)."""
    from sklearn.linear_model import LogisticRegression

    x = features.double().numpy()
    mu, sd = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit((x - mu) / sd, np.asarray(labels))
    if list(clf.classes_) != list(range(len(classes))):
        raise InputError(f"task {task}: the probe's training labels {list(clf.classes_)} do not cover its {len(classes)} classes")
    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # binary: scikit-learn keeps one row for class 1; two rows give the same arg-max
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    weight = coef / sd
    bias = intercept - (coef * mu / sd).sum(1)
    return LinearHead(torch.from_numpy(weight).float(), torch.from_numpy(bias).float(), task, tuple(classes))


__all__ = ["HEAD_DIR", "LinearHead", "attach_head", "encode", "fit_probe", "load_head", "mean_pool", "pooled", "save_head"]
