"""Fine-tune a pretrained text encoder plus a linear head on one task, cached by task, seed and recipe.

The multi-task merging benchmark needs N fine-tunes of one base (Ilharco et al., 2023, "Editing Models with
Task Arithmetic": the encoder's weights move, each task keeps its own head; here the word-embedding table
stays at the base's values by default, see ``TrainRecipe.freeze_word_embeddings``). Training is short and CPU-sized:
batches sorted into per-batch padding, sequences cut at ``max_length``, AdamW with linear warm-up and decay,
the fresh head on a larger learning rate than the pretrained encoder. The result is a Hugging Face folder
(``save_pretrained``: the encoder's tensors under the base's names, config, tokenizer) with ``head/`` beside
it (:mod:`suture.merge.text_heads`). Folders live under ``cache_dir()/multitask/KEY`` with KEY built from
task, seed and a hash of the recipe and base, so a rerun reuses them; a file lock keeps two processes from
training the same one at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from suture.merge.errors import InputError
from suture.merge.refs import cache_dir
from suture.merge.tasks_text import load_task
from suture.merge.text_heads import LinearHead, pooled, save_head

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@dataclass(frozen=True)
class TrainRecipe:
    """How a fine-tune is trained; every field is part of the cache key."""

    steps: int = 160
    batch_size: int = 16
    lr: float = 1e-4
    head_lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.1
    max_length: int = 48
    data_seed: int = 0  # which seeded split of the task (merge.tasks_text.load_task)
    # the 30,522 x 384 word-embedding table stays at the base's values: half the optimizer's work on a CPU, and a
    # table every fine-tune shares merges to itself under any method (every other encoder weight trains)
    freeze_word_embeddings: bool = True

    def key(self, base: str | Path) -> str:
        """A short hash of the recipe and the base weights' identity (path, size, modification time)."""
        f = Path(base) / "model.safetensors"
        ident = f"{f.resolve()}:{f.stat().st_size}:{int(f.stat().st_mtime)}" if f.is_file() else str(base)
        return hashlib.sha256(json.dumps([asdict(self), ident], sort_keys=True).encode()).hexdigest()[:12]


def finetune_dir(task: str, seed: int, recipe: TrainRecipe, base: str | Path) -> Path:
    """Where the fine-tune for (task, seed, recipe, base) is cached."""
    return cache_dir() / "multitask" / f"{task}-seed{seed}-{recipe.key(base)}"


def finetune(task: str, base: str | Path, *, seed: int = 0, recipe: TrainRecipe | None = None,
             progress: Callable[[int, int, float], None] | None = None) -> Path:
    """The cached fine-tune folder for the task (trained on first use; ``progress(step, steps, loss)``)."""
    from filelock import FileLock

    recipe = recipe or TrainRecipe()
    base = Path(base)
    if not (base / "config.json").is_file():
        raise InputError(f"{base}: not a Hugging Face model folder (no config.json)")
    out = finetune_dir(task, seed, recipe, base)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "train.json").is_file():
            return out
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        info = _train(task, base, seed, recipe, tmp, progress)
        (tmp / "train.json").write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
    logger.info("fine-tune %s cached at %s", task, out)
    return out


def _train(task: str, base: Path, seed: int, recipe: TrainRecipe, out: Path, progress) -> dict:
    from transformers import AutoTokenizer, BertModel, get_linear_schedule_with_warmup

    data = load_task(task, recipe.data_seed)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = BertModel.from_pretrained(str(base))  # keeps the pooler, unused and untouched, so names match the base
    head = torch.nn.Linear(model.config.hidden_size, len(data.classes))
    frozen = ("pooler.", "embeddings.word_embeddings.") if recipe.freeze_word_embeddings else ("pooler.",)
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith(frozen))
    no_decay = ("bias", "LayerNorm.weight")
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [
        {"params": [p for n, p in trained if not n.endswith(no_decay)], "weight_decay": recipe.weight_decay},
        {"params": [p for n, p in trained if n.endswith(no_decay)], "weight_decay": 0.0},
        {"params": list(head.parameters()), "lr": recipe.head_lr, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(params, lr=recipe.lr)
    sched = get_linear_schedule_with_warmup(opt, int(recipe.warmup * recipe.steps), recipe.steps)
    ids = tokenizer(data.train.texts, truncation=True, max_length=recipe.max_length)["input_ids"]
    labels = torch.tensor(data.train.labels)
    rng = np.random.default_rng(seed)
    model.train()
    started, losses = time.perf_counter(), []
    order = rng.permutation(len(ids))
    for step in range(recipe.steps):
        lo = (step * recipe.batch_size) % len(ids)
        if lo + recipe.batch_size > len(ids):
            order, lo = rng.permutation(len(ids)), 0
        idx = order[lo:lo + recipe.batch_size]
        batch = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt")
        loss = torch.nn.functional.cross_entropy(head(pooled(model, batch)), labels[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress:
            progress(step + 1, recipe.steps, float(np.mean(losses[-20:])))
        if (step + 1) % 25 == 0:
            logger.info("%s step %d/%d loss %.4f", task, step + 1, recipe.steps, np.mean(losses[-25:]))
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    _match_base_names(out / "model.safetensors", base / "model.safetensors")
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    save_head(out, LinearHead(head.weight.detach(), head.bias.detach(), task, data.classes))
    return {"task": task, "seed": seed, "base": str(base), "recipe": asdict(recipe), "sizes": data.sizes(),
            "classes": list(data.classes), "seconds": round(time.perf_counter() - started, 1),
            "final_loss": float(np.mean(losses[-20:]))}


def _match_base_names(saved: Path, base_file: Path) -> None:
    """Give the fine-tune exactly the base file's tensor names, so merges line up name for name.

    A base saved by an older transformers keeps buffers (``embeddings.position_ids``) that ``save_pretrained``
    now leaves out: those are copied from the base unchanged; names the base lacks are dropped.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    if not base_file.is_file():
        return
    state = load_file(str(saved))
    with safe_open(str(base_file), "pt") as f:
        names = list(f.keys())
        out = {n: state[n] if n in state else f.get_tensor(n) for n in names}
    if set(out) != set(state):
        save_file({k: v.contiguous() for k, v in out.items()}, str(saved), metadata={"format": "pt"})


__all__ = ["TrainRecipe", "finetune", "finetune_dir"]
