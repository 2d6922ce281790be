"""Per-layer features of a model, and models cut into stages so they can be split for stitching.

A :class:`Chain` is a model seen as an ordered list of stages. Representation ``r`` is the output of the
first ``r`` stages: ``r = 0`` is the input itself and ``r = num_layers`` the model output. Chains are
built for

* ``merge.zoo.MLP``: one stage per Linear (+ ReLU, except the last); layer ``i`` is hidden layer ``i``
  after its ReLU, the last layer is the logits;
* ``merge.zoo.ResNetSmall``: stem, the three residual stages, and a pooled linear head;
* ``nn.Sequential``: one stage per child (layers may also be named by the child's name);
* Hugging Face encoders (BERT-like, ``AutoModel``): layer ``i`` is ``hidden_states[i]`` (0 = embeddings),
  pooled over tokens (``mean`` over the attention mask, or ``cls``). Such a chain can be a stitch
  *source* at any layer; as a *target* it is read at layer j by a head trained on its pooled
  features. Running its remaining transformer blocks on translated token states is not offered: it
  depends on each family's internal masking code.

For any other module, :func:`capture_module_features` reads the outputs of chosen submodules with
forward hooks.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from suture.merge.data import CalibrationData, Inputs, encode_texts, inputs_to, iter_batches
from suture.merge.errors import InputError
from suture.merge.measure import Site, capture, eval_mode

logger = logging.getLogger(__name__)

__all__ = [
    "Chain",
    "HFEncoderPrefix",
    "capture_features",
    "capture_module_features",
    "chain_from_module",
    "chain_inputs",
    "flatten_features",
    "load_chain",
    "pool_hidden",
]

POOLINGS = ("mean", "cls")
# Padded token positions per encoder batch on a CPU: a small BERT reads reviews about twice as fast in
# batches of 16 x 128 tokens as in batches of 256 texts (attention scores of big batches leave the cache).
ENCODER_BATCH_TOKENS = 2048


# --------------------------------------------------------------------------------------------------
# stages for plain torch modules


class _MLPBlock(nn.Module):
    """One Linear of a zoo MLP, with the ReLU that follows it (the first block also flattens the input)."""

    def __init__(self, linear: nn.Linear, relu: bool, flatten: bool) -> None:
        super().__init__()
        self.linear = linear
        self.relu = relu
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flatten:
            x = x.flatten(1)
        x = self.linear(x)
        return torch.relu(x) if self.relu else x


class _ResNetStem(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        # Only the stem's own modules: holding the whole network would count its weights as the stem's.
        self.conv1, self.bn1 = net.conv1, net.bn1
        self.in_channels, self.image_size = net.in_channels, net.image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.in_channels, self.image_size, self.image_size)
        return torch.relu(self.bn1(self.conv1(x)))


class _ResNetHead(nn.Module):
    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


# --------------------------------------------------------------------------------------------------
# Hugging Face encoders


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor | None, pooling: str = "mean") -> torch.Tensor:
    """(batch, tokens, d) hidden states -> (batch, d): mask-weighted mean over tokens, or the first token."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise InputError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def _hf_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a BERT-like encoder."""
    enc = getattr(model, "encoder", None)
    layers = getattr(enc, "layer", None) if enc is not None else None
    if not isinstance(layers, nn.ModuleList):
        raise InputError(
            f"{type(model).__name__}: expected a BERT-like encoder with .encoder.layer (a ModuleList of blocks)"
        )
    return layers


