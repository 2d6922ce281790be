"""Evaluation of a module on data, along the linear path between two weight vectors, and loss barriers.

Tasks are picked from the data: with class labels it is classification (mean cross-entropy, top-1 accuracy
on the logits); token data without labels is language modelling, scored per token by
:mod:`merge.lm_eval` (next-token loss for causal LMs, seeded 15 % masking for masked LMs; perplexity and the
number of scored tokens are reported beside loss and accuracy). Models may return a tensor, a tuple (first
item) or an object with ``.logits`` (Hugging Face outputs).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from suture.merge.data import CalibrationData, Inputs, inputs_to, iter_batches
from suture.merge.errors import InputError

logger = logging.getLogger(__name__)

Curve = list[dict[str, float]]
ModuleSource = nn.Module | Callable[[], nn.Module]


def model_logits(output: Any) -> torch.Tensor:
    """The logits in a model output: the tensor itself, `.logits`, or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        raise InputError(f"model output of type {type(output).__name__} has hidden states but no logits: a model without an "
                         "output head (e.g. transformers' BertModel) has no loss to evaluate; evaluate a head class "
                         "(config.json `architectures`, e.g. BertForMaskedLM, GPT2LMHeadModel)")
    raise InputError(f"model output of type {type(output).__name__} has no logits; expected a tensor, a tuple or .logits")


def run_module(module: nn.Module, inputs: Inputs) -> Any:
    """Call a module on a batch: a tensor positionally, a dict of tensors as keyword arguments."""
    return module(**inputs) if isinstance(inputs, Mapping) else module(inputs)


def _batch_sums(logits: torch.Tensor, labels: torch.Tensor | None, name: str) -> tuple[float, float, int]:
    """(sum of losses, number correct, number of items) for one batch of class labels."""
    if labels is None:
        raise InputError(f"data {name!r} has no labels, and it is not token data for a language model; expected labelled data")
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise InputError(f"data {name!r}: model logits of shape {tuple(logits.shape)} do not fit {labels.shape[0]} class labels")
    if int(labels.max()) >= logits.shape[1] or int(labels.min()) < 0:
        low, high = int(labels.min()), int(labels.max())
        raise InputError(f"data {name!r}: labels range {low}..{high} but the model has {logits.shape[1]} outputs")
    loss = F.cross_entropy(logits.float(), labels, reduction="sum")
    return loss.item(), (logits.argmax(dim=1) == labels).sum().item(), labels.shape[0]


@torch.no_grad()
def evaluate(
    module: nn.Module, dataset: CalibrationData, batch_size: int = 256, device: str | torch.device | None = None
) -> dict[str, float]:
    """Mean loss and accuracy of ``module`` on ``dataset`` (module left in the mode it was in)."""
    if len(dataset) == 0:
        raise InputError(f"data {dataset.name!r} is empty")
    lm = _language_model_data(module, dataset)
    if lm is not None:
        from suture.merge.lm_eval import lm_loss

        return lm_loss(module, iter_batches(lm, batch_size), lm.meta["lm_kind"], device=device).as_dict()
    was_training = module.training
    module.eval()
    if device is None:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
    total_loss, total_correct, total_n = 0.0, 0.0, 0
    try:
        for inputs, labels in iter_batches(dataset, batch_size):
            inputs = inputs_to(inputs, device)
            labels = None if labels is None else labels.to(device)
            loss, correct, n = _batch_sums(model_logits(run_module(module, inputs)), labels, dataset.name)
            total_loss, total_correct, total_n = total_loss + loss, total_correct + correct, total_n + n
    finally:
        module.train(was_training)
    if total_n == 0:
        raise InputError(f"data {dataset.name!r}: nothing to score")
    return {"loss": total_loss / total_n, "accuracy": total_correct / total_n}


def _language_model_data(module: nn.Module, dataset: CalibrationData) -> CalibrationData | None:
    """The data prepared for per-token LM scoring (see :mod:`merge.lm_eval`), or None for other tasks.

    Prepared data (per-token targets) is scored as it is; unlabelled token data is scored as the module's LM
    objective (causal when the module does not declare one) with the default seeded masking.
    """
    from suture.merge.lm_eval import is_token_text, lm_data, lm_kind

    kind = lm_kind(module)
    prepared = dataset.meta.get("lm_kind")
    if prepared is not None:
        if kind is not None and kind != prepared:
            raise InputError(f"data {dataset.name!r} was prepared for a {prepared} language model, but "
                             f"{type(module).__name__} is a {kind} one")
        return dataset
    if not is_token_text(dataset):
        return None
    return lm_data(dataset, kind or "causal")


def interpolate_states(
    state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], t: float
) -> dict[str, torch.Tensor]:
    """(1 - t) * a + t * b for floating tensors; integer tensors (e.g. BN batch counters) come from a."""
    if set(state_a) != set(state_b):
        only_a, only_b = sorted(set(state_a) - set(state_b)), sorted(set(state_b) - set(state_a))
        raise InputError(f"states differ in tensor names: only in A {only_a[:5]}, only in B {only_b[:5]}")
    out = {}
    for name, a in state_a.items():
        b = state_b[name]
        if a.shape != b.shape:
            raise InputError(f"tensor {name!r}: shape {tuple(a.shape)} in A but {tuple(b.shape)} in B")
        if a.is_floating_point():
            out[name] = torch.lerp(a.float(), b.to(a.device).float(), float(t)).to(a.dtype)
        else:
            out[name] = a.clone()
    return out


