"""Multi-head models: one shared trunk and one branch per source model (the result of partial zipping).

Every member is a full module of its source architecture. Trunk tensors are the same tensor objects in
every member; the remaining tensors are the member's own branch. ``forward`` runs the traced graph once:
a node runs once on shared values while it reads only trunk tensors and shared inputs, and once per member
from the first node that touches a branch tensor on. The members' outputs are concatenated along the last
axis (per-task logits side by side) or averaged.

On disk a multi-head model is a folder: ``model.safetensors`` holding ``trunk.<tensor>`` once and
``branch<i>.<tensor>`` per member, ``multihead.json`` (the manifest: format, heads mode, trunk tensor
names, and per member its architecture ``{"factory", "kwargs"}`` and branch tensor names), and a
``config.json`` that points at the manifest.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from suture.merge.errors import InputError
from suture.merge.evaluate import model_logits
from suture.merge.store import read_json

logger = logging.getLogger(__name__)

MANIFEST_FILE = "multihead.json"
FORMAT = "suture-multihead"
VERSION = 1


class MultiHeadModel(nn.Module):
    """Shared trunk + per-model branches; forward returns the members' outputs concatenated (or averaged)."""

    def __init__(self, members: Sequence[nn.Module], trunk: Sequence[str], heads: str = "concat") -> None:
        super().__init__()
        if len(members) < 1:
            raise InputError("a multi-head model needs at least one member")
        if heads not in ("concat", "average"):
            raise InputError(f"heads {heads!r}: expected 'concat' or 'average'")
        self.members = nn.ModuleList(members)
        self.heads = heads
        names = set(members[0].state_dict())
        unknown = sorted(set(trunk) - names)
        if unknown:
            raise InputError(f"trunk names tensors the model does not have: {unknown[:5]}")
        self.trunk_names = sorted(set(trunk))
        self._share_trunk()
        self._plan: tuple[torch.fx.Graph, set[str]] | None = None
        self._traceable = True

    def _share_trunk(self) -> None:
        """Make every member hold member 0's trunk tensor objects (one copy in memory, one BN statistic)."""
        first = self.members[0]
        for name in self.trunk_names:
            source = _tensor_slot(first, name)
            for member in list(self.members)[1:]:
                _set_tensor(member, name, source)

    def branch_names(self, index: int) -> list[str]:
        """The tensor names member `index` keeps for itself."""
        trunk = set(self.trunk_names)
        return [k for k in self.members[index].state_dict() if k not in trunk]

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        outputs = self._run(args, kwargs)
        logits = [model_logits(o) for o in outputs]
        if self.heads == "average":
            return torch.stack(logits).mean(0)
        return torch.cat(logits, dim=-1)

    def member_outputs(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        """Each member's output (logits) separately."""
        return [model_logits(o) for o in self._run(args, kwargs)]

    # ------------------------------------------------------------------------------ execution
    def _run(self, args: tuple, kwargs: dict) -> list[Any]:
        plan = self._get_plan()
        if plan is None:
            return [member(*args, **kwargs) for member in self.members]
        graph, branch_nodes = plan
        k = len(self.members)
        shared: dict[torch.fx.Node, Any] = {}
        per: dict[torch.fx.Node, list[Any]] = {}
        positional = list(args)
        for node in graph.nodes:
            if node.op == "placeholder":
                if positional:
                    shared[node] = positional.pop(0)
                elif node.target in kwargs:
                    shared[node] = kwargs[node.target]
                elif node.args:
                    shared[node] = node.args[0]
                else:
                    raise InputError(f"multi-head model: missing input {node.target!r}")
                continue
            if node.op == "output":
                out = node.args[0]
                return [torch.fx.node.map_arg(out, functools.partial(self._value, shared, per, m)) for m in range(k)]
            if node.name in branch_nodes or any(n in per for n in node.all_input_nodes):
                per[node] = [self._exec(node, m, shared, per) for m in range(k)]
            else:
                shared[node] = self._exec(node, 0, shared, per)
        raise InputError("traced graph has no output")

    @staticmethod
    def _value(shared: dict, per: dict, m: int, node: torch.fx.Node) -> Any:
        return per[node][m] if node in per else shared[node]

    def _exec(self, node: torch.fx.Node, m: int, shared: dict, per: dict) -> Any:
        look = functools.partial(self._value, shared, per, m)
        args = torch.fx.node.map_arg(node.args, look)
        kwargs = torch.fx.node.map_arg(node.kwargs, look)
        member = self.members[m]
        if node.op == "call_module":
            return member.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            return functools.reduce(getattr, node.target.split("."), member)
        raise InputError(f"multi-head model: unsupported graph node {node.op} ({node.name})")

    def _get_plan(self) -> tuple[torch.fx.Graph, set[str]] | None:
        if self._plan is not None or not self._traceable:
            return self._plan
        try:
            gm = torch.fx.symbolic_trace(self.members[0])
        except Exception as exc:  # fx raises many types; running each member whole is always correct
            logger.info("multi-head model: tracing failed (%s); running each member in full", exc)
            self._traceable = False
            return None
        trunk = set(self.trunk_names)
        branch_nodes: set[str] = set()
        for node in gm.graph.nodes:
            if node.op in ("call_module", "get_attr"):
                prefix = f"{node.target}."
                names = [n for n in self.members[0].state_dict() if n == node.target or n.startswith(prefix)]
                if any(n not in trunk for n in names):
                    branch_nodes.add(node.name)
        self._plan = (gm.graph, branch_nodes)
        return self._plan


def _tensor_slot(module: nn.Module, name: str) -> torch.Tensor:
    prefix, _, leaf = name.rpartition(".")
    sub = module.get_submodule(prefix) if prefix else module
    if leaf in sub._parameters:
        return sub._parameters[leaf]
    if leaf in sub._buffers:
        return sub._buffers[leaf]
    raise InputError(f"{name!r} is neither a parameter nor a buffer")


def _set_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    prefix, _, leaf = name.rpartition(".")
    sub = module.get_submodule(prefix) if prefix else module
    if leaf in sub._parameters:
        sub._parameters[leaf] = tensor
    elif leaf in sub._buffers:
        sub._buffers[leaf] = tensor
    else:
        raise InputError(f"{name!r} is neither a parameter nor a buffer")


# ----------------------------------------------------------------------------------------- disk
def multihead_tensors(model: MultiHeadModel) -> dict[str, torch.Tensor]:
    """The deduplicated tensors of a multi-head model: ``trunk.<name>`` once, ``branch<i>.<name>`` per member."""
    out: dict[str, torch.Tensor] = {}
    first = model.members[0].state_dict()
    for name in model.trunk_names:
        out[f"trunk.{name}"] = first[name].detach().cpu().contiguous().clone()
    for i, member in enumerate(model.members):
        state = member.state_dict()
        for name in model.branch_names(i):
            out[f"branch{i}.{name}"] = state[name].detach().cpu().contiguous().clone()
    return out


def save_multihead(
    model: MultiHeadModel,
    out_dir: str | Path,
    architectures: Sequence[Mapping[str, Any]],
    *,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a multi-head model folder: model.safetensors, multihead.json (manifest) and config.json."""
    from suture.merge.writer import save_tensors

    if not isinstance(model, MultiHeadModel):
        raise InputError(f"save_multihead expects a MultiHeadModel, got {type(model).__name__}")
    if len(architectures) != len(model.members):
        raise InputError(f"{len(model.members)} members but {len(architectures)} architectures were given")
    members = []
    for i, arch in enumerate(architectures):
        if not isinstance(arch, Mapping) or not isinstance(arch.get("factory"), str):
            raise InputError(f"architecture of member {i}: expected {{'factory': 'pkg.module:factory', 'kwargs': {{...}}}}, got {arch!r}")
        members.append({"architecture": {"factory": arch["factory"], "kwargs": dict(arch.get("kwargs") or {})}, "branch": model.branch_names(i)})
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "heads": model.heads,
        "trunk": list(model.trunk_names),
        "members": members,
        "weights_prefix": {"trunk": "trunk.", "branch": "branch{index}."},
        **({"info": dict(extra)} if extra else {}),
    }
    config = {"suture_multihead": {"manifest": MANIFEST_FILE, "members": len(members), "heads": model.heads}}
    files = {MANIFEST_FILE: json.dumps(manifest, indent=2, default=str) + "\n", "config.json": json.dumps(config, indent=2) + "\n"}
    return save_tensors(multihead_tensors(model), out_dir, overwrite=overwrite, extra_files=files)


def is_multihead(path: str | Path) -> bool:
    """True when `path` is a folder written by :func:`save_multihead`."""
    return (Path(path) / MANIFEST_FILE).is_file()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a multi-head folder, checked for format and version."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise InputError(f"{str(path)!r}: no {MANIFEST_FILE}; expected a folder written by save_multihead")
    manifest = read_json(file)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise InputError(f"{str(file)!r}: format {manifest.get('format')!r} v{manifest.get('version')}; expected {FORMAT!r} v{VERSION}")
    if not isinstance(manifest.get("members"), list) or not manifest["members"]:
        raise InputError(f"{str(file)!r}: 'members' must be a non-empty list")
    return manifest


def load_multihead(path: str | Path, device: str | torch.device = "cpu", *, trust_remote_code: bool = False) -> MultiHeadModel:
    """Rebuild a runnable MultiHeadModel (eval mode) from a folder written by save_multihead.

    Member factories outside Suture's zoo are built only with `trust_remote_code` (they import code).
    """
    from suture.merge.zoo import build_architecture, check_factory_trust, load_into, load_state

    manifest = read_manifest(path)
    tensors = load_state(path)
    trunk = list(manifest.get("trunk") or [])
    members = []
    for i, entry in enumerate(manifest["members"]):
        arch = entry.get("architecture") or {}
        check_factory_trust(arch.get("factory"), source=f"{Path(path) / MANIFEST_FILE} member {i}", trust_remote_code=trust_remote_code)
        module = build_architecture(arch.get("factory"), **(arch.get("kwargs") or {}))
        state: dict[str, torch.Tensor] = {}
        for name in trunk:
            key = f"trunk.{name}"
            if key not in tensors:
                raise InputError(f"{str(path)!r}: manifest lists trunk tensor {name!r} but the weights have no {key!r}")
            state[name] = tensors[key]
        for name in entry.get("branch") or []:
            key = f"branch{i}.{name}"
            if key not in tensors:
                raise InputError(f"{str(path)!r}: manifest lists branch tensor {name!r} of member {i} but the weights have no {key!r}")
            state[name] = tensors[key]
        load_into(module, state, source=f"{path} member {i}")
        members.append(module)
    model = MultiHeadModel(members, trunk, heads=manifest.get("heads", "concat"))
    return model.to(device).eval()
