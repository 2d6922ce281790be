"""A wider GPT-2 fused into a narrower one by OT fusion for transformers (Imfeld et al., ICLR 2024); prints JSON.

The reference A is the width-128, 4-head GPT-2 of ``benchmarks/lm_pairs.py`` (seed 2 by default); model B is a
width-192, 6-head GPT-2 (MLP 768, the same head size 32) from ``lm_pairs.Recipe(kind="gpt2", width=192,
heads=6, steps=300)`` (seed 1; ``--wide-steps``; trained on first use, about 300 CPU seconds, then cached; fewer than the
narrow pair's 1000 steps, to fit a shared 2-core machine). B is transported onto A's widths by
``engine: ot`` through the engine registry (as a recipe's ``alignment:`` would: one residual-stream plan,
heads carried whole onto A's heads, MLP units by a rectangular plan) and averaged with A at each
``--blends`` share of A. Reported per setting, in nats per token on the validation blocks: A alone (the
narrow parent), B (the wide parent), B transported into A's config, and the fused models. This is the
zero-shot fusion; Imfeld et al. fine-tune the fused model afterwards: ``--finetune N`` trains the best fused
model (lowest loss over settings and blends) and, at an equal budget, the narrow parent alone for N steps (batch 32, AdamW at
``--finetune-lr``, the same training blocks in the same order) and reports both.

    nice -n 10 python benchmarks/transformer_widths.py [--seeds 2 1] [--calib 256] [--val 400] [--blends 0.5 0.75]
        [--wide-steps 300] [--finetune 100]
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

from transformer_align import ENGINES  # noqa: E402

ROWS = [name for name, options in ENGINES.items() if options and options["engine"] == "ot"]
WIDE = {"width": 192, "heads": 6}


def run(seeds: tuple[int, int], calib_blocks: int, val_blocks_n: int, batch_size: int, blends: list[float],
        wide_steps: int = 300, finetune: int = 0, finetune_lr: float = 5e-4) -> dict:
    import lm_pairs

    from suture.merge.align.engines import get_engine
    from suture.merge.align.ot import fuse_states
    from suture.merge.align.pipeline import align_models
    from suture.merge.data import CalibrationData
    from suture.merge.derive import derive_spec, load_module
    from suture.merge.store import DictStore, open_store

    narrow, wide = lm_pairs.Recipe(kind="gpt2"), lm_pairs.Recipe(kind="gpt2", steps=wide_steps, **WIDE)
    folder_a, folder_b = lm_pairs.train_model(narrow, seeds[0]), lm_pairs.train_model(wide, seeds[1])
    tokenizer = lm_pairs.tokenizer_for(narrow, folder_a.parent)  # one tokenizer per kind: both models share it
    val = lm_pairs.val_blocks(narrow, tokenizer)[:val_blocks_n]
    train = lm_pairs.pack(tokenizer, lm_pairs.review_texts("train"), "gpt2", narrow.context)
    calib = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:calib_blocks]]
    data = CalibrationData({"input_ids": calib}, name=f"{calib_blocks} training blocks")
    store_a, store_b = open_store(folder_a), open_store(folder_b)
    _, arch_a = derive_spec(store_a)
    _, arch_b = derive_spec(store_b)

    def loss_of(state: dict[str, torch.Tensor], store=store_a, arch=arch_a) -> float:
        module = load_module(DictStore(state, source="eval", config=store.config), arch)
        return round(lm_pairs.lm_loss(module, val, "gpt2", tokenizer), 4)

    state_a = store_a.state_dict()
    out = {"models": {"a": str(folder_a), "b": str(folder_b)},
           "widths": {"a": {"n_embd": narrow.width, "n_head": narrow.heads}, "b": {"n_embd": wide.width, "n_head": wide.heads}},
           "training_steps": {"a": narrow.steps, "b": wide.steps},
           "val_loss": {"a_narrow_parent": loss_of(state_a), "b_wide_parent": loss_of(store_b.state_dict(), store_b, arch_b)},
           "val_blocks": len(val), "calibration_blocks": len(calib), "settings": {}}
    best_fused = None
    for name in ROWS:
        t0 = time.perf_counter()
        opts = get_engine("ot").parse({**ENGINES[name], "batch_size": batch_size})
        outcome = align_models({"a": store_a, "b": store_b}, "a", opts, data=data)
        moved = outcome.stores["b"].state_dict()
        align_s = time.perf_counter() - t0
        row = {"transported_b_loss": loss_of(moved), "align_seconds": round(align_s, 2)}
        for blend in blends:
            row[f"fused_loss(blend={blend})"] = loss_of(fuse_states(state_a, moved, blend))
        best = min(v for k, v in row.items() if k.startswith("fused_loss"))
        row["best_fused_minus_narrow_parent"] = round(best - out["val_loss"]["a_narrow_parent"], 4)
        out["settings"][name] = row
        blend = min(blends, key=lambda b: row[f"fused_loss(blend={b})"])
        if best_fused is None or row[f"fused_loss(blend={blend})"] < best_fused[0]:
            best_fused = (row[f"fused_loss(blend={blend})"], f"{name} blend={blend}", fuse_states(state_a, moved, blend))
    if finetune and best_fused is not None:
        _, source, best_state = best_fused
        out["finetune"] = {"steps": finetune, "lr": finetune_lr, "fused_from": source}
        for label, state in (("fused", best_state), ("narrow_parent", state_a)):
            module = load_module(DictStore(state, source=label, config=store_a.config), arch_a)
            tuned = tune(module, train, finetune, finetune_lr)
            out["finetune"][f"{label}_loss"] = round(lm_pairs.lm_loss(tuned, val, "gpt2", tokenizer), 4)
    return out


def tune(module: torch.nn.Module, train: torch.Tensor, steps: int, lr: float, batch: int = 32, seed: int = 0) -> torch.nn.Module:
    """`steps` AdamW steps of next-token loss on training blocks drawn in a seeded order (the same for every model)."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.01)
    module.train()
    for step in range(steps):
        ids = train[order[(step * batch) % len(order):][:batch]]
        loss = module(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
    return module.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs=2, default=[2, 1], help="seeds of the narrow reference and the wide model")
    ap.add_argument("--calib", type=int, default=256, help="calibration blocks (training text)")
    ap.add_argument("--val", type=int, default=400, help="validation blocks the losses are measured on")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--blends", type=float, nargs="+", default=[0.5, 0.75], help="shares of the reference in the fusion")
    ap.add_argument("--wide-steps", type=int, default=300, help="training steps of the wide model")
    ap.add_argument("--finetune", type=int, default=0, help="fine-tune the fused model and the narrow parent this many steps")
    ap.add_argument("--finetune-lr", type=float, default=5e-4)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = {"machine": {"threads": torch.get_num_threads(), "load_average": [round(x, 2) for x in os.getloadavg()]}}
    out["gpt2"] = run(tuple(args.seeds), args.calib, args.val, args.batch_size, args.blends, args.wide_steps,
                     args.finetune, args.finetune_lr)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
