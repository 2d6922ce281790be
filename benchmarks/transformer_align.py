"""Midpoint LM-loss barrier of two-seed transformer pairs under each alignment engine; prints JSON.

The pairs are the tiny GPT-2 causal LMs and BERT masked LMs of ``benchmarks/lm_pairs.py`` (trained on first
use and cached). For every engine, model B is aligned to model A through the engine registry (as a recipe's
``alignment:`` section would), the two are averaged with equal weights, and the midpoint's validation loss
is compared with the endpoints': ``barrier = loss(midpoint) - (loss(A) + loss(B)) / 2``, in nats per token.

Engines: ``naive`` (no alignment), ``weight_matching`` (Git Re-Basin), ``activation_matching`` with
``features: modules`` (each group observed at one module) and with ``features: pooled`` (Verma & Elbayad,
2024: residual stream pooled over all its sites, heads whole then within heads, MLP units), calibrated on
``--calib`` training blocks. ``<engine>+repair`` rows rescale the midpoint's MLP units to the endpoints'
interpolated statistics on the same blocks (REPAIR, Jordan et al. 2023; merge.align.transformer_repair). Floor (issue 16): the best engine's barrier <= 50 % of naive's.
``ot`` rows: OT fusion for transformers (Imfeld et al., ICLR 2024) on weights or activations, exact (emd) or
soft (sinkhorn); the midpoint is the fused model. ``--engines`` runs only the rows named (and naive).
``zipit`` rows (merge.align.transformer_zip) build one model from both; their barrier is that model's loss minus
the endpoints' mean, the same definition. ``--zip-grid`` adds ZipIt's barrier over alpha x beta.

    nice -n 10 python benchmarks/transformer_align.py [--kinds gpt2 bert] [--seeds 1 2] [--calib 256] [--val 400]
        [--engines cca zipit ...] [--zip-grid]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

ENGINES = {
    "naive": None,
    "weight_matching": {"engine": "weight_matching"},
    "activation_matching(modules)": {"engine": "activation_matching", "features": "modules"},
    "activation_matching(pooled)": {"engine": "activation_matching", "features": "pooled"},
    # linear maps, not permutations: MLP blocks and attention within head pairs, the residual stream permuted;
    # the MLP maps do not commute with GELU, so B after alignment is not exactly B (aligned_b_loss shows by how much)
    "cca": {"engine": "cca"},
    # OT fusion (Imfeld et al., ICLR 2024; merge.align.transformer_ot): one stream plan, heads transported whole
    "ot": {"engine": "ot"},
    "ot(activations)": {"engine": "ot", "ground_metric": "activations"},
    "ot(activations,sinkhorn)": {"engine": "ot", "ground_metric": "activations", "solver": "sinkhorn"},
    "ot(activations,cosine)": {"engine": "ot", "ground_metric": "activations", "distance": "cosine"},
    # ZipIt (merge.align.transformer_zip): one model built from both; within-model merges under the beta budget,
    # beta=0 allows cross-model merges only (a soft permutation)
    "zipit": {"engine": "zipit"},
    "zipit(beta=0)": {"engine": "zipit", "beta": 0.0},
    "zipit(alpha=1,beta=0.5)": {"engine": "zipit", "alpha": 1.0, "beta": 0.5},
}

# engines whose midpoint is also shown after REPAIR of the MLP units (merge.align.transformer_repair)
REPAIRED = ("naive", "weight_matching", "activation_matching(pooled)")


def midpoint(state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor], t: float = 0.5) -> dict[str, torch.Tensor]:
    """(1 - t) A + t B for floating tensors; others (integer buffers) from A."""
    return {k: torch.lerp(v.float(), state_b[k].float(), t) if v.is_floating_point() else v for k, v in state_a.items()}


def run_pair(kind: str, calib_blocks: int, val_blocks_n: int, batch_size: int, steps: int | None = None,
             seeds: tuple[int, int] = (1, 2), engines: list[str] | None = None, zip_grid: bool = False) -> dict:
    import lm_pairs

    from suture.merge.align.engines import BuiltModel, get_engine
    from suture.merge.align.transformer_repair import repair_mlps
    from suture.merge.align.pipeline import align_models
    from suture.merge.data import CalibrationData
    from suture.merge.derive import derive_spec, load_module
    from suture.merge.store import DictStore, open_store

    overrides = {} if steps is None else {"steps": steps}
    recipe = lm_pairs.Recipe(kind=kind, **overrides)
    folder_a, folder_b = lm_pairs.pair(kind, seeds, **overrides)
    cache = folder_a.parent
    tokenizer = lm_pairs.tokenizer_for(recipe, cache)
    val = lm_pairs.val_blocks(recipe, tokenizer)[:val_blocks_n]
    train = lm_pairs.pack(tokenizer, lm_pairs.review_texts("train"), kind, recipe.context)
    calib = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:calib_blocks]]
    data = CalibrationData({"input_ids": calib}, name=f"{calib_blocks} training blocks")
    store_a, store_b = open_store(folder_a), open_store(folder_b)
    _, arch = derive_spec(store_a)

    def module_of(state: dict[str, torch.Tensor]) -> torch.nn.Module:
        return load_module(DictStore(state, source="eval", config=store_a.config), arch)

    def loss_of(state: dict[str, torch.Tensor] | torch.nn.Module) -> float:
        module = state if isinstance(state, torch.nn.Module) else module_of(state)
        return lm_pairs.lm_loss(module, val, kind, tokenizer)

    calib_batches = [{"input_ids": calib[i:i + batch_size]} for i in range(0, len(calib), batch_size)]
    spec, _ = derive_spec(store_a)

    state_a = store_a.state_dict()
    loss_a, loss_b = loss_of(state_a), loss_of(store_b.state_dict())
    mean_end = (loss_a + loss_b) / 2
    rows = {}
    # naive is always measured: every barrier is compared with it
    for name, options in ((k, v) for k, v in ENGINES.items() if engines is None or k == "naive" or k in engines):
        t0 = time.perf_counter()
        if options is None:
            state_b, summary = store_b.state_dict(), {}
        else:
            opts = get_engine(options["engine"]).parse({**options, "batch_size": batch_size})
            outcome = align_models({"a": store_a, "b": store_b}, "a", opts, data=data)
            if isinstance(outcome, BuiltModel):  # the engine built the merged model itself (ZipIt)
                mid = loss_of(outcome.extra["module"])
                groups = outcome.summary.get("groups", {})
                rows[name] = {"midpoint_loss": round(mid, 4), "barrier": round(mid - mean_end, 4),
                              "align_seconds": round(time.perf_counter() - t0, 2),
                              "within_merges": sum(sum(g["within_merges"]) for g in groups.values())}
                continue
            state_b = outcome.stores["b"].state_dict()
            summary = outcome.results["b"].summary()
        align_s = time.perf_counter() - t0
        aligned_b = loss_of(state_b)  # a permutation keeps B's function: this checks it
        mid = loss_of(midpoint(state_a, state_b))
        rows[name] = {"midpoint_loss": round(mid, 4), "barrier": round(mid - mean_end, 4),
                      "aligned_b_loss": round(aligned_b, 4), "align_seconds": round(align_s, 2),
                      **{k: round(v, 4) for k, v in summary.items() if k.startswith("mean_corr")}}
        if name in REPAIRED and (not engines or name in engines):
            merged = module_of(midpoint(state_a, state_b))
            repair_mlps(merged, module_of(state_a), module_of(state_b), spec, calib_batches)
            mid = loss_of(merged)
            rows[f"{name}+repair"] = {"midpoint_loss": round(mid, 4), "barrier": round(mid - mean_end, 4)}
    grid = {}
    if zip_grid:  # ZipIt's alpha (merge decay) x beta (within-model budget), features measured once
        from suture.merge.align.transformer_zip import TransformerZipper

        zipper = TransformerZipper(spec, [module_of(state_a), module_of(store_b.state_dict())], calib_batches)
        # beta=0 allows no merge into a cluster that already holds both models, so alpha does not matter there
        for alpha, beta in [(0.5, 0.0)] + [(a, b) for a in (0.3, 0.5, 0.7, 1.0) for b in (0.25, 0.5, 0.75, 1.0)]:
            grid[f"alpha={alpha},beta={beta}"] = round(loss_of(zipper.zip(alpha=alpha, beta=beta).module) - mean_end, 4)
    naive = rows["naive"]["barrier"] if "naive" in rows else float("nan")
    for row in rows.values():
        row["barrier_vs_naive"] = round(row["barrier"] / naive, 3) if naive > 0 else None
    best = min((r for r in rows if r != "naive"), key=lambda r: rows[r]["barrier"], default="naive")
    return {"models": {"a": str(folder_a), "b": str(folder_b)},
            "recipe": json.loads((folder_a / "recipe.json").read_text())["recipe"],
            "val_loss": {"a": round(loss_a, 4), "b": round(loss_b, 4)}, "val_blocks": len(val),
            "calibration_blocks": len(calib), "engines": rows, "best": best, **({"zipit_grid": grid} if grid else {}),
            "floor_met": rows[best]["barrier"] <= 0.5 * naive}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", nargs="+", default=["gpt2", "bert"], choices=["gpt2", "bert"])
    ap.add_argument("--calib", type=int, default=256, help="calibration blocks (training text)")
    ap.add_argument("--val", type=int, default=400, help="validation blocks the losses are measured on")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seeds", type=int, nargs=2, default=[1, 2], help="seeds of the pair's two models")
    ap.add_argument("--steps", type=int, default=None, help="training steps of the pair (default: lm_pairs' recipe)")
    ap.add_argument("--engines", nargs="+", default=None, choices=list(ENGINES), metavar="NAME",
                    help=f"only these rows of ENGINES (naive always runs): {', '.join(ENGINES)}")
    ap.add_argument("--zip-grid", action="store_true", help="also ZipIt's barrier over an alpha x beta grid")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = {"machine": {"threads": torch.get_num_threads(), "load_average": [round(x, 2) for x in os.getloadavg()]}}
    for kind in args.kinds:
        out[kind] = run_pair(kind, args.calib, args.val, args.batch_size, args.steps, tuple(args.seeds), args.engines, args.zip_grid)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
