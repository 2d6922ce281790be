"""ZipIt! for transformers models (Stoica et al., ICLR 2024): zip k Hugging Face models into one of A's shape.

Features are observed where activation matching for transformers observes them
(:func:`merge.align.transformer_match.transformer_sites`): the residual stream pooled over the outputs of
every norm on it, MLP units at the down projection's input, and each attention block's Q, K, V blocks and
head outputs. All models run on the same calibration batches, and each group's features of all models are
stacked (k*n units) into one correlation matrix, within-model pairs included.

* Free groups (residual stream, MLP units): ZipIt's greedy matching (:mod:`merge.align.zipit_match`) over
  the k*n features, within-model merges allowed under the alpha/beta budget, gives the merge ``M`` (n, k*n)
  and unmerge ``U`` (k*n, n). ``M`` acts on every ``out`` member of the group (the writing layers' rows,
  the norms' weights and biases, the embeddings' hidden axis) and ``U`` on every ``in`` member, as in
  :func:`merge.align.zipit._zip_tensors`. A tied output embedding (GPT-2's lm_head, BERT's MLM decoder)
  cannot be both, so it follows the input embedding (``M``).
* Attention: a head's output is ``softmax(q k^T / sqrt(d)) v``, and the softmax is not linear in the
  head's units, so a head cannot be split across merged heads nor partly merged with another: the average
  of two heads' units is only meaningful when whole heads are averaged. Heads are therefore zipped whole:
  the same greedy matching runs on head-pair scores over the k*H heads (the best within-head matching of
  two heads' outputs, as mean correlation; within-model head pairs allowed under the same budget), and the
  heads of each cluster are averaged after their dimensions are matched to the cluster's first head (one
  linear assignment per head on Q, K, V and the head outputs together; RoPE families, kind ``heads``, keep
  a head's dimensions in order). The result keeps A's head count and head size.

A full zip is one model of A's architecture whose outputs approximate the average of the models' outputs.
LayerNorm does not commute with averaging of features that are not copies of each other, so without
fine-tuning zipped transformers lose more than zipped CNNs (the paper's notes; measured in
``benchmarks/transformer_align.py``). Partial zipping (``stop_at``) is not offered for transformers.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from suture.merge.align.assignment import head_pair_scores, solve_lap
from suture.merge.align.engines import AlignRequest, BuiltModel
from suture.merge.align.transformer_match import HEAD_OUTPUTS, SEP, transformer_sites
from suture.merge.align.zipit import _check_states, _zip_tensors, stacked_site_stats
from suture.merge.align.zipit_match import MATCHERS, ZipMatch, match
from suture.merge.errors import AlignmentError, InputError, OptionError
from suture.merge.spec import PermGroup, PermutationSpec

logger = logging.getLogger(__name__)


@dataclass
class TransformerZip:
    """A zipped transformers model: its state dict (the input models' tensor names), module and matches."""

    state: dict[str, torch.Tensor]
    module: nn.Module
    matches: dict[str, ZipMatch]
    stats: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures for reports (no tensors)."""
        return {"engine": "zipit", "multihead": False, "heads": "average", "zipped_groups": list(self.matches),
                "branch_groups": [], "trunk_tensors": len(self.state), **self.stats}


class TransformerZipper:
    """Stacked feature statistics of k transformers on calibration data, zipped under any matcher/alpha/beta.

    The statistics are gathered once, so the baselines (naive averaging, permutation) cost only their
    matching and tensor products.
    """

    def __init__(self, spec: PermutationSpec, modules: Sequence[nn.Module], batches: Iterable[Any], *,
                 device: str | torch.device = "cpu") -> None:
        if len(modules) < 2:
            raise InputError(f"zipit needs at least two models, got {len(modules)}")
        start = time.perf_counter()
        self.spec, self.modules = spec, list(modules)
        self.states = [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in modules]  # zipped on the CPU
        _check_states(spec, self.states)
        frozen = [g for g in spec if g.frozen]
        if frozen:
            raise AlignmentError(f"group {frozen[0].name!r} cannot be zipped ({frozen[0].frozen_reason})")
        sites = transformer_sites(spec, self.modules[0])
        unseen = [g.name for g in spec.active_groups() if g.name not in sites]
        if unseen:
            raise AlignmentError(f"no module input or output of the model shows the features of group(s) {unseen}; cannot zip them")
        keyed = {f"{group}{SEP}{role}": s for group, roles in sites.items() for role, s in roles.items()}
        stats = stacked_site_stats(self.modules, keyed, batches, device=device)
        k = len(self.modules)
        self.corrs: dict[str, dict[str, torch.Tensor]] = {}
        for key, st in stats.items():
            group, role = key.split(SEP, 1)
            if st.n != k * spec.groups[group].size:
                raise AlignmentError(f"group {group!r} has {spec.groups[group].size} units but its {role} features have {st.n // k}")
            self.corrs.setdefault(group, {})[role] = st.corr().float().cpu()
        self.stats_s = time.perf_counter() - start

    def zip(self, matcher: str = "zip", *, alpha: float = 0.5, beta: float = 1.0) -> TransformerZip:
        """Zip every group with `matcher` ('zip', 'permute' or 'identity') into one model of A's architecture."""
        if matcher not in MATCHERS:
            raise OptionError(("matcher",), f"{matcher!r}: expected one of {', '.join(MATCHERS)}")
        start = time.perf_counter()
        k = len(self.modules)
        matches: dict[str, ZipMatch] = {}
        for group in self.spec.active_groups():
            roles = self.corrs[group.name]
            total = sum(roles.values()) / len(roles)
            if group.kind == "free":
                matches[group.name] = match(total, k, matcher, alpha=alpha, beta=beta)
            else:
                matches[group.name] = zip_heads(group, roles.get(HEAD_OUTPUTS, total), total, k, matcher, alpha=alpha, beta=beta)
        match_s = time.perf_counter() - start
        logger.info("zipped %d groups (%s), within-model merges per group: %s", len(matches), matcher,
                    {name: mt.within_merges for name, mt in matches.items()})
        state, _ = _zip_tensors(self.spec, self.states, matches, average_heads=True)
        _follow_ties(state, self.modules[0], self.spec)
        module = copy.deepcopy(self.modules[0]).cpu()
        module.load_state_dict(state)
        module.eval()
        groups = {name: {"size": self.spec.groups[name].size, "within_merges": mt.within_merges,
                         "mean_similarity": None if math.isnan(mt.mean_similarity) else round(mt.mean_similarity, 6)}
                  for name, mt in matches.items()}
        stats = {"matcher": matcher, "alpha": alpha, "beta": beta, "stop_at": None, "models": k, "groups": groups,
                 "stats_time_s": round(self.stats_s, 4), "match_time_s": round(match_s, 4),
                 "total_time_s": round(self.stats_s + time.perf_counter() - start, 4)}
        return TransformerZip(state, module, matches, stats)


def zip_heads(group: PermGroup, head_corr: torch.Tensor, total: torch.Tensor, n_models: int, matcher: str = "zip", *,
              alpha: float = 0.5, beta: float = 1.0) -> ZipMatch:
    """Merge/unmerge of an attention group that moves whole heads only (see the module docstring).

    `head_corr` scores head pairs (stacked head outputs), `total` aligns dimensions within paired heads;
    both are (k*n, k*n) over the k models' units stacked model by model. Every merged head is the average
    of the heads of one cluster, each head's dimensions matched to the cluster's first head.
    """
    d = group.head_dim
    if not d or group.size % d:
        raise AlignmentError(f"attention group {group.name!r} has no head size dividing its {group.size} units")
    n, within = group.size, group.kind == "heads_within" and matcher != "identity"
    scores, _ = head_pair_scores(head_corr.double(), d, within=group.kind == "heads_within")
    heads = match((scores / d).float(), n_models, matcher, alpha=alpha, beta=beta)  # labels of the k*H heads
    unmerge = torch.zeros(n_models * n, n)
    dims = torch.arange(d)
    for c in range(n // d):
        members = (heads.labels == c).nonzero().flatten().tolist()
        first = members[0]
        for h in members:
            mine = dims
            if within and h != first:  # mine[i]: the dimension of head h that joins dimension i of the first head
                mine = solve_lap(total[first * d:(first + 1) * d, h * d:(h + 1) * d])
            unmerge[h * d + mine, c * d + dims] = 1.0
    merge = unmerge.T / unmerge.sum(0)[:, None]
    return ZipMatch(unmerge.argmax(1), merge.contiguous(), unmerge, heads.within_merges, heads.mean_similarity)


def _follow_ties(state: dict[str, torch.Tensor], module: nn.Module, spec: PermutationSpec) -> None:
    """Tensors tied in the model (one storage, several names) take the value of the one that writes a group."""
    by_storage: dict[int, list[str]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if name in state and isinstance(tensor, torch.Tensor) and tensor.numel():
            by_storage.setdefault(tensor.data_ptr(), []).append(name)
    axes = spec.axes_of()
    for names in by_storage.values():
        if len(names) > 1:
            writers = [n for n in names if any(m.role == "out" for _, m in axes.get(n, {}).values())]
            source = (writers or names)[0]
            for name in names:
                state[name] = state[source]


# ---------------------------------------------------------------------------------------------- engine


def align_transformers(request: AlignRequest, archs: Mapping[str, Any]) -> BuiltModel:
    """The zipit engine on transformers folders: one zipped HF folder, evaluated on `.txt` data as a language model."""
    from suture.merge.data import iter_batches
    from suture.merge.derive import derive_spec, load_module
    from suture.merge.hf_module import HFArchitecture

    options, stores = request.options, request.stores
    keys = [request.reference, *[k for k in stores if k != request.reference]]
    if any(not isinstance(archs[k], HFArchitecture) for k in keys):
        raise AlignmentError("zipit zips transformers folders only with each other; every model must be a Hugging Face folder")
    if options.stop_at is not None:
        raise AlignmentError("partial zipping of transformers models is not supported; leave stop_at empty for a full zip",
                             field=("stop_at",))
    if options.match_head_scale:
        raise AlignmentError("match_head_scale rescales per-model heads, and a zipped transformers model has one averaged head",
                             field=("match_head_scale",))
    if "heads" in options.model_fields_set and options.heads == "concat":
        raise AlignmentError("heads: concat keeps per-model heads, and a zipped transformers model is one model "
                             "(its outputs averaged); use heads: average", field=("heads",))
    if request.data is None:
        raise AlignmentError("zipit needs calibration data (e.g. a .txt file)", field=("data",))
    spec, arch = derive_spec(stores[keys[0]], trust_remote_code=request.trust_remote_code)
    modules = [load_module(stores[k], archs[k]) for k in keys]
    if request.device is not None:
        modules = [m.to(request.device) for m in modules]
    if request.progress:
        request.progress("zip", 0, 1, "measuring features")
    zipper = TransformerZipper(spec, modules, (x for x, _ in iter_batches(request.data, options.batch_size)),
                               device=request.device)
    result = zipper.zip(options.matcher, alpha=options.alpha, beta=options.beta)
    if request.progress:
        request.progress("zip", 1, 1, "")
    ref_store = stores[keys[0]]

    def save(folder: Path) -> None:
        save_hf_folder(result.state, ref_store, folder)

    def evaluate(folder: Path, section: Any, progress=None) -> dict[str, Any]:
        return evaluate_zip(folder, section, zipper, {k: m for k, m in zip(keys, modules)}, ref_store, arch, progress)

    return BuiltModel("zipit", {"engine": "zipit", **result.summary()}, save, evaluate, card_rows,
                      extra={"module": result.module, "state": result.state})


def save_hf_folder(state: Mapping[str, torch.Tensor], ref_store: Any, folder: Path) -> None:
    """Weights (safetensors), the reference's config.json and its tokenizer files, as a loadable HF folder."""
    import json

    from suture.merge.hf_module import tokenizer_folder
    from suture.merge.tokenizer import copy_tokenizer_files
    from suture.merge.writer import save_tensors

    target = folder / ".zipped"
    save_tensors({k: v.detach().contiguous().cpu() for k, v in state.items()}, target, overwrite=True)
    for item in target.iterdir():
        item.replace(folder / item.name)
    target.rmdir()
    (folder / "config.json").write_text(json.dumps(dict(ref_store.config or {}), indent=2) + "\n")
    source = tokenizer_folder(ref_store)
    if source is not None:
        copy_tokenizer_files(Path(source), folder)
        if (Path(source) / "generation_config.json").is_file():
            shutil.copyfile(Path(source) / "generation_config.json", folder / "generation_config.json")


def evaluate_zip(folder: Path, section: Any, zipper: TransformerZipper, modules: Mapping[str, nn.Module], ref_store: Any,
                 arch: Any, progress=None) -> dict[str, Any]:
    """The written model, every input model and the baselines (naive averaging, permutation) on the data.

    Barriers are each model's loss minus the input models' mean loss (the midpoint barrier of two models).
    """
    from suture.merge.data import load_dataset
    from suture.merge.derive import load_module
    from suture.merge.evaluate import evaluate
    from suture.merge.hf_module import tokenizer_folder
    from suture.merge.lm_eval import is_token_text, lm_evaluation, lm_kind
    from suture.merge.store import open_store

    data = load_dataset(section.data, split=section.split, max_items=section.max_items, tokenizer=tokenizer_folder(ref_store))
    store = open_store(folder)
    output = load_module(store, arch)  # what was written, read back
    store.close()
    info: dict[str, Any] | None = None
    if is_token_text(data):
        kind = lm_kind(output)
        if kind is None:
            raise AlignmentError(f"evaluate.data {data.name!r} is text without labels (scored as language modelling), but the "
                                 f"zipped model ({type(output).__name__}) has no causal or masked LM head")
        data, info = lm_evaluation(data, kind, mask_rate=section.mask_rate, seed=section.mask_seed)
    runs = [("naive averaging", "identity"), ("permutation", "permute")]
    steps = len(modules) + len(runs) + 1
    if progress:
        progress("evaluate", 0, steps, "zipped model")
    merged = evaluate(output, data, batch_size=section.batch_size)
    models = {}
    for i, (key, module) in enumerate(modules.items()):
        if progress:
            progress("evaluate", i + 1, steps, key)
        models[key] = evaluate(module, data, batch_size=section.batch_size)
    baselines = {}
    for i, (label, matcher) in enumerate(runs):
        if progress:
            progress("evaluate", len(modules) + 1 + i, steps, label)
        baselines[label] = evaluate(zipper.zip(matcher).module, data, batch_size=section.batch_size)
    if progress:
        progress("evaluate", steps, steps, "")
    mean_loss = sum(m["loss"] for m in models.values()) / len(models)
    barriers = {label: {"loss_midpoint": round(m["loss"] - mean_loss, 6)}
                for label, m in {"zipit": merged, **baselines}.items()}
    return {"data": section.data if isinstance(section.data, str) else dict(section.data), "split": section.split,
            "items": len(data), **({"language_model": info} if info else {}), "merged": merged, "models": models,
            "baselines": baselines, "barriers": barriers}


def card_rows(evaluation: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The model card's table: the zipped output, the input models and the baselines."""
    keep = ("loss", "perplexity", "accuracy")
    rows = [{"model": "zipped output", **{k: v for k, v in evaluation["merged"].items() if k in keep}}]
    rows += [{"model": key, **{k: v for k, v in m.items() if k in keep}} for key, m in evaluation.get("models", {}).items()]
    rows += [{"model": label, **{k: v for k, v in m.items() if k in keep}} for label, m in evaluation.get("baselines", {}).items()]
    return rows
