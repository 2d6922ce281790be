"""Per-model statistics for data-driven merge methods: each model runs its own data, one model at a time.

A data-driven method (``@merge_method(needs_data=...)``) reads, per input tensor, one statistics dict per
model in ``MergeInputs.stats``. This module measures them on a built ``nn.Module`` (a zoo model, a user
architecture or a Hugging Face folder, see :class:`ModelData`), keyed by the module's state names, which are
the store's tensor names:

``"gram"`` (RegMean, Jin et al., ICLR 2023)
    for every ``nn.Linear`` weight ``{"gram": E[x x^T], "count": n}`` over the n input rows the layer saw
    (every token of every item is a row; padded tokens, where an ``attention_mask`` tells them, are left
    out), accumulated in float64 with :class:`merge.measure.RunningMoments` as the hooks fire, so one
    layer's inputs of one batch are in memory at a time.
``"fisher"`` (Fisher merging, Matena & Raffel, NeurIPS 2022)
    for every parameter ``{"fisher": mean over items of (d log p(y|x) / d theta)^2}``, the diagonal of the
    Fisher information, from per-item gradients; y is the item's label (``labels="true"``, the empirical
    Fisher) or drawn from the model's own predictive distribution (``"sampled"``, an unbiased estimate of
    the true Fisher; what unlabelled data allows). Token-level logits count each unpadded position. Each
    entry also carries ``"norm"``, the L2 norm of the model's whole Fisher, for per-model normalisation.

:func:`sequential_gram` measures Gram matrices under the *merged* model's earlier layers (RegMean++): layer
by layer, each model's inputs to block l come from the already merged blocks < l, while block l itself is
still the model's own, as FusionBench's RegMean++ does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from suture.merge.data import CalibrationData, Inputs, inputs_to, iter_batches
from suture.merge.errors import InputError, SutureError
from suture.merge.measure import RunningMoments, Site, capture, eval_mode

logger = logging.getLogger(__name__)

Stats = dict[str, dict[str, Any]]  # tensor name -> statistics dict
Progress = Callable[[str, int, int, str], None]


@dataclass
class ModelData:
    """One model and its own data, as the statistics stage needs them.

    ``build`` returns a fresh module holding the model's own weights (one model is built at a time, and
    dropped before the next); ``where`` names the data in messages (a recipe key with its YAML line).
    """

    key: str
    data: CalibrationData
    build: Callable[[], nn.Module]
    where: str = "data"


def _mask_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A layer input as (rows, features); positions the attention mask marks as padding are dropped."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def _batch_mask(inputs: Inputs) -> torch.Tensor | None:
    return inputs.get("attention_mask") if isinstance(inputs, Mapping) else None


def _run(module: nn.Module, inputs: Inputs, md: ModelData) -> Any:
    """Call the module on one batch; a failure (wrong input shape or type) names the data and the model."""
    from suture.merge.evaluate import run_module

    try:
        return run_module(module, inputs)
    except SutureError as exc:
        if str(exc).startswith(md.where):
            raise
        raise InputError(f"{md.where}: running data {md.data.name!r} through model {md.key} failed: {exc}") from None
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        shape = {k: list(v.shape) for k, v in inputs.items()} if isinstance(inputs, Mapping) else list(inputs.shape)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{md.where}: running data {md.data.name!r} (inputs {shape}) through model {md.key} failed: {first}") from None


def linear_layers(module: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of the module by its weight's state name (``encoder.layer.0.attention.self.query.weight``)."""
    return {f"{name}.weight": m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


class _Enough(Exception):
    """Raised from a hook once every layer of interest has seen its input: the rest of the forward pass is skipped."""


def _stop(*_: Any) -> None:
    raise _Enough


def collect_gram(module: nn.Module, md: ModelData, *, batch_size: int, device: torch.device,
                 only: Sequence[str] | None = None) -> Stats:
    """RegMean's statistics: the mean input Gram matrix of every Linear (or of the weights in ``only``, in forward order)."""
    layers = {k: m for k, m in linear_layers(module).items() if only is None or k in only}
    if not layers:
        return {}
    module.to(device)
    moments = {k: RunningMoments(m.in_features, gram=True, device=device) for k, m in layers.items()}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def accumulate(key: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def take(x: torch.Tensor) -> torch.Tensor:
            moments[key].update(_mask_rows(x, current["mask"]))
            return x.new_empty(0)  # the hook accumulates; nothing is kept

        return take

    prefix = {k: k.removesuffix(".weight") for k in layers}
    sites = {k: Site(prefix[k], "input", accumulate(k), label=f"layer {prefix[k]!r}") for k in layers}
    stop = None
    if only:  # a sequential step needs one block's inputs: stop once the last of its layers has run
        stop = module.get_submodule(only[-1].removesuffix(".weight")).register_forward_hook(_stop)
    try:
        with torch.no_grad(), eval_mode(module), capture(module, sites, keep="last"):
            for inputs, _ in iter_batches(md.data, batch_size):
                inputs = inputs_to(inputs, device)
                current["mask"] = _batch_mask(inputs)
                try:
                    _run(module, inputs, md)
                except _Enough:
                    pass
    finally:
        if stop is not None:
            stop.remove()
    out: Stats = {}
    for key, m in moments.items():
        if m.count == 0:
            logger.warning("%s: layer %s never ran on the data of model %s; it is averaged", md.where, prefix[key], md.key)
            continue
        out[key] = {"gram": m.second_moment(), "count": m.count}
    return out


def collect_fisher(module: nn.Module, md: ModelData, *, batch_size: int, device: torch.device,
                   labels: str = "auto", generator: torch.Generator | None = None) -> Stats:
    """Fisher merging's statistics: the diagonal Fisher of every trainable parameter from per-item gradients.

    ``labels``: ``"true"`` uses the data's labels (error without them), ``"sampled"`` draws each label from
    the model's predictive distribution, ``"auto"`` takes the labels when the data has them.
    """
    from suture.merge.evaluate import model_logits

    if labels == "true" and md.data.labels is None:
        raise InputError(f"{md.where}: Fisher labels 'true' need labelled data, but {md.data.name!r} has no labels")
    use_labels = labels == "true" or (labels == "auto" and md.data.labels is not None)
    module.to(device)
    named = {k: v for k, v in module.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter) and v.requires_grad}
    params = list({id(p): p for p in named.values()}.values())  # tied weights once
    sums = {id(p): torch.zeros_like(p, dtype=torch.float64) for p in params}
    generator = generator or torch.Generator().manual_seed(0)
    items = 0
    with eval_mode(module):  # dropout off: the Fisher of the deterministic model that is merged
        for inputs, y in iter_batches(md.data, batch_size):
            for j in range(_count(inputs)):
                one = inputs_to(_item(inputs, j), device)
                logits = model_logits(_run(module, one, md))
                rows = _mask_rows(logits, _batch_mask(one)) if logits.dim() > 2 else logits.reshape(-1, logits.shape[-1])
                logp = torch.log_softmax(rows.double(), dim=-1)
                if use_labels:
                    if logits.dim() > 2:
                        raise InputError(f"{md.where}: true labels are per item, but model {md.key} gives token-level logits; "
                                         "use labels: sampled")
                    target = y[j : j + 1].to(device) if y is not None else None
                    if target is None or int(target.max()) >= rows.shape[-1] or int(target.min()) < 0:
                        raise InputError(f"{md.where}: label {None if target is None else int(target[0])} does not fit model "
                                         f"{md.key}'s {rows.shape[-1]} outputs (relabel the data for this model's head)")
                else:
                    target = torch.multinomial(logp.detach().exp().float().cpu(), 1, generator=generator).squeeze(1).to(device)
                loss = -logp.gather(1, target.reshape(-1, 1)).sum()
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g in zip(params, grads):
                    if g is not None:
                        sums[id(p)] += g.detach().double().pow(2)
                items += 1
    if items == 0:
        raise InputError(f"{md.where}: data {md.data.name!r} is empty")
    # accumulated in float64, kept in float32: one model-sized copy per model until the merge runs
    fishers = {id(p): (sums[id(p)] / items).float() for p in params}
    # the model's whole-Fisher L2 norm: Fisher merging may normalise each model by it (FusionBench's default)
    norm = float(torch.sqrt(sum(f.double().pow(2).sum() for f in fishers.values()))) if fishers else 0.0
    return {name: {"fisher": fishers[id(p)], "count": items, "norm": norm} for name, p in named.items()}


def _count(inputs: Inputs) -> int:
    return inputs.shape[0] if isinstance(inputs, torch.Tensor) else next(iter(inputs.values())).shape[0]


def _item(inputs: Inputs, j: int) -> Inputs:
    return inputs[j : j + 1] if isinstance(inputs, torch.Tensor) else {k: v[j : j + 1] for k, v in inputs.items()}


def collect_stats(kind: str, models: Sequence[ModelData], *, batch_size: int, device: torch.device,
                  labels: str = "auto", seed: int = 0, progress: Progress | None = None) -> dict[str, Stats]:
    """Statistics of ``kind`` for each model on its own data, model key -> tensor name -> dict (one model built at a time)."""
    out: dict[str, Stats] = {}
    for i, md in enumerate(models):
        if progress:
            progress("data", i, len(models), md.key)
        module = md.build()
        if kind == "gram":
            out[md.key] = collect_gram(module, md, batch_size=batch_size, device=device)
        elif kind == "fisher":
            gen = torch.Generator().manual_seed(seed + i)
            out[md.key] = collect_fisher(module, md, batch_size=batch_size, device=device, labels=labels, generator=gen)
        else:
            raise InputError(f"unknown statistics kind {kind!r}; expected 'gram' or 'fisher'")
        del module
        logger.info("statistics (%s) of model %s: %d tensors from %d items", kind, md.key, len(out[md.key]), len(md.data))
    if progress:
        progress("data", len(models), len(models), "")
    return out


# ------------------------------------------------------------------------------------- sequential (RegMean++)
def linear_blocks(module: nn.Module, md: ModelData, *, device: torch.device) -> list[list[str]]:
    """Linear weights grouped by block (the layer index in their names), blocks in forward order.

    A Linear outside numbered blocks (a digits MLP's ``fc2``, a classifier) is a block of its own.
    """
    from suture.merge.layers import find_layer

    layers = linear_layers(module)
    order: list[str] = []
    names = {id(m): k for k, m in layers.items()}
    hooks = [m.register_forward_pre_hook(lambda m, _a: order.append(names[id(m)]) if names[id(m)] not in order else None)
             for m in layers.values()]
    try:
        inputs, _ = md.data[0:1]
        with torch.no_grad(), eval_mode(module):
            _run(module.to(device), inputs_to(inputs, device), md)
    finally:
        for h in hooks:
            h.remove()
    order += [k for k in layers if k not in order]  # layers the data never reaches still get a block
    blocks: dict[Any, list[str]] = {}
    for k in order:
        match = find_layer(k, generic=False)
        blocks.setdefault(("layer", match.index) if match else ("own", k), []).append(k)
    return list(blocks.values())


def block_tensors(block: list[str], names: Sequence[str]) -> set[str]:
    """Every tensor a block owns: its linears' weights and biases and, in a numbered block, all of that block's tensors."""
    from suture.merge.layers import find_layer

    match = find_layer(block[0], generic=False)
    own = set(block) | {k.removesuffix(".weight") + ".bias" for k in block}
    if match is not None:
        own |= {n for n in names if (m := find_layer(n, generic=False)) is not None and m.index == match.index}
    return own & set(names)


def sequential_gram(models: Sequence[ModelData], names: Sequence[str],
                    merge: Callable[[set[str], Mapping[str, Stats]], Mapping[str, torch.Tensor]],
                    *, batch_size: int, device: torch.device, progress: Progress | None = None) -> dict[str, Stats]:
    """Gram statistics measured under the merged earlier blocks (RegMean++), block by block.

    ``names``: every tensor of the merge; ``merge(tensor names, stats)`` merges those tensors with the given
    statistics and returns them. Tensors outside every Linear block (embeddings, norms outside blocks) are
    merged first (averaged: no statistics). For each block in forward order, each model is built with every
    tensor merged so far loaded over its own and runs its data up to that block; the block's inputs give its
    Gram matrices, and the block is merged before the next one is measured. Cost: one partial forward pass
    per block and model; memory: the merged tensors so far plus one model.
    """
    first = models[0].build()
    blocks = linear_blocks(first, models[0], device=device)
    del first
    owned = [block_tensors(b, names) for b in blocks]
    free = set(names) - set().union(*owned) if owned else set(names)
    merged: dict[str, torch.Tensor] = dict(merge(free, {md.key: {} for md in models})) if free else {}
    out: dict[str, Stats] = {md.key: {} for md in models}
    for b, (block, tensors) in enumerate(zip(blocks, owned)):
        if progress:
            progress("data", b, len(blocks), block[0].removesuffix(".weight"))
        step: dict[str, Stats] = {}
        for md in models:
            module = md.build()
            _load_merged(module, merged, md)
            step[md.key] = collect_gram(module, md, batch_size=batch_size, device=device, only=block)
            out[md.key].update(step[md.key])
            del module
        merged.update(merge(tensors, step))
    if progress:
        progress("data", len(blocks), len(blocks), "")
    return out


def _load_merged(module: nn.Module, merged: Mapping[str, torch.Tensor], md: ModelData) -> None:
    """Put the merged tensors so far into a model's module (the rest stays the model's own)."""
    own = module.state_dict()
    subset = {k: v.to(own[k].dtype) for k, v in merged.items() if k in own}
    module.load_state_dict(subset, strict=False)
