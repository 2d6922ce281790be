"""The recipe's `publish:` section: push the finished output folder to the Hugging Face Hub.

`suture push`, the recipe section and the app's Publish page all end in :func:`merge.hub.push_folder`.
The token comes from HF_TOKEN or the huggingface_hub login, never from the recipe (recipes are shared).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr, ValidationError

from merge.errors import RecipeError


class PublishSection(BaseModel):
    """`publish: {repo_id, private, revision, create_pr, commit_message}`."""

    model_config = ConfigDict(extra="forbid")

    repo_id: StrictStr
    private: StrictBool = False
    revision: StrictStr | None = None
    create_pr: StrictBool = False
    commit_message: StrictStr | None = None


def parse_publish(section: dict[str, Any] | None, where: Callable[[tuple], str] | None = None) -> PublishSection | None:
    """Validate the section before any work starts; errors name the key (and its line when known)."""
    if section is None:
        return None
    try:
        return PublishSection.model_validate(section)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            path = ("publish", *err["loc"])
            label = where(path) if where else ".".join(str(p) for p in path)
            problems.append(f"{label}: {err['msg']}")
        raise RecipeError("; ".join(problems)) from None


def publish(out_dir: Path, section: PublishSection, progress: Callable[[float, str], None] | None = None) -> str:
    """Push `out_dir` as described by the section; returns the URL."""
    from merge.hub import push_folder

    return push_folder(
        out_dir,
        section.repo_id,
        private=section.private,
        revision=section.revision,
        create_pr=section.create_pr,
        commit_message=section.commit_message,
        progress=progress,
    )