def _make_module(source: ModuleSource) -> nn.Module:
    if isinstance(source, nn.Module):
        return copy.deepcopy(source)  # never overwrite the caller's weights
    if callable(source):
        module = source()
        if not isinstance(module, nn.Module):
            raise InputError(f"module factory returned a {type(module).__name__}, expected a torch.nn.Module")
        return module
    raise InputError(f"expected a torch.nn.Module or a zero-argument factory, got {type(source).__name__}")


def interpolation_curve(
    module: ModuleSource,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    dataset: CalibrationData,
    points: int | Sequence[float] = 11,
    reset_bn_data: Any = None,
    repair_data: Any = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> Curve:
    """Loss and accuracy at evenly spaced t in [0, 1] (or the given t values) on the path a -> b.

    ``reset_bn_data`` (batches or a dataset) re-estimates BatchNorm statistics at every point;
    ``repair_data`` applies REPAIR at every interior point instead (see :mod:`merge.repair`).
    """
    from suture.merge.repair import repair, reset_batchnorm
    from suture.merge.zoo import load_into

    ts = _points(points)
    net = _make_module(module)
    if device is not None:
        net.to(device)
    endpoints: tuple[nn.Module, nn.Module] | None = None
    if repair_data is not None:
        end_a, end_b = _make_module(module), _make_module(module)
        load_into(end_a, state_a, source="state A")
        load_into(end_b, state_b, source="state B")
        endpoints = (end_a, end_b)
    curve: Curve = []
    for t in ts:
        load_into(net, interpolate_states(state_a, state_b, t), source=f"interpolated state t={t:g}")
        if endpoints is not None and 0.0 < t < 1.0:
            repair(net, endpoints[0], endpoints[1], repair_data, t=t)
        elif reset_bn_data is not None:
            reset_batchnorm(net, reset_bn_data)
        metrics = evaluate(net, dataset, batch_size=batch_size, device=device)
        curve.append({"t": float(t), **metrics})
        logger.debug("t=%.3f loss=%.4f acc=%.4f", t, metrics["loss"], metrics["accuracy"])
    return curve


def _points(points: int | Sequence[float]) -> list[float]:
    if isinstance(points, int):
        if points < 2:
            raise InputError(f"an interpolation curve needs at least 2 points, got {points}")
        return [i / (points - 1) for i in range(points)]
    ts = sorted(float(t) for t in points)
    if not ts or ts[0] < 0 or ts[-1] > 1:
        raise InputError(f"interpolation points must lie in [0, 1], got {list(points)}")
    return ts


BARRIER_EPS = 1e-6  # |barrier| below this is rounding noise of an exact match, reported as 0


def shown_barrier(value: Any) -> float | None:
    """A barrier as reports and tables show it: None when absent or not finite, 0.0 for |x| < 1e-6.

    An exact match gives 0 up to float rounding, and a printed -3e-9 would read as an improvement; larger
    negatives (a midpoint below the endpoints' line) are real and kept.
    """
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(float(value)):
        return None
    return 0.0 if abs(float(value)) < BARRIER_EPS else float(value)


def barrier(
    curve: Sequence[Mapping[str, float]],
    metric: str = "loss",
    kind: Literal["max", "midpoint"] = "max",
) -> float:
    """Barrier of a curve: the largest excess over the straight line between the endpoints.

    For ``loss`` this is max_t loss(t) - [(1 - t) loss(0) + t loss(1)] (Git Re-Basin); for ``accuracy``
    the sign flips (the largest drop below the line). ``kind="midpoint"`` takes t = 0.5 only.
    The max variant includes the endpoints, so it is never negative.
    """
    rows = sorted(curve, key=lambda r: r["t"])
    if len(rows) < 2 or not math.isclose(rows[0]["t"], 0.0, abs_tol=1e-9) or not math.isclose(rows[-1]["t"], 1.0, abs_tol=1e-9):
        raise InputError("a barrier needs a curve with points at t=0 and t=1")
    if metric not in rows[0]:
        raise InputError(f"curve has no metric {metric!r}; it has {sorted(rows[0])}")
    sign = -1.0 if metric == "accuracy" else 1.0
    start, end = rows[0][metric], rows[-1][metric]

    def excess(row: Mapping[str, float]) -> float:
        t = row["t"]
        return sign * (row[metric] - ((1 - t) * start + t * end))

    if kind == "midpoint":
        mids = [r for r in rows if math.isclose(r["t"], 0.5, abs_tol=1e-9)]
        if not mids:
            raise InputError("the midpoint barrier needs a curve point at t=0.5 (use an odd number of points)")
        return excess(mids[0])
    if kind != "max":
        raise InputError(f"barrier kind must be 'max' or 'midpoint', got {kind!r}")
    return max(excess(r) for r in rows)
