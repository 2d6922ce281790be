"""`suture inspect`: describe a model (tensors, parameter count, size, family, permutation groups) without loading weights."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

logger = logging.getLogger(__name__)


def detect_family(names: list[str], config: dict | None) -> str | None:
    """The model family from config.json or tensor names (None when unknown)."""
    from suture.merge.graph.families import detect_family as detect

    return detect(names, config)


def inspect_model(ref: str, *, allow_pickle: bool = False, groups: bool = False, input_shape: list[int] | None = None,
                  trust_remote_code: bool = False) -> dict[str, Any]:
    """A JSON-friendly description of a model reference (local path or Hub id).

    Groups of a model whose config.json names an architecture outside Suture's zoo are derived only with
    `trust_remote_code` (tracing builds the module, which runs its code); otherwise UntrustedCodeError.
    """
    from suture.merge.refs import resolve_ref
    from suture.merge.store import open_store

    path = resolve_ref(ref, allow_pickle=allow_pickle)
    store = open_store(path, allow_pickle=allow_pickle)
    names = store.names()
    dtypes = Counter(str(store.dtype(n)).removeprefix("torch.") for n in names)
    info: dict[str, Any] = {
        "model": ref,
        "path": str(path),
        "tensors": [{"name": n, "shape": list(store.shape(n)), "dtype": str(store.dtype(n)).removeprefix("torch.")} for n in names],
        "tensor_count": len(names),
        "parameters": sum(store.info(n).numel for n in names),
        "bytes": store.total_bytes(),
        "dtypes": dict(dtypes),
        "family": detect_family(names, store.config),
    }
    if groups:
        info["groups"] = derive_groups(store, input_shape, trust_remote_code=trust_remote_code)
    return info


def derive_groups(store, input_shape: list[int] | None = None, *, trust_remote_code: bool = False) -> list[dict[str, Any]] | dict[str, str]:
    """Permutation groups derived from names + config, or traced (on zeros of `input_shape`) for runnable models."""
    from suture.merge.derive import spec_for_store
    from suture.merge.errors import SutureError, UntrustedCodeError

    try:
        spec = spec_for_store(store, input_shape, trust_remote_code=trust_remote_code)
    except UntrustedCodeError:
        raise  # a refusal, not a missing feature: the command fails with the opt-in to use
    except SutureError as exc:
        flag = {("input_shape",): " (give it with --input-shape, e.g. 1,3,32,32)"}.get(exc.field, "")
        return {"error": f"{exc}{flag}"}
    return spec.describe()


def format_inspection(info: dict[str, Any]) -> str:
    """Human-readable text for `suture inspect`."""
    lines = [
        f"model:      {info['model']}",
        f"path:       {info['path']}",
        f"family:     {info['family'] or 'unknown'}",
        f"tensors:    {info['tensor_count']}",
        f"parameters: {info['parameters']:,}",
        f"size:       {info['bytes'] / 1e6:,.1f} MB ({', '.join(f'{k}: {v}' for k, v in info['dtypes'].items())})",
        "",
    ]
    width = max((len(t["name"]) for t in info["tensors"]), default=10)
    for t in info["tensors"]:
        lines.append(f"  {t['name']:<{width}}  {str(tuple(t['shape'])):<20} {t['dtype']}")
    groups = info.get("groups")
    if isinstance(groups, dict):
        lines += ["", f"permutation groups: {groups['error']}"]
    elif groups is not None:
        lines += ["", f"permutation groups ({len(groups)}):"]
        for g in groups:
            frozen = f"  FROZEN: {g['frozen']}" if g["frozen"] else ""
            lines.append(f"  {g['group']}  size {g['size']} ({g['kind']}), {len(g['members'])} members{frozen}")
            for m in g["members"]:
                lines.append(f"      {m}")
    return "\n".join(lines)
