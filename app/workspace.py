"""The app's workspace: the one folder it may read and write.

Every path a user types (a model path, an output folder, a recipe's local model reference) is resolved
here and refused when it would leave the workspace, whether through ``..``, an absolute path or a symbolic
link. Uploads are written under ``uploads/``, merge results under ``outputs/``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from suture.merge.errors import InputError

logger = logging.getLogger(__name__)

ENV_WORKSPACE = "SUTURE_WORKSPACE"
ENV_UPLOAD_LIMIT = "SUTURE_UPLOAD_LIMIT_MB"
DEFAULT_WORKSPACE = "suture-workspace"
DEFAULT_UPLOAD_LIMIT_MB = 200
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class WorkspaceError(InputError):
    """A path that is not allowed or not usable inside the workspace."""


def workspace_from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The workspace folder: ``--workspace DIR`` in argv, else $SUTURE_WORKSPACE, else ./suture-workspace."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--workspace", default=None)
    args, _ = parser.parse_known_args(list(argv or []))
    env = os.environ if environ is None else environ
    chosen = args.workspace or env.get(ENV_WORKSPACE) or DEFAULT_WORKSPACE
    return Path(chosen).expanduser().resolve()


def upload_limit_bytes(environ: Mapping[str, str] | None = None) -> int:
    """Largest accepted upload ($SUTURE_UPLOAD_LIMIT_MB, default 200 MB)."""
    env = os.environ if environ is None else environ
    try:
        mb = float(env.get(ENV_UPLOAD_LIMIT, DEFAULT_UPLOAD_LIMIT_MB))
    except ValueError:
        mb = DEFAULT_UPLOAD_LIMIT_MB
    return int(mb * 1024 * 1024)


@dataclass(frozen=True)
class Workspace:
    """A folder the app confines its file access to."""

    root: Path

    @classmethod
    def open(cls, root: str | Path) -> Workspace:
        """Create the folder (and its outputs/uploads sub-folders) if needed."""
        path = Path(root).expanduser().resolve()
        try:
            for sub in ("", "outputs", "uploads", "models"):
                (path / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WorkspaceError(f"workspace {path}: cannot create it ({exc.strerror})") from None
        return cls(path)

    @property
    def outputs(self) -> Path:
        """Where merge results go."""
        return self.root / "outputs"

    @property
    def uploads(self) -> Path:
        """Where uploaded model files go."""
        return self.root / "uploads"

    def resolve(self, user_path: str | Path, *, must_exist: bool = False) -> Path:
        """An absolute path inside the workspace for a typed path (relative paths start at the root)."""
        text = str(user_path).strip()
        if not text:
            raise WorkspaceError("empty path: type a path inside the workspace")
        if "\x00" in text:
            raise WorkspaceError(f"{text!r}: not a valid path")
        candidate = Path(text).expanduser()
        if not candidate.is_absolute():
            candidate = self.root / candidate
        # resolve() follows symbolic links, so a link pointing outside is caught too
        resolved = candidate.resolve()
        if not resolved.is_relative_to(self.root):
            raise WorkspaceError(f"{text}: outside the workspace {self.root}; only paths inside it can be used")
        if must_exist and not resolved.exists():
            raise WorkspaceError(f"{text}: no such file or folder in the workspace {self.root}")
        return resolved

    def confine_data(self, spec: Any, *, must_exist: bool = False) -> Any:
        """A data spec (``sklearn:NAME[?opts]``, a file path, or a dict with ``source``/``path``) with its file
        made absolute inside the workspace; files outside are refused."""
        if isinstance(spec, Mapping):
            key = "source" if "source" in spec else "path"
            return {**spec, key: self.confine_data(str(spec.get(key, "")), must_exist=must_exist)}
        text = str(spec).strip()
        source, mark, query = text.partition("?")
        if source.startswith("sklearn:"):
            return text
        path = self.resolve(source.removeprefix("file:"), must_exist=must_exist)
        return path.as_posix() + mark + query

    def contains(self, path: str | Path) -> bool:
        """Whether a path (resolved, links followed) lies inside the workspace."""
        try:
            self.resolve(path)
        except WorkspaceError:
            return False
        return True

    def relative(self, path: str | Path) -> str:
        """A path shown relative to the workspace root (as typed paths are read)."""
        p = Path(path).resolve()
        return p.relative_to(self.root).as_posix() if p.is_relative_to(self.root) else str(p)

    def list_models(self, max_depth: int = 3) -> list[Path]:
        """Model folders (holding *.safetensors) and loose .safetensors files, skipping hidden and outputs' temp folders."""
        found: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            here = Path(dirpath)
            depth = len(here.relative_to(self.root).parts)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and depth < max_depth)
            weights = sorted(f for f in filenames if f.endswith(".safetensors") and not f.startswith("."))
            if not weights:
                continue
            # a folder is one model when it says so (config, index or the standard file name); else each file is one
            whole = "model.safetensors" in weights or (here / "config.json").is_file() or any(here.glob("*.safetensors.index.json"))
            if here != self.root and whole:
                found.append(here)
            else:
                found += [here / f for f in weights]
        return found

    def list_outputs(self) -> list[Path]:
        """Finished merge results (folders with report.json under outputs/), newest first."""
        if not self.outputs.is_dir():
            return []
        done = [p for p in self.outputs.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "report.json").is_file()]
        return sorted(done, key=lambda p: p.stat().st_mtime, reverse=True)

    def save_upload(self, filename: str, data: bytes, limit: int | None = None) -> Path:
        """Store an uploaded .safetensors file under uploads/ after checking its size and header."""
        limit = upload_limit_bytes() if limit is None else limit
        name = _SAFE_NAME.sub("_", Path(str(filename)).name).lstrip(".")
        if not name.lower().endswith(".safetensors") or name.lower() == ".safetensors":
            raise WorkspaceError(f"{filename}: only .safetensors files can be uploaded (pickle checkpoints can run code)")
        if len(data) > limit:
            raise WorkspaceError(f"{filename}: {len(data) / 1e6:.1f} MB is over the upload limit of {limit / 1e6:.0f} MB")
        if not data:
            raise WorkspaceError(f"{filename}: the file is empty")
        self.uploads.mkdir(parents=True, exist_ok=True)
        target = self.uploads / name
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.uploads)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            _check_safetensors(tmp, filename)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        logger.info("stored upload %s (%d bytes)", target, len(data))
        return target


def _check_safetensors(path: Path, label: str) -> None:
    """Refuse a file whose safetensors header cannot be read (without reading the tensors)."""
    from suture.merge.store import read_safetensors_header

    try:
        read_safetensors_header(path)
    except InputError as exc:
        reason = str(exc).replace(f"{path}: ", "").replace(str(path), label)
        raise WorkspaceError(f"{label}: not a valid .safetensors file ({reason})") from None
    except Exception as exc:  # a malformed header may fail in many ways; report it as one readable line
        raise WorkspaceError(f"{label}: not a valid .safetensors file ({type(exc).__name__}: {exc})") from None
