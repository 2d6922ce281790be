"""Executing merge plans: stream each tensor task through its merge method into the writer.

A plan is a list of :class:`TensorTask` objects, built by the recipe runner (or by Python code directly).
Execution streams: for each task it reads the source tensors from their lazy stores onto the chosen device,
runs the merge method, converts to the output dtype and hands the result to the streaming writer, so peak
memory stays around one tensor per input model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from suture.merge.errors import InputError
from suture.merge.store import TensorStore
from suture.merge.writer import ShardedWriter, TensorEntry

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str], None]
RowRemap = Callable[[torch.Tensor], torch.Tensor]
#: per-model statistics of data-driven methods: model key -> tensor name -> statistics dict (merge.calibrate)
ModelStats = Mapping[str, Mapping[str, dict[str, Any]]]


@dataclass(frozen=True)
class SourceRef:
    """One input tensor: the model key (in the stores mapping) and the tensor name in that model."""

    model: str
    tensor: str


@dataclass
class TensorTask:
    """How to produce one output tensor."""

    out_name: str
    method: str
    sources: list[SourceRef]
    model_params: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    base: SourceRef | None = None
    out_shape: tuple[int, ...] | None = None
    out_dtype: torch.dtype | None = None
    # per-model row remaps (tokenizer vocabulary changes), keyed by model
    remaps: dict[str, RowRemap] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary for `--dry-run` and reports."""
        return {
            "tensor": self.out_name,
            "method": self.method,
            "sources": [f"{s.model}:{s.tensor}" for s in self.sources],
            "base": f"{self.base.model}:{self.base.tensor}" if self.base else None,
            "model_params": self.model_params,
            "params": self.params,
            "shape": list(self.out_shape) if self.out_shape else None,
            "dtype": str(self.out_dtype).removeprefix("torch.") if self.out_dtype else None,
        }


@dataclass
class ExecutionStats:
    """Timings and sizes of one plan execution (goes into report.json)."""

    tensors: int = 0
    bytes_written: int = 0
    seconds_reading: float = 0.0
    seconds_merging: float = 0.0
    seconds_writing: float = 0.0
    device: str = "cpu"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' -> cuda when available, else cpu; refuse cuda when it is not there."""
    name = str(device or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but torch sees no CUDA GPU (use --device cpu or auto)")
    return dev


def _read(stores: Mapping[str, TensorStore], ref: SourceRef, device: torch.device, compute_dtype: torch.dtype | None, remap: RowRemap | None) -> torch.Tensor:
    try:
        store = stores[ref.model]
    except KeyError:
        raise InputError(f"plan refers to model {ref.model!r}, which was not loaded") from None
    if remap is not None:
        tensor = remap(store.get(ref.tensor)).to(device)  # remaps gather rows on the CPU, where they load donors
    else:
        tensor = store.get(ref.tensor, device)
    if compute_dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(compute_dtype)
    return tensor


def infer_output(task: TensorTask, stores: Mapping[str, TensorStore], out_dtype: torch.dtype | None) -> TensorEntry:
    """Output shape/dtype of a task without computing it (merges keep the first source's shape)."""
    first = task.sources[0] if task.sources else task.base
    if first is None:
        raise InputError(f"output tensor {task.out_name!r} has no sources")
    info = stores[first.model].info(first.tensor)
    shape = task.out_shape or info.shape
    dtype = task.out_dtype or out_dtype or info.dtype
    if not info.dtype.is_floating_point:
        dtype = info.dtype  # integer buffers (e.g. position ids) are copied, never cast
    return TensorEntry(task.out_name, tuple(shape), dtype)


def execute_plan(
    tasks: Sequence[TensorTask],
    stores: Mapping[str, TensorStore],
    writer: ShardedWriter,
    *,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype | None = None,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    stats: ModelStats | None = None,
) -> ExecutionStats:
    """Run every task in order, streaming results into `writer`.

    ``stats`` (data-driven methods): each source's statistics, looked up by its model key and tensor name,
    reach the kernel as ``MergeInputs.stats`` (None for a tensor that model has none for).
    """
    from suture.merge.methods import MergeInputs, get_method, run_method

    dev = resolve_device(device)
    timing = ExecutionStats(device=str(dev))
    entries = {e.name: e for s in writer.shards for e in s.entries}
    generator = torch.Generator(device=dev).manual_seed(seed)
    for i, task in enumerate(tasks):
        t0 = time.perf_counter()
        tensors = [_read(stores, s, dev, compute_dtype, task.remaps.get(s.model)) for s in task.sources]
        base = _read(stores, task.base, dev, compute_dtype, task.remaps.get(task.base.model)) if task.base else None
        t1 = time.perf_counter()
        method = get_method(task.method)
        if not (tensors or base is not None):
            raise InputError(f"output tensor {task.out_name!r} has no inputs")
        sample = tensors[0] if tensors else base
        assert sample is not None
        if not sample.is_floating_point():
            result = sample  # integer/bool buffers are not averaged: take the first model's
        else:
            inputs = MergeInputs(
                name=task.out_name,
                tensors=tensors,
                model_params=task.model_params,
                params=task.params,
                base=base,
                generator=generator,
                stats=None if stats is None else [stats.get(src.model, {}).get(src.tensor) for src in task.sources],
            )
            result = run_method(method, inputs)
            del inputs
        tensors = base = sample = None  # release the inputs before writing: peak memory is the merge step's
        entry = entries[task.out_name]
        if tuple(result.shape) != entry.shape:
            raise InputError(f"tensor {task.out_name!r}: method {task.method} produced shape {list(result.shape)}, expected {list(entry.shape)}")
        result = result.to(entry.dtype)
        t2 = time.perf_counter()
        writer.write(task.out_name, result)
        t3 = time.perf_counter()
        timing.seconds_reading += t1 - t0
        timing.seconds_merging += t2 - t1
        timing.seconds_writing += t3 - t2
        timing.tensors += 1
        if progress is not None:
            progress(i + 1, len(tasks), task.out_name)
        del result
    timing.bytes_written = writer.bytes_written
    return timing


class _MemorySink:
    """Stands in for ShardedWriter: keeps each output tensor in a dict (searches evaluate merges without writing)."""

    def __init__(self, entries: Sequence[TensorEntry]) -> None:
        self.shards = [type("_Shard", (), {"entries": list(entries)})()]
        self.tensors: dict[str, torch.Tensor] = {}
        self.bytes_written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor.detach().cpu()
        self.bytes_written += tensor.numel() * tensor.element_size()


def execute_in_memory(
    tasks: Sequence[TensorTask],
    stores: Mapping[str, TensorStore],
    out_dtype: torch.dtype | None,
    *,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype | None = None,
    seed: int = 0,
    stats: ModelStats | None = None,
) -> dict[str, torch.Tensor]:
    """The merged state dict, computed exactly as :func:`execute_plan` computes it for the writer (same casts, same seed).

    Peak memory is the output model plus one tensor per input model: inputs stay in their lazy stores.
    """
    sink = _MemorySink([infer_output(t, stores, out_dtype) for t in tasks])
    execute_plan(tasks, stores, sink, device=device, compute_dtype=compute_dtype, seed=seed, stats=stats)  # type: ignore[arg-type]
    return sink.tensors
