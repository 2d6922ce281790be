"""A toy alignment engine defined outside the library: it reverses every group's units of the other models.

It shows that adding an engine is one module: Options, an align function returning permuted stores, and
one register_engine call.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from suture.merge.align import MatchResult
from suture.merge.align.engines import AlignmentOptions, AlignRequest, Engine, register_engine


class FlipOptions(AlignmentOptions):
    """`alignment: {engine: flip, times}`."""

    engine: Literal["flip"] = "flip"
    times: int = Field(1, ge=0, le=3, title="Flips", description="How many times each group's units are reversed.")


def _align(request: AlignRequest):
    from suture.merge.align.pipeline import align_permutations

    def match(spec, ref_store, store, arch, step):
        perms = {}
        for g in spec.active_groups():
            perm = torch.arange(g.size)
            perms[g.name] = perm.flip(0) if request.options.times % 2 else perm
        return MatchResult(perms=perms, engine=ENGINE.name)

    return align_permutations(request, ENGINE.name, match)


ENGINE = Engine(name="flip", title="Flip (toy)", description="units reversed", papers=(("A toy", "https://example.org/toy"),),
                options=FlipOptions, align=_align, outcome="permuted")


def register() -> Engine:
    """Register the toy engine (tests unregister it afterwards)."""
    return register_engine(ENGINE)
