"""The stitched model: A's prefix, a stitch, and B's suffix (or a head), as one runnable, saveable module.

On disk a stitched model is a folder with

* ``model.safetensors``: every tensor, prefixed ``source.`` (A up to layer i), ``stitch.`` (the stitch's
  fitted state) and ``target.`` (B from layer j on, or a linear head);
* ``stitch.json``: the manifest saying how to rebuild and run it: for each part its kind
  (``torch``: a ``merge.zoo`` factory + kwargs and the cut layer; ``hf``: a Hugging Face config truncated
  to the cut layer and the pooling; ``head``: a linear classifier), the stitch class and its
  configuration, and free-form ``info`` (method, models, anchors, measured accuracies);
* ``tokenizer/`` when the source is a Hugging Face encoder.

:func:`load_stitched` rebuilds a :class:`StitchedModel` from these files alone. Stitch kinds:
``translator`` (any :mod:`stitch.translate` estimator, applied per pixel on feature maps), ``relative``
(A's relative projector; the target is then a head trained on B's relative space), ``linear``
(:class:`stitch.learned.LinearStitch`) and ``identity`` (naive absolute stitching).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from suture.merge.data import CalibrationData, Inputs, inputs_to, iter_batches
from suture.merge.errors import InputError
from suture.merge.store import read_json
from suture.stitch.features import Chain, HFEncoderPrefix, chain_from_module
from suture.stitch.heads import LinearHead
from suture.stitch.learned import LinearStitch, pixel_rows
from suture.stitch.relative import RelativeProjector
from suture.stitch.translate import TRANSLATORS, Translator

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "MANIFEST_FILE",
    "IdentityStitch",
    "RelativeStitch",
    "StitchedModel",
    "TranslatorStitch",
    "classification_scores",
    "evaluate_stitched",
    "load_stitched",
    "make_stitched",
    "predict",
]

FORMAT = "suture.stitched"
VERSION = 1
MANIFEST_FILE = "stitch.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


# --------------------------------------------------------------------------------------------------
# stitch modules


class TranslatorStitch(nn.Module):
    """A fitted latent translator as a module; (n, C, H, W) maps are translated pixel by pixel."""

    def __init__(self, translator: Translator) -> None:
        super().__init__()
        if not translator.is_fitted:
            raise InputError(f"{type(translator).__name__} is not fitted")
        self.translator = translator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            n, _, h, w = x.shape
            y = self.translator.transform(pixel_rows(x))
            return y.reshape(n, h, w, -1).permute(0, 3, 1, 2).contiguous()
        return self.translator.transform(x)


class RelativeStitch(nn.Module):
    """A's relative projector: latents -> similarities to A's anchors (feature maps are flattened)."""

    def __init__(self, projector: RelativeProjector) -> None:
        super().__init__()
        if not projector.is_fitted:
            raise InputError("RelativeProjector is not fitted")
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector.transform(x.reshape(x.shape[0], -1))


class IdentityStitch(nn.Module):
    """Naive absolute stitching: A's latents fed to B unchanged (widths must match)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _stitch_state(stitch: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if isinstance(stitch, TranslatorStitch):
        t = stitch.translator
        return {"kind": "translator", "class": type(t).__name__, "config": t.get_config()}, t.state_dict()
    if isinstance(stitch, RelativeStitch):
        p = stitch.projector
        return {"kind": "relative", "class": "RelativeProjector", "config": p.get_config()}, p.state_dict()
    if isinstance(stitch, LinearStitch):
        return {"kind": "linear", "class": "LinearStitch", "config": stitch.get_config()}, dict(stitch.state_dict())
    if isinstance(stitch, IdentityStitch):
        return {"kind": "identity", "class": "IdentityStitch", "config": {}}, {}
    raise InputError(f"cannot save a stitch of type {type(stitch).__name__}")


