"""On-disk cache of encoder features, so a re-run that changes only the head or the translator does not re-encode.

Encoding is nearly all of a text stitch's time (a small BERT reads ~15 texts/s on two cores). Features are
stored per (model identity, data identity, pooling, max_length, token mode) under
``$SUTURE_CACHE/features/`` (default ``~/.cache/suture``) as safetensors files, one tensor per layer,
written to a temporary name and renamed into place so a reader never sees half a file.

The model identity is its folder plus every file's name, size and modification time (editing or replacing
the weights changes the key); the data identity is a SHA-256 of the raw texts, or of the token tensors
when there are no texts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from suture.merge.data import CalibrationData, Inputs

logger = logging.getLogger(__name__)

__all__ = ["FORMAT", "feature_key", "load_features", "model_identity", "save_features"]

FORMAT = "suture-features-1"


def _cache_folder() -> Path:
    from suture.merge.refs import cache_dir

    return cache_dir() / "features"


def model_identity(folder: str | Path) -> dict[str, Any]:
    """The folder's resolved path and (name, size, mtime_ns) of every file in it and its subfolders."""
    root = Path(folder).resolve()
    files = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            st = path.stat()
            files.append([str(path.relative_to(root)), st.st_size, st.st_mtime_ns])
    return {"path": str(root), "files": files}


def _data_digest(data: CalibrationData | Inputs) -> str:
    h = hashlib.sha256()
    texts = data.meta.get("texts") if isinstance(data, CalibrationData) else None
    if texts is not None:
        h.update(b"texts\0")
        for t in texts:
            b = str(t).encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        return h.hexdigest()
    inputs = data.inputs if isinstance(data, CalibrationData) else data
    tensors = inputs.items() if isinstance(inputs, Mapping) else [("inputs", inputs)]
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def feature_key(model_folder: str | Path, data: CalibrationData | Inputs, *, pooling: str, max_length: int, tokens: bool,
                layers: Sequence[int] | None = None) -> tuple[str, dict[str, Any]]:
    """(file stem, the identity it hashes): what the features depend on besides the code."""
    ident = {
        "format": FORMAT,
        "model": model_identity(model_folder),
        "data": _data_digest(data),
        "pooling": pooling,
        "max_length": int(max_length),
        "tokens": bool(tokens),
        "layers": None if layers is None else sorted(int(i) for i in layers),
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode("utf-8")).hexdigest()
    return digest[:32], ident


def load_features(key: str, layers: Sequence[int]) -> dict[int, torch.Tensor] | None:
    """The cached layers, or None when the entry is missing, unreadable or lacks a layer (then it is recomputed)."""
    path = _cache_folder() / f"{key}.safetensors"
    if not path.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        stored = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        logger.warning("feature cache entry %s is unreadable (%s); encoding again", path, exc)
        return None
    names = {i: f"layer.{i}" for i in layers}
    if any(n not in stored for n in names.values()):
        return None
    logger.info("features read from the cache: %s", path.name)
    return {i: stored[n] for i, n in names.items()}


def save_features(key: str, feats: Mapping[int, torch.Tensor], ident: Mapping[str, Any]) -> Path | None:
    """Write the entry atomically (temporary file, then rename); a failure to write only costs a re-encode later."""
    from safetensors.torch import save_file

    folder = _cache_folder()
    path = folder / f"{key}.safetensors"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            tensors = {f"layer.{i}": t.detach().cpu().contiguous() for i, t in feats.items()}
            meta = {"format": FORMAT, "identity": json.dumps({k: v for k, v in ident.items() if k != "model"}, sort_keys=True),
                    "model": str(ident.get("model", {}).get("path", ""))}
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        logger.warning("could not write the feature cache entry %s (%s)", path, exc)
        return None
    return path
