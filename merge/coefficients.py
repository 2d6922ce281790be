"""Learned task-arithmetic coefficients: the one optimisation loop behind AdaMerging and aTLAS.

Both methods keep task arithmetic's form and learn its scales from data instead of searching one λ:

    merged[name] = base[name] + Σ_k λ[k, g(name)] · (finetuned_k[name] - base[name])

where ``g`` maps each learned tensor to a *group*: one group for all tensors (task-wise), one per transformer
block (block-wise), or one per parameter tensor (what AdaMerging's code calls layer-wise and aTLAS calls
parameter blocks). The coefficients are the only trainable values; the merged parameters are rebuilt from
them at every step and fed to each task's module with ``torch.func.functional_call``, so no module is copied
per step and gradients flow to λ alone.

- AdaMerging (Yang et al., ICLR 2024, https://arxiv.org/abs/2310.02575): minimise the Shannon entropy of
  the predictions on unlabelled test inputs, summed over tasks; λ initialised at 0.3, Adam lr 1e-3, λ
  clamped to [0, 1] at every step (its reference code).
- aTLAS (Zhang et al., NeurIPS 2024, https://arxiv.org/abs/2407.02880): one coefficient per parameter block
  per task vector, initialised at 0, trained with cross-entropy on a few labelled examples (or entropy when
  unlabelled); AdamW with weight decay 0.1, gradient norm clipped to 1, cosine learning-rate decay, lr 0.1
  (its few-shot script), no clamp.

The final merge is computed with the registered ``task_arithmetic`` kernel, one tensor at a time, with each
model's learned coefficient as its ``weight``; that is why the exported recipe
(:mod:`suture.merge.coefficient_export`) reproduces it bit for bit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ContextManager, Literal

import torch
import torch.nn.functional as F
from torch import nn

from suture.merge.data import CalibrationData, Inputs, inputs_to
from suture.merge.errors import InputError
from suture.merge.layers import find_layer, tensor_section
from suture.merge.threads import single_threaded_if_small

logger = logging.getLogger(__name__)

Granularity = Literal["task", "block", "tensor"]
GRANULARITIES: tuple[str, ...] = ("task", "block", "tensor")
Objective = Literal["entropy", "cross_entropy"]
#: progress(stage, done, total, detail): the callback shape the recipe runner and the app use
Progress = Callable[[str, int, int, str], None]
#: (merged parameters by name, one batch of inputs) -> logits
Forward = Callable[[dict[str, torch.Tensor], Inputs], torch.Tensor]


# --- groups -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grouping:
    """Which coefficient each learned tensor uses: ``index[i]`` is the group of ``names[i]``."""

    granularity: str
    names: tuple[str, ...]
    labels: tuple[str, ...]
    index: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.index):
            raise ValueError(f"{len(self.names)} names but {len(self.index)} group indices")
        object.__setattr__(self, "_groups", dict(zip(self.names, self.index)))

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, name: object) -> bool:
        return name in self._groups  # type: ignore[attr-defined]

    def group_of(self, name: str) -> int:
        """The group index of a learned tensor."""
        try:
            return self._groups[name]  # type: ignore[attr-defined]
        except KeyError:
            raise InputError(f"tensor {name!r} is not among the learned tensors") from None


def group_tensors(names: Sequence[str], granularity: str) -> Grouping:
    """Group tensor names for one coefficient per group and task.

    ``task``: one group. ``block``: one group per transformer block (``layers.N`` / ``layer.N`` / ``h.N``...),
    plus one for the tensors before the blocks (embeddings) and one for those after them (final norm, heads).
    ``tensor``: one group per tensor.
    """
    names = tuple(names)
    if not names:
        raise InputError("no tensors to learn coefficients for")
    if granularity == "task":
        return Grouping("task", names, ("all",), (0,) * len(names))
    if granularity == "tensor":
        return Grouping("tensor", names, names, tuple(range(len(names))))
    if granularity == "block":
        keys: list[str] = []
        for name in names:
            match = find_layer(name, generic=False)
            keys.append(f"layer {match.index}" if match is not None else tensor_section(name))
        order = sorted(set(keys), key=_block_order)
        return Grouping("block", names, tuple(order), tuple(order.index(k) for k in keys))
    raise InputError(f"granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")


def _block_order(key: str) -> tuple[int, int]:
    if key == "pre":
        return (0, 0)
    if key.startswith("layer "):
        return (1, int(key.split()[1]))
    return (2, 0)


def learnable_names(base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                    only: Sequence[str] | None = None) -> list[str]:
    """Floating-point tensors present, with one shape, in the base and every fine-tune (base order).

    ``only`` restricts the result (e.g. to a module's parameters, leaving per-task heads out).
    """
    keep = set(only) if only is not None else None
    out = []
    for name, tensor in base.items():
        if keep is not None and name not in keep:
            continue
        if not tensor.is_floating_point():
            continue
        if all(name in ft and ft[name].shape == tensor.shape for ft in finetuned):
            out.append(name)
    return out


# --- objectives -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskObjective:
    """One task's share of the loss: a forward that takes merged parameters, and that task's batches."""

    name: str
    forward: Forward
    batches: Sequence[tuple[Inputs, torch.Tensor | None]]
    where: str = ""  # what error messages name (e.g. a recipe key and its line); default: the task's name

    def batch(self, step: int) -> tuple[Inputs, torch.Tensor | None]:
        """The batch used at ``step`` (the batches are cycled in their fixed order)."""
        return self.batches[step % len(self.batches)]

    @property
    def label(self) -> str:
        """How messages name this task."""
        return self.where or f"task {self.name!r}"

    def logits(self, params: dict[str, torch.Tensor], inputs: Inputs) -> torch.Tensor:
        """The forward on one batch; a failure (inputs that do not fit the model) is one InputError line."""
        from suture.merge.errors import SutureError

        try:
            return self.forward(params, inputs)
        except SutureError as exc:
            raise InputError(f"{self.label}: {exc}") from None
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(f"{self.label}: running its data through the model failed: {first}") from None


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax predictions (AdaMerging's objective)."""
    logits = logits.float()
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()


def module_forward(module: nn.Module) -> Forward:
    """A forward that runs ``module`` with some of its tensors replaced (functional_call, no copy).

    Tensors not in the given dict (a per-task head, buffers) keep the module's own values. The module is
    put in eval mode so that dropout does not make the objective random.
    """
    from suture.merge.evaluate import model_logits

    module.eval()

    def forward(params: dict[str, torch.Tensor], inputs: Inputs) -> torch.Tensor:
        if isinstance(inputs, Mapping):
            out = torch.func.functional_call(module, params, (), dict(inputs), strict=False)
        else:
            out = torch.func.functional_call(module, params, (inputs,), strict=False)
        return model_logits(out)

    return forward


def module_objective(name: str, module: nn.Module, data: CalibrationData, *, batch_size: int = 16,
                     labelled: bool = True, seed: int = 0, max_items: int | None = None,
                     device: torch.device | str = "cpu", where: str = "") -> TaskObjective:
    """A task objective from a module (trunk + this task's head) and its data, in a seeded shuffled order.

    ``labelled=False`` drops the labels (AdaMerging's unlabelled test-time setting); the batches are moved
    to ``device`` once, up front.
    """
    if batch_size < 1:
        raise InputError(f"task {name!r}: batch_size must be at least 1, got {batch_size}")
    data = data.take(max_items)
    n = len(data)
    if n == 0:
        raise InputError(f"task {name!r}: data {data.name!r} has no items")
    if labelled and data.labels is None:
        raise InputError(f"task {name!r}: data {data.name!r} has no labels; a labelled objective needs them")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    batches = []
    for start in range(0, n, batch_size):
        inputs, labels = data[order[start:start + batch_size]]
        batches.append((inputs_to(inputs, device), labels.to(device) if labelled and labels is not None else None))
    return TaskObjective(name, module_forward(module), batches, where)


def _task_loss(task: TaskObjective, logits: torch.Tensor, labels: torch.Tensor | None, objective: str) -> torch.Tensor:
    if objective == "entropy" or labels is None:
        if objective == "cross_entropy":
            raise InputError(f"{task.label}: cross-entropy needs labelled batches")
        return softmax_entropy(logits)
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise InputError(f"{task.label}: logits of shape {tuple(logits.shape)} do not fit {labels.shape[0]} labels")
    if int(labels.max()) >= logits.shape[1] or int(labels.min()) < 0:
        raise InputError(f"{task.label}: labels range {int(labels.min())}..{int(labels.max())} "
                         f"but the model has {logits.shape[1]} outputs")
    return F.cross_entropy(logits.float(), labels)


# --- settings and result ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LearnSettings:
    """Optimisation settings; :data:`ADAMERGING` and :data:`ATLAS` hold each paper's defaults."""

    steps: int = 100
    init: float = 0.3
    lr: float = 1e-3
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = 0.0
    clamp: tuple[float, float] | None = (0.0, 1.0)
    clip_grad_norm: float | None = None
    cosine: bool = False
    objective: Objective = "entropy"

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise InputError(f"steps must be >= 0, got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"lr must be a finite number > 0, got {self.lr}")
        if not math.isfinite(self.init):
            raise InputError(f"init must be finite, got {self.init}")
        if self.optimizer not in ("adam", "adamw"):
            raise InputError(f"optimizer {self.optimizer!r}: expected 'adam' or 'adamw'")
        if self.objective not in ("entropy", "cross_entropy"):
            raise InputError(f"objective {self.objective!r}: expected 'entropy' or 'cross_entropy'")
        if self.clamp is not None and not self.clamp[0] <= self.clamp[1]:
            raise InputError(f"clamp {self.clamp}: the lower bound must not exceed the upper one")

    def with_(self, **changes: Any) -> LearnSettings:
        """A copy with some settings changed (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


ADAMERGING = LearnSettings(init=0.3, lr=1e-3, optimizer="adam", clamp=(0.0, 1.0), objective="entropy")
ATLAS = LearnSettings(init=0.0, lr=0.1, optimizer="adamw", weight_decay=0.1, clamp=None, clip_grad_norm=1.0,
                      cosine=True, objective="cross_entropy")


@dataclass
class LearnedCoefficients:
    """The learned coefficients ``values[k, g]`` (task vector k, group g) and the loss history."""

    vectors: tuple[str, ...]
    grouping: Grouping
    values: torch.Tensor
    settings: LearnSettings
    history: list[dict[str, Any]] = field(default_factory=list)

    def weight(self, vector: int, name: str) -> float:
        """The coefficient of task vector ``vector`` on tensor ``name`` (0 for tensors not learned)."""
        if name not in self.grouping:
            return 0.0
        return float(self.values[vector, self.grouping.group_of(name)])

    def weights(self, vector: int) -> dict[str, float]:
        """Every learned tensor's coefficient for one task vector."""
        row = self.values[vector]
        return {n: float(row[g]) for n, g in zip(self.grouping.names, self.grouping.index)}

    def report(self) -> dict[str, Any]:
        """JSON-friendly summary: settings, coefficients per task vector and group, first/last loss."""
        s = self.settings
        losses = [h["loss"] for h in self.history]
        return {
            "granularity": self.grouping.granularity,
            "objective": s.objective,
            "steps": s.steps,
            "settings": {"init": s.init, "lr": s.lr, "optimizer": s.optimizer, "weight_decay": s.weight_decay,
                         "clamp": list(s.clamp) if s.clamp else None, "clip_grad_norm": s.clip_grad_norm,
                         "cosine": s.cosine},
            "groups": list(self.grouping.labels),
            "coefficients": {v: [float(x) for x in self.values[k]] for k, v in enumerate(self.vectors)},
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
        }


# --- merging ---------------------------------------------------------------------------------------


def task_vectors(base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                 names: Sequence[str]) -> list[dict[str, torch.Tensor]]:
    """``finetuned_k - base`` for each fine-tune, restricted to ``names`` (detached)."""
    out = []
    for k, ft in enumerate(finetuned):
        vec = {}
        for name in names:
            if name not in ft:
                raise InputError(f"tensor {name!r} is missing from fine-tuned model {k}")
            if ft[name].shape != base[name].shape:
                raise InputError(f"tensor {name!r}: fine-tuned model {k} has shape {tuple(ft[name].shape)}, "
                                 f"the base {tuple(base[name].shape)}")
            vec[name] = (ft[name].detach() - base[name].detach())
        out.append(vec)
    return out


def merged_parameters(base: Mapping[str, torch.Tensor], vectors: Sequence[Mapping[str, torch.Tensor]],
                      grouping: Grouping, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
    """``base + Σ_k λ[k, g(name)] τ_k`` for every learned tensor; differentiable in ``coefficients``."""
    out = {}
    for name, g in zip(grouping.names, grouping.index):
        b = base[name].detach()
        total = b
        for k, vec in enumerate(vectors):
            total = total + coefficients[k, g].to(b.dtype) * vec[name]
        out[name] = total
    return out


def apply_coefficients(base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                       learned: LearnedCoefficients, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The merged tensors through the ``task_arithmetic`` kernel, each model weighted by its coefficient.

    ``names`` (default: every base tensor) are merged; tensors not learned get weight 0 and keep the base's
    values. This is exactly what the exported task_arithmetic recipe computes.
    """
    from suture.merge.methods import run_method
    from suture.merge.methods.registry import MergeInputs

    out = {}
    for name in names if names is not None else list(base):
        b = base[name]
        if not b.is_floating_point() or any(name not in ft or ft[name].shape != b.shape for ft in finetuned):
            out[name] = b.clone()
            continue
        model_params = [{"weight": learned.weight(k, name)} for k in range(len(finetuned))]
        inputs = MergeInputs(name=name, tensors=[ft[name] for ft in finetuned], model_params=model_params,
                             params={}, base=b)
        out[name] = run_method("task_arithmetic", inputs)
    return out


# --- learning -------------------------------------------------------------------------------------


def _clamped(raw: torch.Tensor, clamp: tuple[float, float] | None) -> torch.Tensor:
    return raw if clamp is None else raw.clamp(clamp[0], clamp[1])


def _threads(base: Mapping[str, torch.Tensor], names: Sequence[str]) -> ContextManager[None]:
    """One CPU thread for small models: tiny products on a busy machine run far faster (and reproducibly)."""
    largest = max((base[n] for n in names), key=lambda t: t.numel())
    return single_threaded_if_small(largest.numel(), largest.device)


def learn_coefficients(
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    grouping: Grouping,
    tasks: Sequence[TaskObjective],
    settings: LearnSettings = ADAMERGING,
    *,
    vector_names: Sequence[str] | None = None,
    progress: Progress | None = None,
    stage: str = "coefficients",
    watch: Callable[[int, torch.Tensor], None] | None = None,
) -> LearnedCoefficients:
    """Learn one coefficient per (task vector, group) by gradient descent on the tasks' summed loss.

    ``finetuned`` are the fine-tuned models' tensors (the task vectors are taken against ``base``);
    ``tasks`` the objectives, each with a forward that reads merged parameters. Deterministic: batches
    come in each objective's fixed (seeded, see :func:`module_objective`) order and nothing else is
    random. ``progress`` is called after each step; ``watch(step, coefficients)`` too, with a detached copy
    of the (clamped) coefficients, so a caller can score the trajectory (e.g. on validation data).
    """
    if not finetuned:
        raise InputError("learning merge coefficients needs at least one fine-tuned model")
    if not tasks:
        raise InputError("learning merge coefficients needs at least one task with data")
    for t in tasks:
        if not t.batches:
            raise InputError(f"task {t.name!r} has no batches")
    names = vector_names or [f"model {k}" for k in range(len(finetuned))]
    if len(names) != len(finetuned):
        raise InputError(f"{len(finetuned)} fine-tuned models but {len(names)} names")
    vectors = task_vectors(base, finetuned, grouping.names)
    device = base[grouping.names[0]].device
    raw = torch.full((len(finetuned), len(grouping)), float(settings.init), dtype=torch.float32, device=device,
                     requires_grad=True)
    opt_cls = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls([raw], lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(settings.steps, 1))
                 if settings.cosine else None)
    history: list[dict[str, Any]] = []
    with _threads(base, grouping.names):
        _run_steps(base, vectors, grouping, tasks, settings, raw, optimizer, scheduler, history, progress, stage, watch)
    values = _clamped(raw.detach(), settings.clamp).cpu().clone()
    if history:
        logger.info("merge coefficients learned: loss %.4f -> %.4f", history[0]["loss"], history[-1]["loss"])
    return LearnedCoefficients(tuple(names), grouping, values, settings, history)


def _run_steps(base: Mapping[str, torch.Tensor], vectors: Sequence[Mapping[str, torch.Tensor]], grouping: Grouping,
               tasks: Sequence[TaskObjective], settings: LearnSettings, raw: torch.Tensor,
               optimizer: torch.optim.Optimizer, scheduler: Any, history: list[dict[str, Any]],
               progress: Progress | None, stage: str, watch: Callable[[int, torch.Tensor], None] | None = None) -> None:
    """The optimisation steps of :func:`learn_coefficients` (appends one history entry per step)."""
    logger.info("learning %d x %d merge coefficients (%s, %s) for %d steps on %d tasks",
                len(vectors), len(grouping), grouping.granularity, settings.objective, settings.steps, len(tasks))
    for step in range(settings.steps):
        params = merged_parameters(base, vectors, grouping, _clamped(raw, settings.clamp))
        per_task = {}
        total = torch.zeros((), dtype=torch.float32, device=raw.device)
        for task in tasks:
            inputs, labels = task.batch(step)
            loss = _task_loss(task, task.logits(params, inputs), labels, settings.objective)
            per_task[task.name] = float(loss.detach())
            total = total + loss
        if not torch.isfinite(total):
            raise InputError(f"merge coefficients: the loss became {float(total.detach())} at step {step + 1}; lower lr")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if settings.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([raw], settings.clip_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        history.append({"step": step + 1, "loss": float(total.detach()), "tasks": per_task})
        logger.debug("step %d/%d: loss %.6f %s", step + 1, settings.steps, history[-1]["loss"], per_task)
        if progress is not None:
            progress(stage, step + 1, settings.steps, f"loss {history[-1]['loss']:.4f}")
        if watch is not None:
            watch(step + 1, _clamped(raw.detach(), settings.clamp).cpu().clone())


def evaluate_loss(base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                  learned: LearnedCoefficients, tasks: Sequence[TaskObjective], objective: str | None = None) -> float:
    """The summed objective over every batch of every task, at the learned coefficients (no gradients)."""
    vectors = task_vectors(base, finetuned, learned.grouping.names)
    with torch.no_grad(), _threads(base, learned.grouping.names):
        params = merged_parameters(base, vectors, learned.grouping, learned.values)
        total = 0.0
        for task in tasks:
            losses = [float(_task_loss(task, task.logits(params, x), y, objective or learned.settings.objective))
                      for x, y in task.batches]
            total += sum(losses) / len(losses)
    return total


__all__ = [
    "ADAMERGING",
    "ATLAS",
    "GRANULARITIES",
    "Grouping",
    "LearnSettings",
    "LearnedCoefficients",
    "TaskObjective",
    "apply_coefficients",
    "evaluate_loss",
    "group_tensors",
    "learn_coefficients",
    "learnable_names",
    "merged_parameters",
    "module_forward",
    "module_objective",
    "softmax_entropy",
    "task_vectors",
]