def _stitch_from_state(meta: Mapping[str, Any], tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
    kind, config = meta.get("kind"), dict(meta.get("config") or {})
    try:
        if kind == "translator":
            cls = TRANSLATORS.get(str(meta.get("class")))
            if cls is None:
                raise InputError(f"{where}: unknown translator class {meta.get('class')!r}; expected one of {sorted(TRANSLATORS)}")
            return TranslatorStitch(cls(**config).load_state_dict(tensors))
        if kind == "relative":
            return RelativeStitch(RelativeProjector(**config).load_state_dict(tensors))
        if kind == "linear":
            mod = LinearStitch(**config)
            mod.load_state_dict(tensors)
            return mod
        if kind == "identity":
            return IdentityStitch()
    except TypeError as exc:
        raise InputError(f"{where}: stitch configuration {config} does not fit {meta.get('class')} ({exc})") from exc
    raise InputError(f"{where}: unknown stitch kind {kind!r}; expected translator, relative, linear or identity")


# --------------------------------------------------------------------------------------------------
# the stitched model


class StitchedModel(nn.Module):
    """source (A up to layer i) -> stitch -> target (B from layer j, or a head); call it like the source model."""

    def __init__(self, source: nn.Module, stitch: nn.Module, target: nn.Module, manifest: Mapping[str, Any]) -> None:
        super().__init__()
        self.source = source
        self.stitch = stitch
        self.target = target
        self.manifest = dict(manifest)
        self.tokenizer: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        z = self.source(*args, **kwargs)
        return self.target(self.stitch(z))

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write model.safetensors + stitch.json (+ tokenizer/) into out_dir atomically (temp folder, rename)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        stitch_meta, stitch_tensors = _stitch_state(self.stitch)
        tensors: dict[str, torch.Tensor] = {}
        for prefix, state in (("source.", self.source.state_dict()), ("stitch.", stitch_tensors), ("target.", self.target.state_dict())):
            for k, v in state.items():
                tensors[prefix + k] = v.detach().to("cpu").contiguous().clone()
        manifest = {**self.manifest, "format": FORMAT, "version": VERSION, "stitch": stitch_meta}
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
        try:
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "suture.format": FORMAT})
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("saved stitched model (%d tensors) to %s", len(tensors), out)
        return out


def _source_part(chain: Chain, layer: int) -> tuple[nn.Module, dict[str, Any]]:
    layer = chain.resolve_layer(layer, "source layer")
    if chain.kind == "hf":
        prefix = chain.prefix(layer)
        assert isinstance(prefix, HFEncoderPrefix)
        cfg = prefix.model.config.to_dict()
        meta = {"kind": "hf", "layer": layer, "pooling": prefix.pooling, "config": cfg, "ref": chain.source}
        return prefix, {**meta, "max_length": int(chain.hf.get("max_length", 128))}
    if chain.architecture is None:
        raise InputError("the source model has no recorded architecture (factory + kwargs); load it with load_chain or pass architecture=")
    factory, kwargs = chain.architecture
    return chain.prefix(layer), {"kind": "torch", "layer": layer, "architecture": {"factory": factory, "kwargs": kwargs}, "ref": chain.source}


def _target_part(chain: Chain, layer: int) -> tuple[nn.Module, dict[str, Any]]:
    layer = chain.resolve_layer(layer, "target layer")
    if chain.kind == "hf":
        chain.suffix(layer)  # raises the explanatory error
    if chain.architecture is None:
        raise InputError("the target model has no recorded architecture (factory + kwargs); load it with load_chain or pass architecture=")
    factory, kwargs = chain.architecture
    return chain.suffix(layer), {"kind": "torch", "layer": layer, "architecture": {"factory": factory, "kwargs": kwargs}, "ref": chain.source}


def make_stitched(
    source: Chain,
    source_layer: int | str | None,
    stitch: nn.Module,
    *,
    target: Chain | None = None,
    target_layer: int | str | None = None,
    head: nn.Linear | None = None,
    info: Mapping[str, Any] | None = None,
) -> StitchedModel:
    """Assemble A's prefix up to source_layer, the stitch, and B's suffix from target_layer (or a head)."""
    src_mod, src_meta = _source_part(source, source.resolve_layer(source_layer, "source layer"))
    if head is not None:
        tgt_mod: nn.Module = head
        tgt_meta: dict[str, Any] = {"kind": "head", "in_features": head.in_features, "out_features": head.out_features}
        if target is not None:
            tgt_meta.update(ref=target.source, layer=target.resolve_layer(target_layer, "target layer"))
    elif target is not None:
        tgt_mod, tgt_meta = _target_part(target, target.resolve_layer(target_layer, "target layer"))
    else:
        raise InputError("make_stitched: give a target chain or a head")
    model = StitchedModel(src_mod, stitch, tgt_mod, {"source": src_meta, "target": tgt_meta, "info": dict(info or {})})
    if source.kind == "hf":
        model.tokenizer = source.hf.get("tokenizer")
    return model.eval()


# --------------------------------------------------------------------------------------------------
# loading


