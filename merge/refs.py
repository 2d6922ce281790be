"""Model references: local paths, Hub ids (``org/name[@revision]``) and the built-in ``demo:`` models.

``demo:NAME`` models are trained deterministically on scikit-learn's bundled digits data the first time they
are used and cached under ``$SUTURE_CACHE`` (default ``~/.cache/suture``), so the demo recipes run with no
downloads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from suture.merge.errors import InputError

DEMO_PREFIX = "demo:"


def cache_dir() -> Path:
    """Where Suture caches generated demo models ($SUTURE_CACHE, else ~/.cache/suture)."""
    return Path(os.environ.get("SUTURE_CACHE") or Path.home() / ".cache" / "suture").expanduser()


def _finetune(key: str) -> Callable[[Path], Path]:
    def build(cache: Path) -> Path:
        from suture.merge.demo import demo_finetunes

        return demo_finetunes(cache / "demo")[key]

    return build


def _task(key: str, kind: str = "mlp") -> Callable[[Path], Path]:
    def build(cache: Path) -> Path:
        from suture.merge.demo import demo_tasks

        return demo_tasks(cache / "demo", kind)[key]

    return build


def _seeded(kind: str, seed: int) -> Callable[[Path], Path]:
    def build(cache: Path) -> Path:
        from suture.merge.demo import demo_models

        return demo_models(cache / "demo", kind=kind, seeds=(seed,))[0]

    return build


DEMO_MODELS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "base": (_finetune("base"), "small MLP briefly trained on all digits (base of the fine-tunes)"),
    "finetune-0-4": (_finetune("ft_0_4"), "the base fine-tuned on digits 0-4"),
    "finetune-5-9": (_finetune("ft_5_9"), "the base fine-tuned on digits 5-9"),
    "mlp-seed1": (_seeded("mlp", 1), "64-512-512-512-10 ReLU MLP trained on digits, seed 1"),
    "mlp-seed2": (_seeded("mlp", 2), "64-512-512-512-10 ReLU MLP trained on digits, seed 2"),
    "resnet-seed1": (_seeded("resnet", 1), "small ResNet with BatchNorm trained on digits, seed 1"),
    "resnet-seed2": (_seeded("resnet", 2), "small ResNet with BatchNorm trained on digits, seed 2"),
    "task-0-4": (_task("0-4"), "MLP with a 5-class head trained on digits 0-4 only"),
    "task-5-9": (_task("5-9"), "MLP with a 5-class head trained on digits 5-9 only (another initialization)"),
    "task-resnet-0-4": (_task("0-4", "resnet"), "width-32 ResNet with a 5-class head trained on digits 0-4 only"),
    "task-resnet-5-9": (_task("5-9", "resnet"), "width-32 ResNet with a 5-class head trained on digits 5-9 only (another initialization)"),
}


def is_demo_ref(ref: str) -> bool:
    """True for ``demo:NAME`` references."""
    return str(ref).startswith(DEMO_PREFIX)


def demo_path(name: str) -> Path:
    """Build (once) and return the folder of a built-in demo model."""
    try:
        build, _ = DEMO_MODELS[name]
    except KeyError:
        raise InputError(f"unknown demo model {DEMO_PREFIX}{name}; expected one of {[DEMO_PREFIX + n for n in DEMO_MODELS]}") from None
    return build(cache_dir())


def resolve_ref(ref: str | Path, *, allow_pickle: bool = False, token: str | None = None) -> Path:
    """A local folder/file for any model reference (demo models are built, Hub ids downloaded)."""
    text = str(ref)
    if is_demo_ref(text):
        return demo_path(text[len(DEMO_PREFIX):])
    from suture.merge.hub import resolve_model_ref

    return Path(resolve_model_ref(text, allow_pickle=allow_pickle, token=token))
