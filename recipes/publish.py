"""The recipe's `publish:` section: push the finished output folder to the Hugging Face Hub.

`suture push`, the recipe section and the app's Publish page all end in :func:`merge.hub.push_folder`.
The token comes from HF_TOKEN or the huggingface_hub login, never from the recipe (recipes are shared).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from suture.recipes.sections import PublishSection


def publish(out_dir: Path, section: PublishSection, progress: Callable[[float, str], None] | None = None) -> str:
    """Push `out_dir` as described by the section; returns the URL."""
    from suture.merge.hub import push_folder

    return push_folder(
        out_dir,
        section.repo_id,
        private=section.private,
        revision=section.revision,
        create_pr=section.create_pr,
        commit_message=section.commit_message,
        progress=progress,
    )