def _split(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or bad:
        raise InputError(f"{where}: tensors do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {bad[:5]}")
    module.load_state_dict(state)


def _rebuild_torch(meta: Mapping[str, Any], where: str, trust_remote_code: bool = False) -> Chain:
    from suture.merge.zoo import build_architecture, check_factory_trust

    arch = meta.get("architecture") or {}
    if not isinstance(arch.get("factory"), str):
        raise InputError(f"{where}: no architecture factory in the manifest")
    check_factory_trust(arch["factory"], source=where, trust_remote_code=trust_remote_code)
    module = build_architecture(arch["factory"], **dict(arch.get("kwargs") or {}))
    return chain_from_module(module, architecture=(arch["factory"], dict(arch.get("kwargs") or {})))


def _rebuild_part(meta: Mapping[str, Any], state: dict[str, torch.Tensor], side: str, where: str,
                  trust_remote_code: bool = False) -> nn.Module:
    kind = meta.get("kind")
    if kind == "torch":
        chain = _rebuild_torch(meta, where, trust_remote_code)
        layer = int(meta["layer"])
        mod = chain.prefix(layer) if side == "source" else chain.suffix(layer)
    elif kind == "hf" and side == "source":
        from transformers import AutoConfig, AutoModel

        cfg = dict(meta.get("config") or {})
        model_type = cfg.pop("model_type", None)
        if not model_type:
            raise InputError(f"{where}: the source config has no model_type")
        config = AutoConfig.for_model(model_type, **cfg)
        model = AutoModel.from_config(config)
        mod = HFEncoderPrefix(model, int(meta["layer"]), meta.get("pooling", "mean"))
    elif kind == "head" and side == "target":
        mod = LinearHead(int(meta["in_features"]), int(meta["out_features"]))
    else:
        raise InputError(f"{where}: unknown {side} kind {kind!r}")
    _load_strict(mod, state, f"{where} ({side})")
    return mod.eval()


def load_stitched(path: str | os.PathLike[str], *, trust_remote_code: bool = False) -> StitchedModel:
    """Rebuild a StitchedModel from a folder written by StitchedModel.save (no original models needed).

    A manifest naming an architecture factory outside Suture's zoo needs `trust_remote_code`.
    """
    from safetensors.torch import load_file

    folder = Path(path)
    man_path = folder / MANIFEST_FILE
    if not man_path.is_file():
        raise InputError(f"{folder}: no {MANIFEST_FILE}; expected a stitched model folder")
    manifest = read_json(man_path)
    if manifest.get("format") != FORMAT:
        raise InputError(f"{man_path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if int(manifest.get("version", 0)) > VERSION:
        raise InputError(f"{man_path}: version {manifest.get('version')} is newer than this reader ({VERSION})")
    if not (folder / WEIGHTS_FILE).is_file():
        raise InputError(f"{folder}: no {WEIGHTS_FILE}")
    tensors = load_file(str(folder / WEIGHTS_FILE))
    where = str(man_path)
    source = _rebuild_part(manifest["source"], _split(tensors, "source."), "source", where, trust_remote_code)
    stitch = _stitch_from_state(manifest["stitch"], _split(tensors, "stitch."), where)
    target = _rebuild_part(manifest["target"], _split(tensors, "target."), "target", where, trust_remote_code)
    model = StitchedModel(source, stitch, target, {k: v for k, v in manifest.items() if k not in ("format", "version", "stitch")})
    model.manifest["stitch"] = manifest["stitch"]
    if (folder / TOKENIZER_DIR).is_dir():
        from transformers import AutoTokenizer

        model.tokenizer = AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR), local_files_only=True)
    logger.info("loaded stitched model from %s", folder)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def predict(fn: Callable[[Any], torch.Tensor] | nn.Module, inputs: Inputs, *, batch_size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """Argmax class predictions of a module (or function of a batch) over all inputs."""
    from suture.merge.evaluate import model_logits, run_module

    preds = []
    for batch, _ in iter_batches(CalibrationData(inputs), batch_size):
        batch = inputs_to(batch, device)
        out = run_module(fn, batch) if isinstance(fn, nn.Module) else fn(batch)
        preds.append(model_logits(out).argmax(dim=-1).cpu())
    return torch.cat(preds)


def classification_scores(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro F1 (over the classes present in labels or predictions)."""
    from sklearn.metrics import f1_score

    pred = torch.as_tensor(pred).cpu()
    labels = torch.as_tensor(labels).cpu()
    if pred.shape != labels.shape:
        raise InputError(f"{pred.shape[0]} predictions for {labels.shape[0]} labels")
    acc = float((pred == labels).double().mean())
    f1 = float(f1_score(labels.numpy(), pred.numpy(), average="macro", zero_division=0))
    return {"accuracy": acc, "f1_macro": f1, "n": int(labels.shape[0])}


def evaluate_stitched(model: StitchedModel, data: CalibrationData, *, batch_size: int = 256, device: str | torch.device = "cpu") -> dict[str, float]:
    """Accuracy and macro F1 of a stitched model on labelled data (texts are tokenized with the source's tokenizer)."""
    if data.labels is None:
        raise InputError(f"data {data.name!r} has no labels to score against")
    inputs: Inputs = data.inputs
    if model.manifest.get("source", {}).get("kind") == "hf":
        texts = data.meta.get("texts")
        if texts is not None and model.tokenizer is not None:
            from suture.merge.data import encode_texts

            max_length = int(model.manifest["source"].get("max_length", 128))
            inputs = encode_texts(model.tokenizer, list(texts), max_length=max_length)
    model.to(device).eval()
    return classification_scores(predict(model, inputs, batch_size=batch_size, device=device), data.labels)