class HFEncoderPrefix(nn.Module):
    """A Hugging Face encoder truncated after ``num_layers`` blocks, returning pooled hidden_states[num_layers]."""

    def __init__(self, model: nn.Module, num_layers: int, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise InputError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        layers = _hf_layers(model)
        if not 0 <= num_layers <= len(layers):
            raise InputError(f"layer {num_layers} is out of range for an encoder with {len(layers)} blocks (0..{len(layers)})")
        if num_layers < len(layers):
            # A shallow copy shares the kept blocks with the original; only the block list is replaced.
            model = copy.copy(model)
            model.encoder = copy.copy(model.encoder)
            model.encoder.layer = nn.ModuleList(list(layers)[:num_layers])
            model.config = copy.deepcopy(model.config)
            model.config.num_hidden_layers = num_layers
        self.model = model
        self.num_layers = num_layers
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return pool_hidden(out.last_hidden_state, attention_mask, self.pooling)


# --------------------------------------------------------------------------------------------------
# Chain


class Chain(nn.Module):
    """A model as ordered stages; representation r is the output of the first r stages (0 = input)."""

    def __init__(
        self,
        stages: Sequence[nn.Module] | None,
        names: Sequence[str] | None = None,
        *,
        kind: str = "torch",
        module: nn.Module | None = None,
        architecture: tuple[str, dict[str, Any]] | None = None,
        hf: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.stages = nn.ModuleList(stages or [])
        self.names = list(names) if names is not None else [str(i) for i in range(len(self.stages))]
        # The original module (weights are shared, not copied) and how to rebuild it from files.
        self._module = [module]  # a list keeps it out of this module's parameters and state_dict
        self.architecture = architecture
        self.hf = dict(hf) if hf is not None else None  # {"model": HF model, "tokenizer": ..., "pooling": ..., "path": ...}
        self.source: str | None = None

    # -- structure --------------------------------------------------------------------------------

    @property
    def module(self) -> nn.Module | None:
        """The wrapped model."""
        return self._module[0]

    @property
    def num_layers(self) -> int:
        """Index of the last representation (the output for torch chains, the last hidden state for encoders)."""
        if self.kind == "hf":
            return len(_hf_layers(self.hf["model"]))
        return len(self.stages)

    @property
    def default_layer(self) -> int:
        """The penultimate representation (what a classifier head reads) or an encoder's last layer."""
        return self.num_layers if self.kind == "hf" else max(self.num_layers - 1, 0)

    def resolve_layer(self, layer: int | str | None, what: str = "layer") -> int:
        """A layer reference as an index 0..num_layers: int, negative int, stage name (the representation after that stage), or None for the default."""
        n = self.num_layers
        if layer is None:
            return self.default_layer
        # A string names a stage first (nn.Sequential children are named "0", "1", ...); other digit strings are indices.
        if isinstance(layer, str) and layer in self.names:
            return self.names.index(layer) + 1
        if isinstance(layer, str) and not layer.lstrip("-").isdigit():
            raise InputError(f"{what}: no stage named {layer!r}; expected an index 0..{n} or one of {self.names}")
        idx = int(layer)
        if idx < 0:
            idx += n + 1
        if not 0 <= idx <= n:
            raise InputError(f"{what}: layer {layer} is out of range; this model has layers 0..{n} (negative counts from the end)")
        return idx

    # -- running ----------------------------------------------------------------------------------

    def run(self, x: Any, start: int = 0, stop: int | None = None) -> Any:
        """Apply stages start..stop-1 to x (a representation at index start)."""
        if self.kind == "hf":
            raise InputError("encoder chains run through prefix(); use features()")
        stop = len(self.stages) if stop is None else stop
        for stage in list(self.stages)[start:stop]:
            x = stage(x)
        return x

    def forward(self, x: Any) -> Any:
        return self.run(x)

    def prefix(self, layer: int) -> nn.Module:
        """A module mapping the raw input to representation ``layer`` (pooled for encoders)."""
        if self.kind == "hf":
            return HFEncoderPrefix(self.hf["model"], layer, self.hf.get("pooling", "mean"))
        return nn.Sequential(*list(self.stages)[:layer])

    def suffix(self, layer: int) -> nn.Module:
        """A module mapping representation ``layer`` to the output."""
        if self.kind == "hf":
            raise InputError(
                "a Hugging Face encoder can be a stitch target only through a head on its pooled features "
                "(use a head instead of the model's own layers)"
            )
        return nn.Sequential(*list(self.stages)[layer:])

    def prefix_state(self, layer: int) -> dict[str, torch.Tensor]:
        """Tensors of the stages before ``layer``, keyed by the original module's parameter names."""
        return _stage_state(self, range(layer))

    def suffix_state(self, layer: int) -> dict[str, torch.Tensor]:
        """Tensors of the stages from ``layer`` on, keyed by the original module's parameter names."""
        return _stage_state(self, range(layer, len(self.stages)))

    @torch.no_grad()
    def features(
        self,
        data: CalibrationData | Inputs,
        layers: Sequence[int] | int,
        *,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
        flatten: bool = False,
        tokens: bool = False,
        cache: bool = True,
    ) -> dict[int, torch.Tensor]:
        """Representations at the given layer indices for every item of ``data`` (on CPU); see capture_features."""
        return capture_features(self, data, layers, batch_size=batch_size, device=device, flatten=flatten, tokens=tokens, cache=cache)

    @property
    def has_head(self) -> bool:
        """Whether the chain ends in its own classifier (torch chains do; bare encoders do not)."""
        return self.kind != "hf"


def _stage_state(chain: Chain, idx: Iterable[int]) -> dict[str, torch.Tensor]:
    module = chain.module
    if module is None:
        raise InputError("this chain has no underlying module to read weights from")
    keep: set[int] = set()
    for i in idx:
        keep |= {id(t) for t in chain.stages[i].state_dict(keep_vars=True).values()}
    return {k: v.detach() for k, v in module.state_dict(keep_vars=True).items() if id(v) in keep}


def chain_from_module(module: nn.Module, *, architecture: tuple[str, dict[str, Any]] | None = None) -> Chain:
    """Cut a zoo MLP, zoo ResNetSmall or nn.Sequential into stages (weights are shared, not copied)."""
    from suture.merge.zoo import MLP, ResNetSmall

    if isinstance(module, MLP):
        n = len(module.layers)
        stages = [_MLPBlock(lin, relu=i < n - 1, flatten=i == 0) for i, lin in enumerate(module.layers)]
        names = [f"layers.{i}" for i in range(n)]
    elif isinstance(module, ResNetSmall):
        stages = [_ResNetStem(module), module.layer1, module.layer2, module.layer3, _ResNetHead(module.fc)]
        names = ["stem", "layer1", "layer2", "layer3", "fc"]
    elif isinstance(module, nn.Sequential):
        names = [name for name, _ in module.named_children()]
        stages = [child for _, child in module.named_children()]
    else:
        raise InputError(
            f"cannot cut a {type(module).__name__} into stages; expected merge.zoo.MLP, merge.zoo.ResNetSmall, "
            "an nn.Sequential or a Hugging Face encoder (capture_module_features reads any module's submodules)"
        )
    chain = Chain(stages, names, kind="torch", module=module, architecture=architecture)
    return chain


def _is_hf_folder(path: Path) -> bool:
    from suture.merge.errors import SutureError
    from suture.merge.store import read_json

    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = read_json(cfg)
    except SutureError:
        return False
    return "model_type" in data and "suture_architecture" not in data


def chain_from_hf(model: nn.Module, tokenizer: Any = None, pooling: str = "mean", path: str | None = None, max_length: int = 128) -> Chain:
    """Wrap a Hugging Face encoder (e.g. BertModel) and its tokenizer as a chain of pooled hidden states."""
    if pooling not in POOLINGS:
        raise InputError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    _hf_layers(model)
    return Chain(
        None,
        kind="hf",
        module=model,
        hf={"model": model.eval(), "tokenizer": tokenizer, "pooling": pooling, "path": path, "max_length": int(max_length)},
    )


def load_chain(ref: str | Path, *, pooling: str = "mean", max_length: int = 128, trust_remote_code: bool = False) -> Chain:
    """A chain for a model reference: a zoo folder (config.json with suture_architecture) or an HF encoder folder.

    Code named by the model's files (a factory outside Suture's zoo, HF remote code) runs only with `trust_remote_code`.
    """
    from suture.merge.refs import resolve_ref

    path = Path(resolve_ref(str(ref)))
    if _is_hf_folder(path):
        from transformers import AutoModel, AutoTokenizer

        try:
            model = AutoModel.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise InputError(f"model {ref!r}: could not load a Hugging Face encoder from {path} ({exc})") from exc
        chain = chain_from_hf(model, tokenizer, pooling=pooling, path=str(path), max_length=max_length)
    else:
        from suture.merge.zoo import load_module, read_architecture

        chain = chain_from_module(load_module(path, trust_remote_code=trust_remote_code), architecture=read_architecture(path))
    chain.source = str(ref)
    logger.info("loaded %s chain for %s (%d layers)", chain.kind, ref, chain.num_layers)
    return chain


# --------------------------------------------------------------------------------------------------
# capture


def chain_inputs(chain: Chain, data: CalibrationData | Inputs) -> Inputs:
    """The inputs this chain reads: text items are (re-)tokenized with an encoder's own tokenizer."""
    if not isinstance(data, CalibrationData):
        return data
    if chain.kind == "hf":
        texts = data.meta.get("texts")
        tok = chain.hf.get("tokenizer")
        if texts is not None and tok is not None:
            return encode_texts(tok, list(texts), max_length=chain.hf.get("max_length", 128))
        if not isinstance(data.inputs, Mapping):
            raise InputError(f"data {data.name!r}: an encoder needs token inputs (input_ids) or texts")
    return data.inputs


def flatten_features(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) -> (n, features)."""
    return x.reshape(x.shape[0], -1)


def _batches(inputs: Inputs, batch_size: int) -> Iterable[Inputs]:
    yield from (b for b, _ in iter_batches(CalibrationData(inputs), batch_size))


@torch.no_grad()
def capture_features(
    chain: Chain,
    data: CalibrationData | Inputs,
    layers: Sequence[int] | int,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    flatten: bool = False,
    tokens: bool = False,
    progress: Callable[[int], None] | None = None,
    cache: bool = True,
) -> dict[int, torch.Tensor]:
    """Representations of a chain at several layers in one pass per batch (CPU tensors, float32).

    ``tokens=True`` (encoders only) returns every attended token's hidden state, (total tokens, d),
    instead of one pooled vector per item: parallel anchors for translating between encoders that share
    a tokenizer, many more of them than there are texts.

    Encoders loaded from a folder read texts in batches of similar length, each padded only to its own
    longest text, and keep what they computed in the feature cache (:mod:`stitch.feature_cache`; pooled
    features of every layer at once, so another cut or a similarity matrix needs no new pass);
    ``cache=False`` neither reads nor writes it.
    """
    if tokens and chain.kind != "hf":
        raise InputError("tokens=True applies to Hugging Face encoder chains only")
    single = isinstance(layers, int)
    wanted = sorted({chain.resolve_layer(layer) for layer in ([layers] if single else layers)})
    key = ident = None
    if cache and chain.kind == "hf" and chain.hf.get("path"):
        from suture.stitch.feature_cache import feature_key, load_features

        key, ident = feature_key(chain.hf["path"], data, pooling=chain.hf.get("pooling", "mean"),
                                 max_length=chain.hf.get("max_length", 128), tokens=tokens, layers=wanted if tokens else None)
        hit = load_features(key, wanted)
        if hit is not None:
            if progress:
                progress(len(data if isinstance(data, CalibrationData) else CalibrationData(data)))
            return {i: flatten_features(v) for i, v in hit.items()} if flatten else hit
        if not tokens:
            wanted = list(range(chain.num_layers + 1))
    inputs = chain_inputs(chain, data)
    out: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    chain.eval()
    dev = torch.device(device)
    # The model goes to `device` for the pass and back where it was afterwards, so callers keep
    # working with CPU features and CPU modules.
    owner = chain.hf["model"] if chain.kind == "hf" else chain
    home = next((p.device for p in owner.parameters()), torch.device("cpu"))
    try:
        _capture(chain, inputs, wanted, out, dev, batch_size, tokens, progress)
    finally:
        owner.to(home)
    feats = {i: torch.cat(v) for i, v in out.items()}
    if key is not None:
        from suture.stitch.feature_cache import save_features

        save_features(key, feats, ident)
        feats = {i: feats[i] for i in sorted({chain.resolve_layer(layer) for layer in ([layers] if single else layers)})}
    if flatten:
        feats = {i: flatten_features(v) for i, v in feats.items()}
    logger.info("captured layers %s on %d items", wanted, next(iter(feats.values())).shape[0] if feats else 0)
    return feats


def _capture(
    chain: Chain,
    inputs: Inputs,
    wanted: list[int],
    out: dict[int, list[torch.Tensor]],
    dev: torch.device,
    batch_size: int,
    tokens: bool,
    progress: Callable[[int], None] | None,
) -> None:
    done = 0
    if chain.kind == "hf":
        model = chain.hf["model"].to(dev).eval()
        pooling = chain.hf.get("pooling", "mean")
        order, widths = _length_order(inputs)
        n = int(order.numel())
        pooled: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
        per_item: dict[int, list[torch.Tensor | None]] = {i: [None] * n for i in wanted}
        for idx in _token_batches(order, widths, batch_size, ENCODER_BATCH_TOKENS if dev.type == "cpu" else None):
            batch = inputs_to(_trimmed(inputs, idx, int(widths[idx].max())), dev)
            res = model(**batch, output_hidden_states=True)
            mask = batch.get("attention_mask")
            for i in wanted:
                h = res.hidden_states[i]
                if tokens:
                    for r, k in enumerate(idx.tolist()):
                        per_item[i][k] = (h[r] if mask is None else h[r][mask[r].bool()]).float().cpu()
                else:
                    pooled[i].append(pool_hidden(h, mask, pooling).float().cpu())
            done += int(idx.numel())
            if progress:
                progress(done)
        # Back to the caller's item order.
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n)
        for i in wanted:
            out[i].append(torch.cat(per_item[i]) if tokens else torch.cat(pooled[i])[inverse])
    else:
        chain.to(dev)
        for batch in _batches(inputs, batch_size):
            x = inputs_to(batch, dev)
            if 0 in out:
                out[0].append(x.float().cpu())
            for r, stage in enumerate(chain.stages, start=1):
                if r > wanted[-1]:
                    break
                x = stage(x)
                if r in out:
                    out[r].append(x.float().cpu())
            done += int(x.shape[0])
            if progress:
                progress(done)


def _length_order(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Items longest first, and how many leading positions each needs (all, unless right-padded by a mask).

    Batches of similar length padded to their own longest item waste far less work than one width for
    all (reviews average ~76 word pieces against a limit of 128).
    """
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
        raise InputError("an encoder needs token inputs (a mapping with input_ids)")
    ids = inputs["input_ids"]
    n, full = int(ids.shape[0]), int(ids.shape[1])
    mask = inputs.get("attention_mask")
    if mask is None:
        return torch.arange(n), torch.full((n,), full)
    lengths = mask.long().sum(dim=1)
    right_padded = bool((mask.bool() == (torch.arange(full).unsqueeze(0) < lengths.unsqueeze(1))).all())
    widths = lengths.clamp_min(1) if right_padded else torch.full((n,), full)
    return torch.argsort(widths, descending=True, stable=True), widths


def _token_batches(order: torch.Tensor, widths: torch.Tensor, batch_size: int, max_tokens: int | None) -> Iterable[torch.Tensor]:
    """Consecutive runs of ``order`` of at most batch_size items and (if given) max_tokens padded positions."""
    start, n = 0, int(order.numel())
    while start < n:
        width = max(int(widths[order[start]]), 1)  # the longest item of the run comes first
        size = batch_size if max_tokens is None else max(1, min(batch_size, max_tokens // width))
        yield order[start : start + size]
        start += size


def _trimmed(inputs: Mapping[str, torch.Tensor], idx: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
    """Rows idx of every input, per-token tensors cut to the first ``width`` positions."""
    full = int(inputs["input_ids"].shape[1])
    return {k: (v[idx, :width] if v.dim() >= 2 and v.shape[1] == full else v[idx]) for k, v in inputs.items()}


@torch.no_grad()
def capture_module_features(
    module: nn.Module,
    data: CalibrationData | Inputs,
    submodules: Sequence[str],
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    flatten: bool = True,
) -> dict[str, torch.Tensor]:
    """Outputs of named submodules of any module, read with forward hooks (tuple outputs: first item)."""
    from suture.merge.evaluate import run_module

    inputs = data.inputs if isinstance(data, CalibrationData) else data
    found = dict(module.named_modules())
    missing = [s for s in submodules if s not in found]
    if missing:
        sample = [n for n in found if n][:12]
        raise InputError(f"no submodule named {missing}; the model has e.g. {sample}")

    def shape(t: torch.Tensor) -> torch.Tensor:
        t = t.float().cpu()
        return flatten_features(t) if flatten else t

    sites = {s: Site(s, "output", shape, f"submodule {s!r}") for s in submodules}
    module.to(device)
    with eval_mode(module), capture(module, sites, keep="all", unwrap=True) as store:
        for batch in _batches(inputs, batch_size):
            run_module(module, inputs_to(batch, device))
    silent = [s for s in submodules if s not in store]
    if silent:
        raise InputError(f"submodule(s) {silent} did not run on the data")
    return {s: torch.cat(store[s]) for s in submodules}
